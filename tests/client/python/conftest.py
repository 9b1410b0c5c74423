"""Fixtures of the ratd Python package's tests: a real ratd ($RATD_BIN, built by CMake)
on a private ipc:// endpoint, started once per test file and stopped with SIGTERM (its
exit status and the removal of its socket file are checked)."""
import os
import subprocess
import tempfile
import time

import pytest

import ratd


@pytest.fixture(scope="module")
def daemon():
    """(endpoint, process) of a fresh ratd; a test file that needs one asks for it."""
    d = tempfile.mkdtemp(prefix="ratd-py-")
    path = os.path.join(d, "ratd.sock")
    ep = "ipc://" + path
    log = open(os.path.join(d, "ratd.log"), "w")
    proc = subprocess.Popen([os.environ["RATD_BIN"], "--endpoint", ep, "--workers", "2"],
                            stdout=log, stderr=log)
    deadline = time.time() + 30
    while True:
        try:
            ratd.Client(ep, connect_timeout_ms=500).close()
            break
        except ratd.RatdError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                raise RuntimeError("ratd did not start: " + open(log.name).read()[-2000:])
            time.sleep(0.05)
    yield ep, proc
    proc.terminate()
    rc = proc.wait(timeout=60)
    log.close()
    assert rc == 0, "ratd exit status %d: %s" % (rc, open(log.name).read()[-2000:])
    assert not os.path.exists(path), "socket file left behind"


@pytest.fixture
def client(daemon):
    c = ratd.Client(daemon[0], timeout_ms=20000)
    yield c
    c.close()
