"""ratd.Client: one connection to one ratd (or a comma-separated list of daemons), the
calls of include/ratd/client.h with the same names less the ra_client_ prefix.

Every argument is bounded and checked before it reaches C (see _arrays): integers are
range-checked (ctypes would wrap them), tensors must have the session's dtype and the
exact shape of the layout in client.h, and results come back as numpy arrays or torch
tensors like the caller's q. Errors: TypeError / ValueError for bad arguments (nothing
was sent), RatdError for a refusal by the library or the daemon (.status, .name,
.message: the daemon's own text). A Client serialises its calls with a lock (the C
object is not thread-safe); for parallel traffic open one Client per thread."""

import ctypes
import os
import threading
from collections import namedtuple

from . import _abi, _arrays, _load
from ._arrays import DTYPE_NAMES

STATUS = ("RA_OK", "RA_EINVAL", "RA_ENOMEM", "RA_ETIMEDOUT", "RA_ENOSESSION", "RA_ENOLAYER",
          "RA_ESHAPE", "RA_EPROTO", "RA_EVERSION", "RA_ETOOBIG", "RA_ECLOSED", "RA_EIO",
          "RA_EBUSY", "RA_ENOTSUP", "RA_ENONFINITE", "RA_EDEVICE", "RA_EINTERNAL", "RA_EEXIST",
          "RA_ESTATE")
RA_ETIMEDOUT, RA_ECLOSED = 3, 10
INDEX_KINDS = {"graph": 0, "flat": 1, "ivf": 2, "hnsw": 3, "pscan": 5}
CAPABILITIES = {"f16": 1, "bf16": 2, "graph": 4, "faiss": 8, "topk": 16, "numa": 32,
                "batch": 64, "graph_adj": 128}
INT32_MAX = 2**31 - 1
DEFAULT_TIMEOUT_MS = 30000
DEFAULT_CONNECT_TIMEOUT_MS = 2000


class RatdError(Exception):
    """A call refused by libratd-client or the daemon: .status (the ra_status value),
    .name ("RA_E..."), .message (the daemon's text, or the library's)."""

    def __init__(self, status, message):
        self.status = status
        self.name = STATUS[status] if 0 <= status < len(STATUS) else "RA_E?"
        self.message = message
        super().__init__("%s: %s" % (self.name, message))


AttendResult = namedtuple("AttendResult",
                          "o lse pos scores counts server_us work_us task_max_us",
                          defaults=(None, None, None))
AttendResult.__doc__ = """Partial attention of one layer: o [n_q_heads][head_dim] float32,
lse [n_q_heads] float32 (natural log, -inf for a head that read no key); with
want_topk also pos [n_q_heads][top_k] int64 (-1 pads), scores (float32, -inf pads) and
counts [n_q_heads] int32; None otherwise. Arrays of the kind (and device) of q; a
batched attend puts a leading [n_sessions] on each. server_us: the daemon's time from the
request's arrival to its reply; work_us: the sum of its task times; task_max_us: the
longest of those tasks (ints)."""


def dtype_value(dtype):
    """'f32' | 'f16' | 'bf16' (or a numpy/torch float dtype) -> the ra_dtype value."""
    if isinstance(dtype, str):
        if dtype in DTYPE_NAMES:
            return DTYPE_NAMES[dtype]
        hint = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "half": "f16",
                "bfloat16": "bf16"}.get(dtype.lower())
        raise ValueError("dtype %r is not one of 'f32', 'f16', 'bf16'%s" % (
            dtype, " (did you mean %r?)" % hint if hint else ""))
    name = str(dtype).replace("torch.", "")
    for k, v in (("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16")):
        if name == k:
            return DTYPE_NAMES[v]
    raise ValueError("dtype %r is not one of 'f32', 'f16', 'bf16' (or a float32/float16/"
                     "bfloat16 numpy or torch dtype)" % (dtype,))


