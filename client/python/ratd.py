"""ratd.py: a minimal ctypes binding of libratd-client for Python decoders.

It wraps include/ratd/client.h one to one (same names without the ra_client_ prefix)
so that a Hugging Face decoder can offload and attend without compiling anything.
Tensors are passed as any object with the buffer protocol (numpy arrays, array.array,
bytearray), as torch tensors in host memory (read through data_ptr(), no copy; bf16
and f16 tensors carry their bits as they are), or as a raw address (int); they must
be C-contiguous in the layouts of client.h:

    K, V       [n_kv_heads][n_tokens][head_dim]   session dtype (f32 / f16 / bf16 bits)
    positions  [n_tokens] int64
    q_train    [n_q_heads][n_queries][head_dim]   float32
    q          [n_q_heads][head_dim]              float32

Results come back as array.array objects ('f' float32, 'q' int64, 'i' int32), or are
written into caller-provided writable buffers (out_o=..., out_lse=...) to avoid copies.

The library is found through $RATD_CLIENT_LIB, then next to this file, then the
linker's search path (libratd-client.so). Errors raise RatdError with .status (the
ra_status value), .name and the daemon's message. A Client is not thread-safe (as the
C object): use one per thread.
"""

import array
import ctypes
import ctypes.util
import os

__all__ = ["Client", "RatdError", "DTYPES", "INDEX_KINDS", "STATUS"]

STATUS = {
    0: "RA_OK", 1: "RA_EINVAL", 2: "RA_ENOMEM", 3: "RA_ETIMEDOUT", 4: "RA_ENOSESSION",
    5: "RA_ENOLAYER", 6: "RA_ESHAPE", 7: "RA_EPROTO", 8: "RA_EVERSION", 9: "RA_ETOOBIG",
    10: "RA_ECLOSED", 11: "RA_EIO", 12: "RA_EBUSY", 13: "RA_ENOTSUP", 14: "RA_ENONFINITE",
    15: "RA_EDEVICE", 16: "RA_EINTERNAL", 17: "RA_EEXIST", 18: "RA_ESTATE",
}
DTYPES = {"f32": 0, "f16": 1, "bf16": 2}
DTYPE_SIZE = {0: 4, 1: 2, 2: 2}
INDEX_KINDS = {"graph": 0, "flat": 1, "ivf": 2, "hnsw": 3}
OPS = ["hello", "create", "offload", "append", "attend", "drop", "stats"]

_c_int, _c_u32, _c_u64, _c_size = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
_vp = ctypes.c_void_p


class _Opts(ctypes.Structure):
    _fields_ = [("timeout_ms", _c_int), ("max_inflight", _c_int)]


class _Limits(ctypes.Structure):
    _fields_ = [("max_frame_bytes", _c_u64), ("max_message_bytes", _c_u64),
                ("mem_limit", _c_u64), ("max_sessions", _c_u32), ("max_layers", _c_u32),
                ("max_heads", _c_u32), ("max_dim", _c_u32), ("max_top_k", _c_u32),
                ("max_tokens", _c_u32), ("max_queries", _c_u32)]


class _Info(ctypes.Structure):
    _fields_ = [("protocol_version", _c_u32), ("capabilities", _c_u32),
                ("server_version", ctypes.c_char * 32), ("workers", _c_u32),
                ("numa_node", ctypes.c_int32), ("limits", _Limits)]


class _IndexOpts(ctypes.Structure):
    _fields_ = [("kind", _c_int), ("graph_knn", _c_int), ("graph_degree", _c_int),
                ("graph_build_ef", _c_int), ("graph_entries", _c_int), ("n_train", _c_int),
                ("ivf_nlist", _c_int), ("hnsw_m", _c_int), ("threads", _c_int),
                ("seed", _c_u64)]


class _Desc(ctypes.Structure):
    _fields_ = [("n_layers", _c_int), ("n_q_heads", _c_int), ("n_kv_heads", _c_int),
                ("head_dim", _c_int), ("dtype", _c_int), ("index", _IndexOpts)]


class _Batch(ctypes.Structure):
    _fields_ = [("n_kv_heads", _c_int), ("head_dim", _c_int), ("dtype", _c_int),
                ("n_tokens", _c_size), ("k", _vp), ("v", _vp), ("pos", _vp),
                ("n_q_heads", _c_int), ("n_queries", _c_size), ("q_train", _vp),
                ("train_knn", _vp), ("train_knn_k", _c_int)]


