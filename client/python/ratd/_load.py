"""Finds and loads libratd-client once per process.

Search order (the first place that has the library wins; RATD_LIB_DIR is exclusive):
  1. $RATD_LIB_DIR                        (an override: nothing else is tried)
  2. the package's own folder             (pip install bundles the built library there)
  3. _paths.LIB_DIR                       (written by `cmake --install`: the prefix's lib dir)
  4. <source>/build/client                (the package imported from a source tree)
  5. the dynamic linker's search path     (ldconfig, LD_LIBRARY_PATH)
The library's ABI is checked before anything else is called (_abi.check_abi)."""

import ctypes
import ctypes.util
import os
import threading

from . import _abi
from ._version import __version__

NAMES = ("libratd-client.so", "libratd-client.so.1")
_lock = threading.Lock()
_lib = None
_path = None


def _candidates():
    here = os.path.dirname(os.path.abspath(__file__))
    env = os.environ.get("RATD_LIB_DIR")
    if env:
        return [os.path.join(env, n) for n in NAMES], "RATD_LIB_DIR=%s" % env
    dirs = [here]
    try:
        from . import _paths  # generated at install time

        d = _paths.LIB_DIR
        dirs.append(d if os.path.isabs(d) else os.path.normpath(os.path.join(here, d)))
    except ImportError:
        pass
    dirs.append(os.path.normpath(os.path.join(here, "..", "..", "..", "build", "client")))
    cands = [os.path.join(d, n) for d in dirs for n in NAMES]
    found = ctypes.util.find_library("ratd-client")
    cands += [found] if found else []
    cands += list(NAMES)  # plain names: the linker's own search
    return cands, ", ".join(dirs) + " and the linker's search path"


def load():
    """The bound, ABI-checked library (loaded on first use)."""
    global _lib, _path
    with _lock:
        if _lib is not None:
            return _lib
        cands, where = _candidates()
        errors = []
        for c in cands:
            if os.sep in c and not os.path.exists(c):
                continue
            try:
                lib = ctypes.CDLL(c)
            except OSError as e:
                errors.append(str(e))
                continue
            _abi.bind(lib, c, __version__)
            _lib, _path = lib, c
            return lib
        raise ImportError("libratd-client not found (searched %s)%s: build the tree (cmake --build "
                          "build), install it (cmake --install build), or set RATD_LIB_DIR to "
                          "the folder holding libratd-client.so"
                          % (where, ": " + errors[-1] if errors else ""))


def path():
    """File the library was loaded from (loads it)."""
    load()
    return _path
