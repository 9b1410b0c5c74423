"""The ratd package with numpy against a real ratd: offload / append / attend against
attention in float64, top-k positions, the asynchronous form, top_k_per_head, training
lists, session stats, f16 and bf16 sessions, the daemon's errors, the ABI check, and
every bad input of issue 11 (each a Python exception that names the problem; nothing
reaches C)."""
import ctypes
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import ratd
from ratd import _abi, _load

H, G, D, N, NOFF = 8, 4, 64, 300, 240


def ref(q, K, V, rows, scale=None):
    """o [H][D], lse [H] of attention of q [H][D] over rows of K, V [G][n][D], float64."""
    scale = scale or 1 / np.sqrt(D)
    q, K, V = q.astype(np.float64), K.astype(np.float64), V.astype(np.float64)
    o, lse = np.zeros((H, D)), np.zeros(H)
    for h in range(H):
        g = h // (H // G)
        s = scale * (K[g, rows] @ q[h])
        m = s.max()
        w = np.exp(s - m)
        o[h] = (w @ V[g, rows]) / w.sum()
        lse[h] = m + np.log(w.sum())
    return o, lse


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    K = rng.standard_normal((G, N, D)).astype(np.float32)
    V = rng.standard_normal((G, N, D)).astype(np.float32)
    pos = (10 + 2 * np.arange(N)).astype(np.int64)
    q = (1.5 * rng.standard_normal((H, D))).astype(np.float32)
    return K, V, pos, q


def session(c, dtype="f32", index="flat", **kw):
    return c.create_session(n_layers=2, n_q_heads=H, n_kv_heads=G, head_dim=D, dtype=dtype,
                            index=index, **kw)


def fill(c, s, K, V, pos, q_train=None):
    c.offload(s, 1, np.ascontiguousarray(K[:, :NOFF]), np.ascontiguousarray(V[:, :NOFF]),
              pos[:NOFF].copy(), q_train=q_train)
    c.append(s, 1, np.ascontiguousarray(K[:, NOFF:]), np.ascontiguousarray(V[:, NOFF:]),
             pos[NOFF:].copy())


def close(a, b, tol):
    err = np.abs(np.asarray(a, np.float64) - b).max() / max(1.0, np.abs(b).max())
    assert err <= tol, err


def test_library_and_hello(client):
    assert ratd.__version__ == "0.1.0"
    assert ratd.abi_version() == _abi.ABI_VERSION
    assert ratd.library_version() == ratd.__version__
    assert os.path.dirname(ratd.library_path()) == os.environ["RATD_LIB_DIR"]
    info = client.info
    assert info["protocol_version"] == 1 and info["limits"]["max_top_k"] == 8192
    assert "topk" in info["caps"] and info["workers"] == 2
    assert ratd.strerror(4) == "unknown session" or "session" in ratd.strerror(4)
    assert ratd.op_name(4) == "attend" and ratd.dtype_size("bf16") == 2
    assert ratd.dtype_name("f16") == "f16"


@pytest.mark.parametrize("index", ["graph", "flat"])
def test_attend_exact(client, data, index):
    K, V, pos, q = data
    s = session(client, index=index)
    rng = np.random.default_rng(1)
    fill(client, s, K, V, pos, q_train=rng.standard_normal((H, 64, D)).astype(np.float32))
    r = client.attend(s, 1, q, top_k=N)
    assert isinstance(r.o, np.ndarray) and r.o.dtype == np.float32 and r.o.shape == (H, D)
    assert r.lse.shape == (H,) and r.pos is None
    o, lse = ref(q, K, V, np.arange(N))
    close(r.o, o, 1e-4)
    close(r.lse, lse, 1e-4)
    st = client.session_stats(s)
    assert st["tokens"] == G * N or st["tokens"] == N, st
    assert st["heads"] == G
    client.wait_ready(s, 60000)
    assert client.session_stats(s)["heads_building"] == 0
    client.set_spin_us(2000)  # polling for the reply: the same answer
    r = client.attend(s, 1, q, top_k=N)
    client.set_spin_us(0)
    close(r.o, o, 1e-4)
    close(r.lse, lse, 1e-4)
    with pytest.raises(ValueError, match=r"spin_us"):
        client.set_spin_us(100001)
    client.session_drop(s)