class _Req(ctypes.Structure):
    _fields_ = [("n_q_heads", _c_int), ("head_dim", _c_int), ("q", _vp), ("top_k", _c_int),
                ("effort", _c_int), ("scale", ctypes.c_float), ("want_topk", _c_int),
                ("top_k_per_head", _vp)]


class _Out(ctypes.Structure):
    # the C struct's layout in full: the library writes server_us / work_us on success
    _fields_ = [("o", _vp), ("lse", _vp), ("pos", _vp), ("scores", _vp), ("counts", _vp),
                ("server_us", _c_u32), ("work_us", _c_u32)]


class _OpStats(ctypes.Structure):
    _fields_ = [("count", _c_u64), ("errors", _c_u64), ("total_us", _c_u64), ("max_us", _c_u64)]


class _Stats(ctypes.Structure):
    _fields_ = [("sessions", _c_u64), ("requests", _c_u64), ("errors", _c_u64),
                ("bad_messages", _c_u64), ("bytes_in", _c_u64), ("bytes_out", _c_u64),
                ("mem_used", _c_u64), ("mem_limit", _c_u64), ("tokens", _c_u64),
                ("uptime_s", ctypes.c_double), ("ops", _OpStats * 7)]


class RatdError(Exception):
    """A failed call: .status (ra_status value), .name (RA_E...), .message."""

    def __init__(self, status, message):
        self.status = status
        self.name = STATUS.get(status, "RA_?")
        self.message = message
        super().__init__("%s: %s" % (self.name, message))


