"""Build hook of the ratd package (metadata: pyproject.toml): bundles the libratd-client
of a built tree into the package, so that `pip install client/python` gives a package
that finds its library without environment variables. Where the library is taken from:
$RATD_LIB_DIR, else <source>/build/client; none found: the package is built without it
and finds an installed library at run time (ratd/_load.py)."""

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _built_library():
    d = os.environ.get("RATD_LIB_DIR") or os.path.join(HERE, "..", "..", "build", "client")
    libs = sorted(glob.glob(os.path.join(d, "libratd-client.so.*.*.*")))
    return libs[-1] if libs else None


class BuildPy(build_py):
    def run(self):
        super().run()
        lib = _built_library()
        if lib:
            dst = os.path.join(self.build_lib, "ratd", "libratd-client.so")
            shutil.copyfile(lib, dst)  # the real file, not the symlink chain
            print("ratd: bundling %s" % lib)
        else:
            print("ratd: no built libratd-client found (build the tree or set RATD_LIB_DIR); "
                  "the package will look for an installed one")


setup(cmdclass={"build_py": BuildPy})