def test_topk_async_merge_budgets(client, data):
    K, V, pos, q = data
    s = session(client)
    fill(client, s, K, V, pos)
    k = 10
    r = client.attend(s, 1, q, top_k=k, want_topk=True)
    assert r.pos.dtype == np.int64 and r.pos.shape == (H, k) and r.counts.dtype == np.int32
    for h in range(H):
        g = h // (H // G)
        best = np.argsort(-(K[g] @ q[h]))[:k]
        assert set(r.pos[h]) == set(pos[best]), h
        assert r.counts[h] == k
        np.testing.assert_allclose(np.sort(r.scores[h]), np.sort(K[g, best] @ q[h]), rtol=1e-4, atol=1e-4)
    # two in flight, waited in reverse order
    t1 = client.attend_send(s, 1, q, top_k=N)
    t2 = client.attend_send(s, 1, q, top_k=5)
    r2 = client.attend_wait(t2)
    r1 = client.attend_wait(t1)
    full = client.attend(s, 1, q, top_k=N)
    np.testing.assert_array_equal(r1.o, full.o)
    assert not np.array_equal(r2.lse, full.lse)
    with pytest.raises(ValueError, match="unknown ticket"):
        client.attend_wait(t1)
    # the daemon's part (first NOFF tokens) merged with a local part (the rest)
    s2 = session(client)
    client.offload(s2, 0, np.ascontiguousarray(K[:, :NOFF]), np.ascontiguousarray(V[:, :NOFF]),
                   pos[:NOFF].copy())
    part = client.attend(s2, 0, q, top_k=N)
    lo, ll = ref(q, K, V, np.arange(NOFF, N))
    mo, ml = ratd.merge(part.o, part.lse, lo.astype(np.float32), ll.astype(np.float32))
    o, lse = ref(q, K, V, np.arange(N))
    close(mo, o, 1e-4)
    close(ml, lse, 1e-4)
    # per-head budgets: head 0 reads nothing, head 1 reads 3
    b = np.full(H, N, np.int32)
    b[0], b[1] = 0, 3
    r = client.attend(s, 1, q, top_k=N, top_k_per_head=b, want_topk=True)
    assert r.lse[0] == -np.inf and not r.o[0].any() and r.counts[0] == 0 and r.counts[1] == 3
    close(r.o[2:], ref(q, K, V, np.arange(N))[0][2:], 1e-4)
    # results into caller buffers
    oo, ol = np.zeros((H, D), np.float32), np.zeros(H, np.float32)
    r = client.attend(s, 1, q, top_k=N, out_o=oo, out_lse=ol)
    assert r.o is oo and r.lse is ol and np.array_equal(oo, full.o)
    client.session_drop(s)
    client.session_drop(s2)