def _load(path=None):
    cands = [path, os.environ.get("RATD_CLIENT_LIB"),
             os.path.join(os.path.dirname(os.path.abspath(__file__)), "libratd-client.so"),
             ctypes.util.find_library("ratd-client"), "libratd-client.so.1"]
    err = None
    for c in cands:
        if not c:
            continue
        try:
            lib = ctypes.CDLL(c)
            break
        except OSError as e:
            err = e
    else:
        raise OSError("libratd-client not found (set RATD_CLIENT_LIB): %s" % err)
    P = ctypes.POINTER
    sig = {
        "ra_client_opts_default": (None, [P(_Opts)]),
        "ra_client_open": (_c_int, [P(_vp), ctypes.c_char_p, P(_Opts)]),
        "ra_client_close": (None, [_vp]),
        "ra_client_errmsg": (ctypes.c_char_p, [_vp]),
        "ra_client_set_timeout": (None, [_vp, _c_int]),
        "ra_client_hello": (_c_int, [_vp, P(_Info)]),
        "ra_session_desc_init": (None, [P(_Desc)]),
        "ra_client_session_create": (_c_int, [_vp, P(_Desc), P(_c_u64)]),
        "ra_client_session_drop": (_c_int, [_vp, _c_u64]),
        "ra_client_offload": (_c_int, [_vp, _c_u64, _c_int, P(_Batch)]),
        "ra_client_append": (_c_int, [_vp, _c_u64, _c_int, P(_Batch)]),
        "ra_client_attend": (_c_int, [_vp, _c_u64, _c_int, P(_Req), P(_Out)]),
        "ra_client_attend_send": (_c_int, [_vp, _c_u64, _c_int, P(_Req), P(_c_u64)]),
        "ra_client_attend_wait": (_c_int, [_vp, _c_u64, P(_Out), _c_int]),
        "ra_client_attend_cancel": (None, [_vp, _c_u64]),
        "ra_client_stats": (_c_int, [_vp, P(_Stats)]),
        "ra_strerror": (ctypes.c_char_p, [_c_int]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args
    return lib


def _addr(obj, keep):
    """Address of a C-contiguous buffer (or an int address). Read-only buffers are
    copied once; `keep` holds what must outlive the call."""
    if obj is None:
        return None, 0
    if isinstance(obj, int):
        return obj, -1
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size"):  # a torch tensor
        if getattr(obj, "device", None) is not None and obj.device.type != "cpu":
            raise ValueError("tensor must be in host memory (use .cpu() or pinned memory)")
        if not obj.is_contiguous():
            raise ValueError("tensor must be contiguous")
        keep.append(obj)
        return obj.data_ptr(), obj.numel() * obj.element_size()
    mv = memoryview(obj)
    if not mv.c_contiguous:
        raise ValueError("tensor must be C-contiguous")
    nbytes = mv.nbytes
    if nbytes == 0:
        return None, 0
    mv = mv.cast("B")
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    buf = (ctypes.c_char * nbytes).from_buffer(mv)
    keep.append(buf)
    return ctypes.addressof(buf), nbytes


class Client:
    """One connection to one ratd (see include/ratd/client.h)."""

    def __init__(self, endpoint, timeout_ms=30000, lib=None):
        self._lib = _load(lib)
        o = _Opts()
        self._lib.ra_client_opts_default(ctypes.byref(o))
        o.timeout_ms = timeout_ms
        h = _vp()
        st = self._lib.ra_client_open(ctypes.byref(h), endpoint.encode(), ctypes.byref(o))
        if st:
            raise RatdError(st, "cannot open %s" % endpoint)
        self._c = h
        self._tickets = {}

    def close(self):
        if getattr(self, "_c", None):
            self._lib.ra_client_close(self._c)
            self._c = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _check(self, st):
        if st:
            raise RatdError(st, self._lib.ra_client_errmsg(self._c).decode(errors="replace"))

    def set_timeout(self, timeout_ms):
        self._lib.ra_client_set_timeout(self._c, timeout_ms)

    def hello(self):
        info = _Info()
        self._check(self._lib.ra_client_hello(self._c, ctypes.byref(info)))
        lim = {f: getattr(info.limits, f) for f, _ in _Limits._fields_}
        return {"protocol_version": info.protocol_version, "capabilities": info.capabilities,
                "server_version": info.server_version.decode(), "workers": info.workers,
                "numa_node": info.numa_node, "limits": lim}

    def create_session(self, n_layers, n_q_heads, n_kv_heads, head_dim, dtype="f16",
                       index="graph", **index_opts):
        d = _Desc()
        self._lib.ra_session_desc_init(ctypes.byref(d))
        d.n_layers, d.n_q_heads, d.n_kv_heads, d.head_dim = n_layers, n_q_heads, n_kv_heads, head_dim
        d.dtype = DTYPES[dtype]
        d.index.kind = INDEX_KINDS[index]
        for k, v in index_opts.items():
            setattr(d.index, k, v)
        sid = _c_u64()
        self._check(self._lib.ra_client_session_create(self._c, ctypes.byref(d), ctypes.byref(sid)))
        return sid.value

    def drop_session(self, session):
        self._check(self._lib.ra_client_session_drop(self._c, session))

    def _batch(self, k, v, pos, n_kv_heads, head_dim, dtype, n_tokens, keep,
               q_train=None, n_q_heads=0, n_queries=0):
        b = _Batch()
        b.n_kv_heads, b.head_dim, b.dtype = n_kv_heads, head_dim, DTYPES[dtype]
        b.k, kb = _addr(k, keep)
        b.v, _ = _addr(v, keep)
        b.pos, pb = _addr(pos, keep)
        if n_tokens is None:
            if pb < 0:
                raise ValueError("n_tokens is required when pos is a raw address")
            n_tokens = pb // 8
        b.n_tokens = n_tokens
        if kb > 0 and kb != n_kv_heads * n_tokens * head_dim * DTYPE_SIZE[b.dtype]:
            raise ValueError("K has %d bytes, expected [%d][%d][%d] %s" %
                             (kb, n_kv_heads, n_tokens, head_dim, dtype))
        if q_train is not None:
            b.q_train, _ = _addr(q_train, keep)
            b.n_q_heads, b.n_queries = n_q_heads, n_queries
        return b

    def offload(self, session, layer, k, v, pos, n_kv_heads, head_dim, dtype="f16",
                q_train=None, n_q_heads=0, n_queries=0, n_tokens=None):
        keep = []
        b = self._batch(k, v, pos, n_kv_heads, head_dim, dtype, n_tokens, keep, q_train,
                        n_q_heads, n_queries)
        self._check(self._lib.ra_client_offload(self._c, session, layer, ctypes.byref(b)))

    def append(self, session, layer, k, v, pos, n_kv_heads, head_dim, dtype="f16",
               n_tokens=None):
        keep = []
        b = self._batch(k, v, pos, n_kv_heads, head_dim, dtype, n_tokens, keep)
        self._check(self._lib.ra_client_append(self._c, session, layer, ctypes.byref(b)))

    def _req(self, q, n_q_heads, head_dim, top_k, effort, scale, want_topk, keep):
        r = _Req()
        r.n_q_heads, r.head_dim, r.top_k, r.effort = n_q_heads, head_dim, top_k, effort
        r.scale, r.want_topk = scale, 1 if want_topk else 0
        r.q, _ = _addr(q, keep)
        return r

    def _outs(self, n_q_heads, head_dim, top_k, want_topk, out_o, out_lse, keep):
        res = {}
        out = _Out()
        o = out_o if out_o is not None else array.array("f", bytes(4 * n_q_heads * head_dim))
        lse = out_lse if out_lse is not None else array.array("f", bytes(4 * n_q_heads))
        out.o, _ = _addr(o, keep)
        out.lse, _ = _addr(lse, keep)
        res["o"], res["lse"] = o, lse
        if want_topk:
            res["pos"] = array.array("q", bytes(8 * n_q_heads * top_k))
            res["scores"] = array.array("f", bytes(4 * n_q_heads * top_k))
            res["counts"] = array.array("i", bytes(4 * n_q_heads))
            out.pos, _ = _addr(res["pos"], keep)
            out.scores, _ = _addr(res["scores"], keep)
            out.counts, _ = _addr(res["counts"], keep)
        return out, res

    def attend(self, session, layer, q, n_q_heads, head_dim, top_k, effort=0, scale=0.0,
               want_topk=False, out_o=None, out_lse=None):
        """Partial attention of one layer; returns a dict with 'o' [H*D], 'lse' [H] and,
        with want_topk, 'pos' [H*top_k], 'scores', 'counts' [H]."""
        keep = []
        r = self._req(q, n_q_heads, head_dim, top_k, effort, scale, want_topk, keep)
        out, res = self._outs(n_q_heads, head_dim, top_k, want_topk, out_o, out_lse, keep)
        self._check(self._lib.ra_client_attend(self._c, session, layer, ctypes.byref(r),
                                               ctypes.byref(out)))
        return res

    def attend_send(self, session, layer, q, n_q_heads, head_dim, top_k, effort=0,
                    scale=0.0, want_topk=False):
        """Sends now (q is copied); returns a ticket for attend_wait."""
        keep = []
        r = self._req(q, n_q_heads, head_dim, top_k, effort, scale, want_topk, keep)
        t = _c_u64()
        self._check(self._lib.ra_client_attend_send(self._c, session, layer, ctypes.byref(r),
                                                    ctypes.byref(t)))
        self._tickets[t.value] = (n_q_heads, head_dim, top_k, want_topk)
        return t.value

    def attend_wait(self, ticket, timeout_ms=-1, out_o=None, out_lse=None):
        if ticket not in self._tickets:
            raise RatdError(1, "unknown ticket %d" % ticket)
        h, d, k, want = self._tickets[ticket]
        keep = []
        out, res = self._outs(h, d, k, want, out_o, out_lse, keep)
        st = self._lib.ra_client_attend_wait(self._c, ticket, ctypes.byref(out), timeout_ms)
        if st != 3:  # RA_ETIMEDOUT keeps the ticket
            del self._tickets[ticket]
        self._check(st)
        return res

    def attend_cancel(self, ticket):
        self._tickets.pop(ticket, None)
        self._lib.ra_client_attend_cancel(self._c, ticket)

    def stats(self):
        s = _Stats()
        self._check(self._lib.ra_client_stats(self._c, ctypes.byref(s)))
        d = {f: getattr(s, f) for f, _ in _Stats._fields_ if f != "ops"}
        d["ops"] = {OPS[i]: {f: getattr(s.ops[i], f) for f, _ in _OpStats._fields_}
                    for i in range(7)}
        return d


def merge(o_a, lse_a, o_b, lse_b, head_dim):
    """Log-sum-exp merge of two partial results (lists/arrays [H*D], [H]), the rule the
    decoder applies to ratd's part and its own window part; returns (o, lse) lists."""
    import math
    o, lse = [], []
    for h in range(len(lse_a)):
        m = max(lse_a[h], lse_b[h])
        if m == float("-inf"):
            o.extend([0.0] * head_dim)
            lse.append(m)
            continue
        wa, wb = math.exp(lse_a[h] - m), math.exp(lse_b[h] - m)
        for d in range(head_dim):
            o.append((wa * o_a[h * head_dim + d] + wb * o_b[h * head_dim + d]) / (wa + wb))
        lse.append(m + math.log(wa + wb))
    return o, lse
