"""The package as a user installs it: `pip install client/python` from a built tree
(the library is bundled) and `cmake --install` (package beside the library, found
through _paths.py), each into a temporary folder, then imported by a fresh interpreter
without RATD_LIB_DIR or PYTHONPATH to the source. The version is the project's."""
import os
import re
import shutil
import subprocess
import sys

import pytest

SRC = os.environ["RA_SOURCE_DIR"]
BIN = os.environ["RA_BINARY_DIR"]
PROBE = ("import ratd, sys; print(ratd.__version__); print(ratd.library_path()); "
         "print(ratd.library_version())")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RATD_LIB_DIR", "PYTHONPATH")}
    env.update(extra)
    return env


def project_version():
    m = re.search(r"project\(ratd VERSION ([0-9.]+)", open(os.path.join(SRC, "CMakeLists.txt")).read())
    return m.group(1)


def test_pip_install_bundles_the_built_library(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(SRC, "client", "python"), src,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                        "--no-index", "--target", str(target), str(src)],
                       env=clean_env(RATD_LIB_DIR=os.path.join(BIN, "client")),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-c", PROBE], env=clean_env(PYTHONPATH=str(target)),
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    ver, path, libver = p.stdout.split()
    assert ver == project_version() == libver
    assert path == str(target / "ratd" / "libratd-client.so")


def test_cmake_install(tmp_path):
    prefix = tmp_path / "prefix"
    p = subprocess.run([os.environ["RA_CMAKE"], "--install", BIN, "--prefix", str(prefix),
                        "--component", "Unspecified"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    site = prefix / os.environ["RA_INSTALL_PYDIR"]
    assert (site / "ratd" / "_paths.py").exists()
    p = subprocess.run([sys.executable, "-c", PROBE], env=clean_env(PYTHONPATH=str(site)),
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    ver, path, libver = p.stdout.split()
    assert ver == project_version() == libver
    assert os.path.realpath(path).startswith(str(prefix)), path