def _int(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        if hasattr(v, "__index__") and not isinstance(v, bool):
            v = v.__index__()
        else:
            raise TypeError("%s must be an int, got %s" % (name, type(v).__name__))
    if v < lo or v > hi:
        raise ValueError("%s = %d is outside [%d, %d]" % (name, v, lo, hi))
    return v


def _float(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("%s must be a number, got %s" % (name, type(v).__name__))
    v = float(v)
    if not (lo <= v <= hi):  # also refuses NaN
        raise ValueError("%s = %r is outside [%g, %g]" % (name, v, lo, hi))
    return v


class Session(int):
    """A session id (an int) that also carries the session's shape, so that inputs are
    checked against it: n_layers, n_q_heads, n_kv_heads, head_dim, dtype ('f32', 'f16',
    'bf16'), and its token (16 bytes: whoever holds it owns the session; None for a
    sharded Client's session). Returned by Client.create_session; any Client connected to
    the same daemon may use it (the token travels with it)."""

    def __new__(cls, sid, n_layers, n_q_heads, n_kv_heads, head_dim, dtype, token=None):
        s = int.__new__(cls, sid)
        s.n_layers, s.n_q_heads, s.n_kv_heads, s.head_dim = n_layers, n_q_heads, n_kv_heads, head_dim
        s.dtype = dtype
        s.token = token
        return s

    def __repr__(self):
        return "Session(%d, layers=%d, q_heads=%d, kv_heads=%d, head_dim=%d, dtype=%s)" % (
            int(self), self.n_layers, self.n_q_heads, self.n_kv_heads, self.head_dim, self.dtype)


class Ticket(int):
    """An outstanding asynchronous attend (Client.attend_send)."""


def _check_endpoints(endpoint):
    if not isinstance(endpoint, str) or not endpoint:
        raise TypeError("endpoint must be a non-empty str such as 'ipc:///tmp/ratd.sock'")
    if len(endpoint) > 16 * 512:
        raise ValueError("endpoint is %d characters long" % len(endpoint))
    parts = endpoint.split(",")
    if len(parts) > 16:
        raise ValueError("endpoint lists %d daemons, at most 16" % len(parts))
    for p in parts:
        if not (p.startswith("ipc://") or p.startswith("tcp://")) or len(p) >= 512:
            raise ValueError("endpoint %r must be 'ipc:///path' or 'tcp://host:port' (under 512 "
                             "characters; several separated by commas)" % p)
    return parts


def default_endpoint():
    """ratd's own default: ipc://$XDG_RUNTIME_DIR/ratd/ratd.sock, else
    ipc:///tmp/ratd-<uid>/ratd.sock (private directories that ratd creates 0700);
    $RATD_ENDPOINT wins over both."""
    if os.environ.get("RATD_ENDPOINT"):
        return os.environ["RATD_ENDPOINT"]
    rt = os.environ.get("XDG_RUNTIME_DIR")
    if rt and len(rt) < 300 and os.access(rt, os.W_OK):
        return "ipc://%s/ratd/ratd.sock" % rt
    return "ipc:///tmp/ratd-%d/ratd.sock" % os.geteuid()


def _curve_key(name, k):
    if k is None:
        return None
    if isinstance(k, str):
        k = k.encode()
    if not isinstance(k, (bytes, bytearray)) or len(k) != 40:
        raise ValueError("%s must be a 40-character Z85 key as ratd --curve-keygen prints it"
                         % name)
    return bytes(k)


class Client:
    """A connection to ratd.

    Client(endpoint=None, *, timeout_ms=30000, connect_timeout_ms=2000, max_inflight=64,
    check=True): endpoint "ipc:///path" or "tcp://host:port" (a comma-separated list
    shards layers over several daemons; None: default_endpoint()). With check (the
    default) the constructor says Hello within connect_timeout_ms, so an absent daemon is
    a RatdError at once (RA_ETIMEDOUT, or RA_ECLOSED for an ipc:// socket file that does
    not exist) and the daemon's limits are known (.info) and enforced before sending.
    timeout_ms bounds every later wait."""

    def __init__(self, endpoint=None, *, timeout_ms=DEFAULT_TIMEOUT_MS,
                 connect_timeout_ms=DEFAULT_CONNECT_TIMEOUT_MS, max_inflight=64, check=True,
                 curve_server_key=None, curve_public_key=None, curve_secret_key=None):
        self._c = None
        keys = [_curve_key(n, k) for n, k in (("curve_server_key", curve_server_key),
                                              ("curve_public_key", curve_public_key),
                                              ("curve_secret_key", curve_secret_key))]
        if any(keys) and not all(keys):
            raise ValueError("CURVE needs curve_server_key, curve_public_key and "
                             "curve_secret_key together")
        endpoint = default_endpoint() if endpoint is None else endpoint
        parts = _check_endpoints(endpoint)
        self.endpoint = endpoint
        self._timeout = _int("timeout_ms", timeout_ms, 1, INT32_MAX)
        connect_timeout_ms = _int("connect_timeout_ms", connect_timeout_ms, 1, INT32_MAX)
        max_inflight = _int("max_inflight", max_inflight, 1, 1 << 20)
        self._lib = _load.load()
        self._lock = threading.Lock()
        self._tickets = {}
        self._known = set()  # sessions whose token this Client holds
        self._sharded = len(parts) > 1
        self.info = None
        if check:
            for p in parts:
                if p.startswith("ipc://") and not os.path.exists(p[len("ipc://"):]):
                    raise RatdError(RA_ECLOSED, "no ratd at %s: the socket file does not exist "
                                    "(start one: ratd --endpoint %s)" % (p, p))
        o = _abi.ClientOpts()
        self._lib.ra_client_opts_default(ctypes.byref(o))
        o.timeout_ms, o.max_inflight = self._timeout, max_inflight
        o.curve_server_key, o.curve_public_key, o.curve_secret_key = keys
        h = ctypes.c_void_p()
        st = self._lib.ra_client_open(ctypes.byref(h), endpoint.encode(), ctypes.byref(o))
        if st:
            raise RatdError(st, "cannot open %s (a malformed endpoint or CURVE key?)" % endpoint)
        self._c = h
        if check:
            self.set_timeout(connect_timeout_ms)
            try:
                self.info = self.hello()
            except RatdError as e:
                self.close()
                if e.status == RA_ETIMEDOUT:
                    raise RatdError(e.status, "no ratd answered at %s within %d ms (is it "
                                    "running? start one: ratd --endpoint %s; or pass "
                                    "connect_timeout_ms)" % (endpoint, connect_timeout_ms,
                                                             parts[0])) from None
                raise
            self.set_timeout(self._timeout)

    # ---- plumbing -------------------------------------------------------------------

    def _h(self):
        if not self._c:
            raise RatdError(RA_ECLOSED, "this Client is closed")
        return self._c

    def _check(self, st):
        if st:
            msg = self._lib.ra_client_errmsg(self._c) or b""
            raise RatdError(st, msg.decode(errors="replace") or _strerror(self._lib, st))

    def close(self):
        """Closes the connection (outstanding tickets are abandoned). Idempotent."""
        if getattr(self, "_c", None):
            with self._lock:
                self._lib.ra_client_close(self._c)
                self._c = None
                self._tickets.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def errmsg(self):
        """Message of the last failed call ("" after a success)."""
        with self._lock:
            return (self._lib.ra_client_errmsg(self._h()) or b"").decode(errors="replace")

    def set_timeout(self, timeout_ms):
        """Bound (ms, >= 1) of every later wait."""
        timeout_ms = _int("timeout_ms", timeout_ms, 1, INT32_MAX)
        with self._lock:
            self._lib.ra_client_set_timeout(self._h(), timeout_ms)

    def set_spin_us(self, spin_us):
        """Poll up to spin_us microseconds (0..100000) for each reply before sleeping:
        saves the thread's wake-up (~50 us an Attend on a KVM guest) at the cost of a core
        while it spins. 0 (the default) sleeps at once."""
        spin_us = _int("spin_us", spin_us, 0, 100000)
        with self._lock:
            self._lib.ra_client_set_spin_us(self._h(), spin_us)

    def _limit(self, name):
        return self.info["limits"][name] if self.info else None

    def _session(self, session):
        if not isinstance(session, Session):
            raise TypeError("session must be the Session that create_session returned (it "
                            "carries the shape inputs are checked against), got %s"
                            % type(session).__name__)
        sid = int(session)
        if sid not in self._known and session.token is not None and not self._sharded:
            t = _abi.SessionToken()
            t.bytes[:] = list(session.token)
            with self._lock:  # another Client's session: this one learns its token
                self._check(self._lib.ra_client_session_adopt(self._h(), sid, ctypes.byref(t)))
                self._known.add(sid)
        return session

    def _layer(self, s, layer):
        return _int("layer", layer, 0, s.n_layers - 1)

    # ---- Hello / sessions -------------------------------------------------------------

    def hello(self):
        """Exchanges protocol versions with every daemon; returns a dict: protocol_version,
        capabilities (int, RA_CAP_* bits) and caps (their names), server_version,
        workers, numa_node, limits (max_frame_bytes, ..., max_queries)."""
        info = _abi.ServerInfo()
        with self._lock:
            self._check(self._lib.ra_client_hello(self._h(), ctypes.byref(info)))
        lim = {f: getattr(info.limits, f) for f, _ in _abi.ServerLimits._fields_}
        return {"protocol_version": info.protocol_version, "capabilities": info.capabilities,
                "caps": [k for k, b in CAPABILITIES.items() if info.capabilities & b],
                "server_version": info.server_version.decode(errors="replace"),
                "workers": info.workers, "numa_node": info.numa_node, "limits": lim,
                "instance_id": info.instance_id}

    def create_session(self, *, n_layers, n_q_heads, n_kv_heads, head_dim, dtype="f16",
                       index="pscan", graph_knn=0, graph_degree=0, graph_build_ef=0,
                       graph_entries=0, n_train=0, ivf_nlist=0, hnsw_m=0, threads=0, seed=0):
        """Creates a session on the daemon(s) and returns its Session. n_q_heads must be a
        multiple of n_kv_heads (GQA); dtype 'f32' | 'f16' | 'bf16' is how K and V are
        stored and sent; index 'graph' | 'flat' | 'ivf' | 'hnsw' | 'pscan'; the index options are
        those of ra_client_index_opts (0: the daemon's default)."""
        lim = self._limit
        n_layers = _int("n_layers", n_layers, 1, lim("max_layers") or INT32_MAX)
        n_q_heads = _int("n_q_heads", n_q_heads, 1, lim("max_heads") or INT32_MAX)
        n_kv_heads = _int("n_kv_heads", n_kv_heads, 1, n_q_heads)
        if n_q_heads % n_kv_heads:
            raise ValueError("n_q_heads (%d) must be a multiple of n_kv_heads (%d)" % (n_q_heads, n_kv_heads))
        head_dim = _int("head_dim", head_dim, 1, lim("max_dim") or INT32_MAX)
        dt = dtype_value(dtype)
        if not isinstance(index, str) or index not in INDEX_KINDS:
            raise ValueError("index %r is not one of %s" % (index, ", ".join(map(repr, INDEX_KINDS))))
        d = _abi.SessionDesc()
        self._lib.ra_session_desc_init(ctypes.byref(d))
        d.n_layers, d.n_q_heads, d.n_kv_heads, d.head_dim, d.dtype = n_layers, n_q_heads, n_kv_heads, head_dim, dt
        d.index.kind = INDEX_KINDS[index]
        for f, v in (("graph_knn", graph_knn), ("graph_degree", graph_degree),
                     ("graph_build_ef", graph_build_ef), ("graph_entries", graph_entries),
                     ("n_train", n_train), ("ivf_nlist", ivf_nlist), ("hnsw_m", hnsw_m),
                     ("threads", threads)):
            setattr(d.index, f, _int(f, v, 0, INT32_MAX))
        d.index.seed = _int("seed", seed, 0, 2**64 - 1)
        sid = ctypes.c_uint64()
        with self._lock:
            self._check(self._lib.ra_client_session_create(self._h(), ctypes.byref(d), ctypes.byref(sid)))
            token = None
            t = _abi.SessionToken()
            if not self._sharded and not self._lib.ra_client_session_token(self._h(), sid.value,
                                                                           ctypes.byref(t)):
                token = bytes(t.bytes)
            self._known.add(sid.value)
        name = [k for k, v in DTYPE_NAMES.items() if v == dt][0]
        return Session(sid.value, n_layers, n_q_heads, n_kv_heads, head_dim, name, token)

    def session_drop(self, session):
        """Frees the session and everything of it on the daemon(s)."""
        s = self._session(session)
        with self._lock:
            self._check(self._lib.ra_client_session_drop(self._h(), int(s)))
            self._known.discard(int(s))

    drop_session = session_drop

    # ---- tokens -------------------------------------------------------------------------

    def _batch(self, s, k, v, pos, keep):
        if not isinstance(k, (tuple, list)) and hasattr(k, "shape") and len(k.shape) == 3:
            n = k.shape[1]
        else:
            _arrays.kind_of("k", k)
            raise ValueError("k has shape %s, expected [n_kv_heads=%d][n_tokens][head_dim=%d]"
                             % (tuple(k.shape), s.n_kv_heads, s.head_dim))
        n = _int("n_tokens (k.shape[1])", int(n), 0, self._limit("max_tokens") or 2**40)
        shape, dims = (s.n_kv_heads, n, s.head_dim), ("n_kv_heads", "n_tokens", "head_dim")
        a_k = _arrays.check("k", k, s.dtype, shape, dims)
        a_v = _arrays.check("v", v, s.dtype, shape, dims)
        a_p = _arrays.check("pos", pos, "i64", (n,), ("n_tokens",))
        fb = self._limit("max_frame_bytes")
        es = 4 if s.dtype == "f32" else 2
        if fb and s.n_kv_heads * n * s.head_dim * es > fb:
            raise ValueError("K of %d tokens is %d bytes, over the daemon's max_frame_bytes (%d): "
                             "send fewer tokens per call" % (n, s.n_kv_heads * n * s.head_dim * es, fb))
        keep += [a_k, a_v, a_p]
        b = _abi.KvBatch()
        b.n_kv_heads, b.head_dim, b.dtype, b.n_tokens = s.n_kv_heads, s.head_dim, DTYPE_NAMES[s.dtype], n
        b.k, b.v, b.pos = a_k.ptr or None, a_v.ptr or None, a_p.ptr or None
        return b, n

    def offload(self, session, layer, k, v, pos, *, q_train=None, train_knn=None,
                graph_adj=None, graph_entries=None):
        """Prefill: stores one layer's tokens and starts its index build in the background.
        k, v [n_kv_heads][n_tokens][head_dim] of the session's dtype (torch bf16, or numpy
        uint16 bf16 bits, for a bf16 session), pos [n_tokens] int64; q_train: training
        queries [n_q_heads][n_queries][head_dim] float32; train_knn: optional exact top-K
        token indices of each training query [n_q_heads][n_queries][K] int32 (0..n_tokens-1,
        -1 pads), e.g. from the GPU, so that ratd skips its own kNN. graph_adj, graph_entries:
        optional prebuilt graph (daemon capability "graph_adj"), int32 [n_kv_heads][n_tokens][M]
        token indices (-1 pads; M 1..255) and [n_kv_heads][n_entries] (1..1024), installed
        instead of ratd's own build; the daemon checks it (RatdError EINVAL naming the first
        bad head, row and slot, nothing stored)."""
        s = self._session(session)
        layer = self._layer(s, layer)
        keep = []
        b, n = self._batch(s, k, v, pos, keep)
        if train_knn is not None and q_train is None:
            raise ValueError("train_knn needs q_train (the lists belong to the training queries)")
        if q_train is not None:
            shp = tuple(getattr(q_train, "shape", ()))
            if len(shp) != 3:
                _arrays.kind_of("q_train", q_train)
                raise ValueError("q_train has shape %s, expected [n_q_heads=%d][n_queries][head_dim=%d]"
                                 % (shp, s.n_q_heads, s.head_dim))
            nq = _int("n_queries (q_train.shape[1])", int(shp[1]), 0, self._limit("max_queries") or INT32_MAX)
            a_q = _arrays.check("q_train", q_train, "f32", (s.n_q_heads, nq, s.head_dim),
                                ("n_q_heads", "n_queries", "head_dim"))
            keep.append(a_q)
            b.n_q_heads, b.n_queries, b.q_train = s.n_q_heads, nq, a_q.ptr or None
            if train_knn is not None:
                shk = tuple(getattr(train_knn, "shape", ()))
                if len(shk) != 3:
                    _arrays.kind_of("train_knn", train_knn)
                    raise ValueError("train_knn has shape %s, expected [n_q_heads][n_queries][K]" % (shk,))
                kk = _int("K (train_knn.shape[2])", int(shk[2]), 1, max(1, min(n, 1024)))
                a_t = _arrays.check("train_knn", train_knn, "i32", (s.n_q_heads, nq, kk),
                                    ("n_q_heads", "n_queries", "K"))
                _arrays.values_within("train_knn", a_t.obj, -1, n - 1)
                keep.append(a_t)
                b.train_knn, b.train_knn_k = a_t.ptr or None, kk
        if (graph_adj is None) != (graph_entries is None):
            raise ValueError("graph_adj and graph_entries come together")
        if graph_adj is not None:
            sha = tuple(getattr(graph_adj, "shape", ()))
            she = tuple(getattr(graph_entries, "shape", ()))
            if len(sha) != 3 or len(she) != 2:
                _arrays.kind_of("graph_adj", graph_adj)
                _arrays.kind_of("graph_entries", graph_entries)
                raise ValueError("graph_adj has shape %s and graph_entries %s, expected "
                                 "[n_kv_heads][n_tokens][M] and [n_kv_heads][n_entries]" % (sha, she))
            m = _int("M (graph_adj.shape[2])", int(sha[2]), 1, 255)
            ne = _int("n_entries (graph_entries.shape[1])", int(she[1]), 1, 1024)
            a_g = _arrays.check("graph_adj", graph_adj, "i32", (s.n_kv_heads, n, m),
                                ("n_kv_heads", "n_tokens", "M"))
            a_e = _arrays.check("graph_entries", graph_entries, "i32", (s.n_kv_heads, ne),
                                ("n_kv_heads", "n_entries"))
            keep += [a_g, a_e]
            b.graph_adj, b.graph_degree = a_g.ptr or None, m
            b.graph_entries, b.graph_n_entries = a_e.ptr or None, ne
        with self._lock:
            self._check(self._lib.ra_client_offload(self._h(), int(s), layer, ctypes.byref(b)))

    def append(self, session, layer, k, v, pos):
        """Decode: tokens leaving the GPU window (same layouts as offload); searchable by
        the next attend."""
        s = self._session(session)
        layer = self._layer(s, layer)
        keep = []
        b, _ = self._batch(s, k, v, pos, keep)
        with self._lock:
            self._check(self._lib.ra_client_append(self._h(), int(s), layer, ctypes.byref(b)))

    # ---- attend -------------------------------------------------------------------------

    def _req(self, s, q, top_k, effort, scale, want_topk, top_k_per_head, keep):
        a_q = _arrays.check("q", q, "f32", (s.n_q_heads, s.head_dim), ("n_q_heads", "head_dim"))
        top_k = _int("top_k", top_k, 1, self._limit("max_top_k") or INT32_MAX)
        r = _abi.AttendReq()
        r.n_q_heads, r.head_dim, r.q, r.top_k = s.n_q_heads, s.head_dim, a_q.ptr, top_k
        r.effort = _int("effort", effort, 0, INT32_MAX)
        r.scale = _float("scale", scale, 0.0, 3.0e38)
        if not isinstance(want_topk, bool):
            raise TypeError("want_topk must be a bool")
        r.want_topk = int(want_topk)
        keep.append(a_q)
        if top_k_per_head is not None:
            a_t = _arrays.check("top_k_per_head", top_k_per_head, "i32", (s.n_q_heads,), ("n_q_heads",))
            _arrays.values_within("top_k_per_head", a_t.obj, 0, top_k)
            keep.append(a_t)
            r.top_k_per_head = a_t.ptr
        return r, a_q

    def _outs(self, kind, H, D, K, want, out_o, out_lse, keep, B=None):
        out = _abi.AttendOut()
        lead, names = ((), ()) if B is None else ((B,), ("n_sessions",))
        if out_o is not None:
            o = _arrays.check_out("out_o", out_o, lead + (H, D), names + ("n_q_heads", "head_dim")).obj
        else:
            o = _arrays.empty(kind, lead + (H, D), "f32")
        if out_lse is not None:
            lse = _arrays.check_out("out_lse", out_lse, lead + (H,), names + ("n_q_heads",)).obj
        else:
            lse = _arrays.empty(kind, lead + (H,), "f32")
        res = {"o": o, "lse": lse, "pos": None, "scores": None, "counts": None}
        out.o, out.lse = _arrays.address(o), _arrays.address(lse)
        if want:
            res["pos"] = _arrays.empty(kind, lead + (H, K), "i64")
            res["scores"] = _arrays.empty(kind, lead + (H, K), "f32")
            res["counts"] = _arrays.empty(kind, lead + (H,), "i32")
            out.pos = _arrays.address(res["pos"])
            out.scores = _arrays.address(res["scores"])
            out.counts = _arrays.address(res["counts"])
        keep.append(res)
        return out, res

    @staticmethod
    def _result(res, kind, device, given, out):
        moved = {k: (v if v is None or k in given else _arrays.to_caller(kind, v, device))
                 for k, v in res.items()}
        return AttendResult(**moved, server_us=int(out.server_us), work_us=int(out.work_us),
                            task_max_us=int(out.task_max_us))

    def attend(self, session, layer, q, *, top_k, effort=0, scale=0.0, want_topk=False,
               top_k_per_head=None, out_o=None, out_lse=None):
        """Partial attention over the offloaded tokens of one layer, per query head.
        q [n_q_heads][head_dim] float32 (numpy or torch; CUDA tensors are copied to the
        host and the results come back on q's device); top_k in 1..limits.max_top_k;
        effort: the search's candidate list (0: the daemon's default, 2 top_k grown with
        the keys as (n/32768)^0.4); scale: softmax scale
        (0: 1/sqrt(head_dim)); top_k_per_head: int32 [n_q_heads] budgets in 0..top_k;
        out_o/out_lse: optional host buffers to write into. Returns an AttendResult."""
        s = self._session(session)
        layer = self._layer(s, layer)
        keep = []
        r, a_q = self._req(s, q, top_k, effort, scale, want_topk, top_k_per_head, keep)
        out, res = self._outs(a_q.kind, s.n_q_heads, s.head_dim, r.top_k, want_topk, out_o, out_lse, keep)
        with self._lock:
            self._check(self._lib.ra_client_attend(self._h(), int(s), layer, ctypes.byref(r),
                                                   ctypes.byref(out)))
        given = {k for k, v in (("o", out_o), ("lse", out_lse)) if v is not None}
        return self._result(res, a_q.kind, a_q.device, given, out)

    def attend_send(self, session, layer, q, *, top_k, effort=0, scale=0.0, want_topk=False,
                    top_k_per_head=None):
        """Sends an attend now (q is copied before return) and returns a Ticket for
        attend_wait; other calls may be made in between."""
        s = self._session(session)
        layer = self._layer(s, layer)
        keep = []
        r, a_q = self._req(s, q, top_k, effort, scale, want_topk, top_k_per_head, keep)
        t = ctypes.c_uint64()
        with self._lock:
            self._check(self._lib.ra_client_attend_send(self._h(), int(s), layer, ctypes.byref(r),
                                                        ctypes.byref(t)))
            ticket = Ticket(t.value)
            self._tickets[int(ticket)] = (s.n_q_heads, s.head_dim, r.top_k, want_topk, a_q.kind,
                                          a_q.device, None)
        return ticket

    def attend_wait(self, ticket, timeout_ms=-1, *, out_o=None, out_lse=None):
        """Waits for the reply of `ticket` (timeout_ms < 0: the client's timeout). On
        RA_ETIMEDOUT the ticket stays valid (wait again or attend_cancel); any other
        outcome consumes it. Returns an AttendResult."""
        timeout_ms = _int("timeout_ms", timeout_ms, -1, INT32_MAX)
        with self._lock:
            meta = self._tickets.get(int(ticket)) if isinstance(ticket, int) else None
            if meta is None:
                raise ValueError("unknown ticket %r (already waited for, cancelled, or from "
                                 "another Client)" % (ticket,))
            H, D, K, want, kind, device, B = meta
            keep = []
            out, res = self._outs(kind, H, D, K, want, out_o, out_lse, keep, B)
            st = self._lib.ra_client_attend_wait(self._h(), int(ticket), ctypes.byref(out), timeout_ms)
            if st != RA_ETIMEDOUT:
                del self._tickets[int(ticket)]
            self._check(st)
        given = {k for k, v in (("o", out_o), ("lse", out_lse)) if v is not None}
        return self._result(res, kind, device, given, out)

    def attend_cancel(self, ticket):
        """Forgets a ticket; its reply is discarded when it arrives."""
        with self._lock:
            if isinstance(ticket, int) and self._tickets.pop(int(ticket), None) is not None:
                self._lib.ra_client_attend_cancel(self._h(), int(ticket))

    def has_attend_batch(self):
        """True when the library has ra_client_attend_batch (several sessions' queries of
        one layer in one Attend)."""
        return _abi.has_attend_batch(self._lib)

    def _batch_req(self, sessions, layer, q, top_k, effort, scale, want_topk, top_k_per_head, keep):
        ss = [self._session(s) for s in sessions]
        if not ss:
            raise ValueError("sessions is empty")
        s0 = ss[0]
        for s in ss[1:]:
            if (s.n_q_heads, s.n_kv_heads, s.head_dim, s.n_layers) != \
                    (s0.n_q_heads, s0.n_kv_heads, s0.head_dim, s0.n_layers):
                raise ValueError("sessions of one attend_batch must share n_layers, n_q_heads, "
                                 "n_kv_heads and head_dim")
        if len({int(s) for s in ss}) != len(ss):
            raise ValueError("a session appears twice in one attend_batch")
        layer = self._layer(s0, layer)
        B, H, D = len(ss), s0.n_q_heads, s0.head_dim
        a_q = _arrays.check("q", q, "f32", (B, H, D), ("n_sessions", "n_q_heads", "head_dim"))
        top_k = _int("top_k", top_k, 1, self._limit("max_top_k") or INT32_MAX)
        ids = (ctypes.c_uint64 * B)(*[int(s) for s in ss])
        keep += [a_q, ids]
        r = _abi.AttendBatchReq()
        r.n_sessions, r.sessions, r.n_q_heads, r.head_dim, r.q = B, ctypes.addressof(ids), H, D, a_q.ptr
        r.top_k, r.effort = top_k, _int("effort", effort, 0, INT32_MAX)
        r.scale = _float("scale", scale, 0.0, 3.0e38)
        if not isinstance(want_topk, bool):
            raise TypeError("want_topk must be a bool")
        r.want_topk = int(want_topk)
        if top_k_per_head is not None:
            a_t = _arrays.check("top_k_per_head", top_k_per_head, "i32", (H,), ("n_q_heads",))
            _arrays.values_within("top_k_per_head", a_t.obj, 0, top_k)
            keep.append(a_t)
            r.top_k_per_head = a_t.ptr
        return r, a_q, layer, (B, H, D)

    def attend_batch(self, sessions, layer, q, *, top_k, effort=0, scale=0.0, want_topk=False,
                     top_k_per_head=None, out_o=None, out_lse=None):
        """One Attend for several sessions of the same shape (continuous batching): q
        [n_sessions][n_q_heads][head_dim] float32; the other arguments as attend's
        (top_k_per_head applies to every session). Returns an AttendResult whose arrays
        have a leading [n_sessions]. An unknown session fails the whole request (the
        message names it)."""
        keep = []
        r, a_q, layer, (B, H, D) = self._batch_req(sessions, layer, q, top_k, effort, scale,
                                                   want_topk, top_k_per_head, keep)
        out, res = self._outs(a_q.kind, H, D, r.top_k, want_topk, out_o, out_lse, keep, B)
        with self._lock:
            self._check(self._lib.ra_client_attend_batch(self._h(), layer, ctypes.byref(r),
                                                         ctypes.byref(out)))
        given = {k for k, v in (("o", out_o), ("lse", out_lse)) if v is not None}
        return self._result(res, a_q.kind, a_q.device, given, out)

    def attend_batch_send(self, sessions, layer, q, *, top_k, effort=0, scale=0.0,
                          want_topk=False, top_k_per_head=None):
        """attend_batch's asynchronous form: sends now (q is copied before return) and
        returns a Ticket for attend_wait, whose result has the leading [n_sessions]."""
        keep = []
        r, a_q, layer, (B, H, D) = self._batch_req(sessions, layer, q, top_k, effort, scale,
                                                   want_topk, top_k_per_head, keep)
        t = ctypes.c_uint64()
        with self._lock:
            self._check(self._lib.ra_client_attend_batch_send(self._h(), layer, ctypes.byref(r),
                                                              ctypes.byref(t)))
            ticket = Ticket(t.value)
            self._tickets[int(ticket)] = (H, D, r.top_k, want_topk, a_q.kind, a_q.device, B)
        return ticket

    # ---- stats --------------------------------------------------------------------------

    def stats(self):
        """Daemon-wide counters (added up over the daemons): a dict with sessions, requests,
        errors, bad_messages, bytes_in, bytes_out, mem_used, mem_limit, tokens, uptime_s
        and ops {name: {count, errors, total_us, max_us}}."""
        st = _abi.ServerStats()
        with self._lock:
            self._check(self._lib.ra_client_stats(self._h(), ctypes.byref(st)))
        d = {f: getattr(st, f) for f, _ in _abi.ServerStats._fields_ if f != "ops"}
        d["ops"] = {_abi.OP_NAMES[i]: {f: getattr(st.ops[i], f) for f, _ in _abi.OpStats._fields_}
                    for i in range(_abi.RA_OP_COUNT)}
        return d

    def session_stats(self, session):
        """One session's tokens and index state: a dict with tokens, heads (layer, KV head
        pairs holding tokens), heads_ready, heads_building, bytes (its accounted memory)."""
        s = self._session(session)
        st = _abi.SessionStats()
        with self._lock:
            self._check(self._lib.ra_client_session_stats(self._h(), int(s), ctypes.byref(st)))
        return {f: getattr(st, f) for f, _ in _abi.SessionStats._fields_}

    def wait_ready(self, session, timeout_ms=0):
        """Blocks until no index build of the session runs (timeout_ms <= 0: the client's
        timeout); RatdError RA_ETIMEDOUT past it. Attend never needs this."""
        s = self._session(session)
        timeout_ms = _int("timeout_ms", timeout_ms, 0, INT32_MAX)
        with self._lock:
            self._check(self._lib.ra_client_wait_ready(self._h(), int(s), timeout_ms))


def _strerror(lib, st):
    return (lib.ra_strerror(st) or b"?").decode()


def strerror(status):
    """Text of an ra_status value."""
    return _strerror(_load.load(), _int("status", status, -INT32_MAX, INT32_MAX))


def op_name(op):
    """Name of an ra_op value ('hello', ..., 'stats'; '?' for others)."""
    return (_load.load().ra_op_name(_int("op", op, -INT32_MAX, INT32_MAX)) or b"?").decode()


def dtype_size(dtype):
    """Bytes per element of a dtype ('f32' 4, 'f16' 2, 'bf16' 2)."""
    return _load.load().ra_dtype_size(dtype_value(dtype))


def dtype_name(dtype):
    """The library's name of a dtype value or name ('f32', 'f16', 'bf16')."""
    v = dtype if isinstance(dtype, int) and not isinstance(dtype, bool) else dtype_value(dtype)
    return (_load.load().ra_dtype_name(_int("dtype", v, -INT32_MAX, INT32_MAX)) or b"?").decode()


def abi_version():
    """RA_CLIENT_ABI_VERSION of the loaded library."""
    return _load.load().ra_client_abi_version()


def library_version():
    """The project version the loaded library was built from."""
    return _load.load().ra_client_version().decode()


def library_path():
    """The file libratd-client was loaded from."""
    return _load.path()