def test_train_knn_and_half_sessions(client, data):
    K, V, pos, q = data
    rng = np.random.default_rng(3)
    qt = rng.standard_normal((H, 32, D)).astype(np.float32)
    kk = 16
    knn = np.empty((H, 32, kk), np.int32)
    for h in range(H):
        knn[h] = np.argsort(-(qt[h] @ K[h // (H // G), :NOFF].T), axis=1)[:, :kk]
    s = session(client, index="graph")
    client.offload(s, 0, np.ascontiguousarray(K[:, :NOFF]), np.ascontiguousarray(V[:, :NOFF]),
                   pos[:NOFF].copy(), q_train=qt, train_knn=knn)
    client.wait_ready(s, 60000)
    r = client.attend(s, 0, q, top_k=NOFF)
    close(r.o, ref(q, K, V, np.arange(NOFF))[0], 1e-4)
    client.session_drop(s)
    # f16: numpy float16; bf16: numpy uint16 bits (the upper half of float32)
    for dt in ("f16", "bf16"):
        s = session(client, dtype=dt)
        if dt == "f16":
            k16, v16 = K.astype(np.float16), V.astype(np.float16)
            kr, vr = k16.astype(np.float32), v16.astype(np.float32)
        else:
            k16 = (K.view(np.uint32) >> 16).astype(np.uint16)
            v16 = (V.view(np.uint32) >> 16).astype(np.uint16)
            kr = (k16.astype(np.uint32) << 16).view(np.float32)
            vr = (v16.astype(np.uint32) << 16).view(np.float32)
        client.offload(s, 0, k16, v16, pos.copy())
        r = client.attend(s, 0, q, top_k=N)
        close(r.o, ref(q, kr, vr, np.arange(N))[0], 2e-3)
        client.session_drop(s)


def test_daemon_errors_and_stats(client, data):
    K, V, pos, q = data
    s = session(client)
    client.session_drop(s)
    with pytest.raises(ratd.RatdError) as e:
        client.session_drop(s)
    assert e.value.name == "RA_ENOSESSION" and e.value.status == 4 and "session" in e.value.message
    st = client.stats()
    assert st["ops"]["create"]["count"] >= 1 and st["ops"]["drop"]["errors"] >= 1
    assert set(st) >= {"sessions", "requests", "mem_used", "uptime_s", "ops"}


def test_bad_inputs(client, data):
    """Issue 11's list, one by one, plus their neighbours."""
    K, V, pos, q = data
    s = session(client)
    fill(client, s, K, V, pos)
    bf = session(client, dtype="bf16")
    with pytest.raises(TypeError, match=r"q must be float32, got numpy float64.*astype\(np.float32\)"):
        client.attend(s, 1, q.astype(np.float64), top_k=10)
    with pytest.raises(ValueError, match=r"q has shape \(1, 64\), expected \[n_q_heads=8\]\[head_dim=64\]"):
        client.attend(s, 1, q[:1], top_k=10)
    with pytest.raises(ValueError, match=r"v has shape \(4, 1, 64\), expected \[n_kv_heads=4\]\[n_tokens=4\]"):
        client.append(s, 1, K[:, :4].copy(), V[:, :1].copy(), pos[:4].copy())
    with pytest.raises(TypeError, match=r"k must be uint16 \(bf16 bits\), got numpy float16"):
        client.offload(bf, 0, K.astype(np.float16), V.astype(np.float16), pos.copy())
    with pytest.raises(TypeError, match=r"pos must be int64, got numpy int32"):
        client.append(s, 1, K[:, :4].copy(), V[:, :4].copy(), pos[:4].astype(np.int32))
    with pytest.raises(TypeError, match="graph_degre"):
        session(client, graph_degre=32)
    with pytest.raises(ValueError, match=r"dtype 'fp16' is not one of 'f32', 'f16', 'bf16' \(did you mean 'f16'\?\)"):
        session(client, dtype="fp16")
    # neighbours
    with pytest.raises(ValueError, match="not C-contiguous"):
        client.attend(s, 1, np.ones((H, 2 * D), np.float32)[:, ::2], top_k=10)
    with pytest.raises(TypeError, match="numpy array or a torch tensor, got list"):
        client.attend(s, 1, q.tolist(), top_k=10)
    with pytest.raises(ValueError, match=r"layer = 2 is outside \[0, 1\]"):
        client.attend(s, 2, q, top_k=10)
    with pytest.raises(ValueError, match=r"top_k = 0 is outside"):
        client.attend(s, 1, q, top_k=0)
    with pytest.raises(ValueError, match=r"top_k = 8193 is outside \[1, 8192\]"):
        client.attend(s, 1, q, top_k=8193)
    with pytest.raises(ValueError, match="outside"):
        client.attend(s, 1, q, top_k=2**32 + 5)  # would wrap to 5 in a C int
    with pytest.raises(ValueError, match="scale"):
        client.attend(s, 1, q, top_k=10, scale=float("nan"))
    with pytest.raises(TypeError, match="want_topk must be a bool"):
        client.attend(s, 1, q, top_k=10, want_topk=1)
    with pytest.raises(TypeError, match="session must be the Session"):
        client.attend(int(s), 1, q, top_k=10)
    with pytest.raises(ValueError, match=r"top_k_per_head holds values in \[-1, 10\]"):
        client.attend(s, 1, q, top_k=10, top_k_per_head=np.array([-1] + [10] * 7, np.int32))
    with pytest.raises(ValueError, match="out_o has shape"):
        client.attend(s, 1, q, top_k=10, out_o=np.zeros((H, D - 1), np.float32))
    ro = np.zeros((H, D), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out_o is read-only"):
        client.attend(s, 1, q, top_k=10, out_o=ro)
    with pytest.raises(ValueError, match="train_knn holds values in"):
        client.offload(s, 0, K[:, :8].copy(), V[:, :8].copy(), pos[:8].copy(),
                       q_train=np.zeros((H, 2, D), np.float32), train_knn=np.full((H, 2, 4), 8, np.int32))
    with pytest.raises(ValueError, match="q_train has shape"):
        client.offload(s, 0, K[:, :8].copy(), V[:, :8].copy(), pos[:8].copy(),
                       q_train=np.zeros((H - 1, 2, D), np.float32))
    with pytest.raises(TypeError, match="n_layers must be an int"):
        client.create_session(n_layers=1.5, n_q_heads=H, n_kv_heads=G, head_dim=D)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        client.create_session(n_layers=1, n_q_heads=6, n_kv_heads=4, head_dim=D)
    with pytest.raises(ValueError, match="index 'hnsw32'"):
        session(client, index="hnsw32")
    with pytest.raises(ValueError, match="endpoint"):
        ratd.Client("http://localhost:1")
    # nothing above reached the daemon: the session still answers exactly
    r = client.attend(s, 1, q, top_k=N)
    close(r.o, ref(q, K, V, np.arange(N))[0], 1e-4)
    client.session_drop(s)
    client.session_drop(bf)
    client.close()
    with pytest.raises(ratd.RatdError, match="closed") as e:
        client.attend(s, 1, q, top_k=10)
    assert e.value.name == "RA_ECLOSED"


def test_session_tokens(daemon, client, data):
    """A session belongs to its token: another Client gets it with the Session (which
    carries the token); an id without the token is an unknown session; Stats counts."""
    K, V, pos, q = data
    s = session(client)
    assert isinstance(s.token, bytes) and len(s.token) == 16
    fill(client, s, K, V, pos)
    r1 = client.attend(s, 1, q, top_k=N)
    with ratd.Client(daemon[0], timeout_ms=20000) as other:
        r2 = other.attend(s, 1, q, top_k=N)  # adopts the token the Session carries
        assert np.array_equal(r1.o, r2.o) and np.array_equal(r1.lse, r2.lse)
        bare = ratd.Session(int(s), s.n_layers, s.n_q_heads, s.n_kv_heads, s.head_dim, s.dtype)
        with ratd.Client(daemon[0], timeout_ms=20000) as third:
            with pytest.raises(ratd.RatdError) as e:
                third.attend(bare, 1, q, top_k=N)
            assert e.value.status == 4 and "never created" in str(e.value)
            assert third.stats()["tokens_refused"] >= 1
        assert client.hello()["instance_id"] == other.hello()["instance_id"] != 0
    client.session_drop(s)


def test_default_endpoint_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("RATD_ENDPOINT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert ratd.default_endpoint() == "ipc://%s/ratd/ratd.sock" % tmp_path
    buf = ctypes.create_string_buffer(400)
    assert _load.load().ra_client_default_endpoint(buf, 400) == 0
    assert buf.value.decode() == ratd.default_endpoint()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert ratd.default_endpoint() == "ipc:///tmp/ratd-%d/ratd.sock" % os.geteuid()
    with pytest.raises(ValueError, match="40-character"):
        ratd.Client("ipc:///x", curve_server_key="short", curve_public_key="a" * 40,
                    curve_secret_key="b" * 40, check=False)


def test_no_daemon_is_fast(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ratd.RatdError, match="socket file does not exist") as e:
        ratd.Client("ipc://%s/none.sock" % tmp_path)
    assert e.value.name == "RA_ECLOSED"
    # a socket file nobody serves, and a tcp port nobody listens on: the Hello's own timeout
    for ep in ("tcp://127.0.0.1:9", ):
        with pytest.raises(ratd.RatdError, match=r"no ratd answered at .* within 300 ms") as e:
            ratd.Client(ep, connect_timeout_ms=300)
        assert e.value.name == "RA_ETIMEDOUT"
    with pytest.raises(ratd.RatdError, match="within 2000 ms"):
        ratd.Client("tcp://127.0.0.1:9")
    assert time.monotonic() - t0 < 5


def test_abi_check_refuses_mismatch(monkeypatch):
    lib = _load.load()
    _abi.check_abi(lib, "libx", "0.1.0")  # the real one agrees
    real = _abi.ABI_VERSION
    monkeypatch.setattr(_abi, "ABI_VERSION", real + 1)
    with pytest.raises(_abi.AbiError, match=r"libx has client ABI %d \(ratd 0.1.0\) but this ratd package \(0.1.0\) speaks ABI %d" % (real, real + 1)):
        _abi.check_abi(lib, "libx", "0.1.0")
    monkeypatch.setattr(_abi, "ABI_VERSION", real)

    class Out2(ctypes.Structure):  # ra_attend_out with a field more than the library's
        _fields_ = _abi.AttendOut._fields_ + [("extra", ctypes.c_uint64)]

    structs = list(_abi.STRUCTS)
    structs[7] = Out2
    monkeypatch.setattr(_abi, "STRUCTS", tuple(structs))
    want = r"Out2: library %d bytes, package %d" % (ctypes.sizeof(_abi.AttendOut),
                                                     ctypes.sizeof(Out2))
    with pytest.raises(_abi.AbiError, match=want):
        _abi.check_abi(lib, "libx", "0.1.0")


def test_library_search(tmp_path):
    """RATD_LIB_DIR is exclusive: a folder without the library is an ImportError naming it."""
    env = dict(os.environ, RATD_LIB_DIR=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", "import ratd; ratd.Client('ipc:///x')"],
                       env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "libratd-client not found (searched RATD_LIB_DIR=%s" % tmp_path in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-c", "import ratd, numpy; print(ratd.__version__); "
                        "print(ratd.merge(*[numpy.zeros((1, 2), 'f4'), numpy.zeros(1, 'f4')] * 2)[1])"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("0.1.0"), p.stderr  # no library needed


def test_attend_batch_forms(daemon):
    """attend_batch and attend_batch_send give each session what its own attend gives
    (exact index), with the daemon's timings; bad batches are refused before C."""
    import numpy as np
    c = ratd.Client(daemon[0])
    rng = np.random.default_rng(5)
    sess = [c.create_session(n_layers=1, n_q_heads=4, n_kv_heads=2, head_dim=32, dtype="f32",
                             index="flat") for _ in range(3)]
    for s in sess:
        k = rng.standard_normal((2, 300, 32), dtype=np.float32)
        v = rng.standard_normal((2, 300, 32), dtype=np.float32)
        c.offload(s, 0, k, v, np.arange(300, dtype=np.int64))
    q = rng.standard_normal((3, 4, 32), dtype=np.float32)
    one = [c.attend(s, 0, q[i], top_k=20, want_topk=True) for i, s in enumerate(sess)]
    r = c.attend_batch(sess, 0, q, top_k=20, want_topk=True)
    t = c.attend_batch_send(sess, 0, q, top_k=20)
    w = c.attend_wait(t)
    assert r.o.shape == (3, 4, 32) and r.pos.shape == (3, 4, 20) and w.lse.shape == (3, 4)
    for i in range(3):
        np.testing.assert_allclose(r.o[i], one[i].o, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w.lse[i], one[i].lse, rtol=1e-5, atol=1e-6)
        assert (r.pos[i] == one[i].pos).all()
    assert r.server_us >= 0 and r.work_us >= 0 and one[0].server_us >= 0
    assert 0 <= r.task_max_us <= r.work_us
    with pytest.raises(ValueError, match="appears twice"):
        c.attend_batch([sess[0], sess[0]], 0, q[:2], top_k=20)
    with pytest.raises(ValueError, match="n_sessions"):
        c.attend_batch(sess, 0, q[:2], top_k=20)
    other = c.create_session(n_layers=1, n_q_heads=8, n_kv_heads=2, head_dim=32, dtype="f32")
    with pytest.raises(ValueError, match="must share"):
        c.attend_batch([sess[0], other], 0, q[:2], top_k=20)
    c.close()
