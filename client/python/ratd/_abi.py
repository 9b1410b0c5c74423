"""The C ABI of libratd-client as ctypes sees it: every struct of include/ratd/client.h,
field for field, and the signature of every call. This is the only file that mirrors
the header; a field added to a C struct is one line in the matching _fields_ list
below (the load-time check, check_abi, names any struct whose size disagrees).

Kept in the order of client.h. Pointers to tensors are c_void_p: the callers in
client.py hand over addresses of buffers they validated (size, dtype, contiguity)."""

import ctypes

c_int, c_u32, c_i32, c_u64 = ctypes.c_int, ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64
c_size, c_float, c_double, c_vp = ctypes.c_size_t, ctypes.c_float, ctypes.c_double, ctypes.c_void_p
P = ctypes.POINTER

# RA_CLIENT_ABI_VERSION of the header this file mirrors
ABI_VERSION = 4
OP_NAMES = ("hello", "create", "offload", "append", "attend", "drop", "stats")  # ra_op
RA_OP_COUNT = len(OP_NAMES)


class ClientOpts(ctypes.Structure):  # ra_client_opts
    _fields_ = [("timeout_ms", c_int), ("max_inflight", c_int),
                ("curve_server_key", ctypes.c_char_p), ("curve_public_key", ctypes.c_char_p),
                ("curve_secret_key", ctypes.c_char_p)]


class ServerLimits(ctypes.Structure):  # ra_server_limits
    _fields_ = [("max_frame_bytes", c_u64), ("max_message_bytes", c_u64), ("mem_limit", c_u64),
                ("max_sessions", c_u32), ("max_layers", c_u32), ("max_heads", c_u32),
                ("max_dim", c_u32), ("max_top_k", c_u32), ("max_tokens", c_u32),
                ("max_queries", c_u32)]


class ServerInfo(ctypes.Structure):  # ra_server_info
    _fields_ = [("protocol_version", c_u32), ("capabilities", c_u32),
                ("server_version", ctypes.c_char * 32), ("workers", c_u32), ("numa_node", c_i32),
                ("limits", ServerLimits), ("instance_id", c_u64)]


class IndexOpts(ctypes.Structure):  # ra_client_index_opts
    _fields_ = [("kind", c_int), ("graph_knn", c_int), ("graph_degree", c_int),
                ("graph_build_ef", c_int), ("graph_entries", c_int), ("n_train", c_int),
                ("ivf_nlist", c_int), ("hnsw_m", c_int), ("threads", c_int), ("seed", c_u64)]


class SessionDesc(ctypes.Structure):  # ra_session_desc
    _fields_ = [("n_layers", c_int), ("n_q_heads", c_int), ("n_kv_heads", c_int),
                ("head_dim", c_int), ("dtype", c_int), ("index", IndexOpts)]


class KvBatch(ctypes.Structure):  # ra_kv_batch
    _fields_ = [("n_kv_heads", c_int), ("head_dim", c_int), ("dtype", c_int), ("n_tokens", c_size),
                ("k", c_vp), ("v", c_vp), ("pos", c_vp), ("n_q_heads", c_int),
                ("n_queries", c_size), ("q_train", c_vp), ("train_knn", c_vp),
                ("train_knn_k", c_int), ("graph_adj", c_vp), ("graph_degree", c_int),
                ("graph_entries", c_vp), ("graph_n_entries", c_int)]


class AttendReq(ctypes.Structure):  # ra_attend_req
    _fields_ = [("n_q_heads", c_int), ("head_dim", c_int), ("q", c_vp), ("top_k", c_int),
                ("effort", c_int), ("scale", c_float), ("want_topk", c_int),
                ("top_k_per_head", c_vp)]


class AttendOut(ctypes.Structure):  # ra_attend_out
    _fields_ = [("o", c_vp), ("lse", c_vp), ("pos", c_vp), ("scores", c_vp), ("counts", c_vp),
                ("server_us", c_u32), ("work_us", c_u32), ("task_max_us", c_u32)]


class OpStats(ctypes.Structure):  # ra_op_stats
    _fields_ = [("count", c_u64), ("errors", c_u64), ("total_us", c_u64), ("max_us", c_u64)]


class ServerStats(ctypes.Structure):  # ra_server_stats
    _fields_ = [("sessions", c_u64), ("requests", c_u64), ("errors", c_u64),
                ("bad_messages", c_u64), ("bytes_in", c_u64), ("bytes_out", c_u64),
                ("mem_used", c_u64), ("mem_limit", c_u64), ("tokens", c_u64),
                ("uptime_s", c_double), ("ops", OpStats * RA_OP_COUNT), ("clients", c_u64),
                ("max_clients", c_u64), ("listener_pauses", c_u64), ("replies_dropped", c_u64),
                ("sessions_expired", c_u64), ("tokens_refused", c_u64), ("reply_bytes", c_u64),
                ("curve_refused", c_u64)]


class SessionStats(ctypes.Structure):  # ra_session_stats
    _fields_ = [("tokens", c_u64), ("heads", c_u32), ("heads_ready", c_u32),
                ("heads_building", c_u32), ("bytes", c_u64)]


class AttendBatchReq(ctypes.Structure):  # ra_attend_batch_req
    _fields_ = [("n_sessions", c_int), ("sessions", c_vp), ("n_q_heads", c_int),
                ("head_dim", c_int), ("q", c_vp), ("top_k", c_int), ("effort", c_int),
                ("scale", c_float), ("want_topk", c_int), ("top_k_per_head", c_vp)]


class SessionToken(ctypes.Structure):  # ra_session_token
    _fields_ = [("bytes", ctypes.c_uint8 * 16)]


# ra_client_struct value -> the mirror; the order of the C enum
STRUCTS = (ClientOpts, ServerLimits, ServerInfo, IndexOpts, SessionDesc, KvBatch, AttendReq,
           AttendOut, OpStats, ServerStats, SessionStats, AttendBatchReq, SessionToken)

# name -> (restype, argtypes); every call of client.h and status.h
SIGNATURES = {
    "ra_client_opts_default": (None, [P(ClientOpts)]),
    "ra_client_open": (c_int, [P(c_vp), ctypes.c_char_p, P(ClientOpts)]),
    "ra_client_close": (None, [c_vp]),
    "ra_client_default_endpoint": (c_int, [ctypes.c_char_p, c_size]),
    "ra_client_errmsg": (ctypes.c_char_p, [c_vp]),
    "ra_client_set_timeout": (None, [c_vp, c_int]),
    "ra_client_set_spin_us": (None, [c_vp, c_int]),
    "ra_client_hello": (c_int, [c_vp, P(ServerInfo)]),
    "ra_session_desc_init": (None, [P(SessionDesc)]),
    "ra_client_session_create": (c_int, [c_vp, P(SessionDesc), P(c_u64)]),
    "ra_client_session_drop": (c_int, [c_vp, c_u64]),
    "ra_client_session_token": (c_int, [c_vp, c_u64, P(SessionToken)]),
    "ra_client_session_adopt": (c_int, [c_vp, c_u64, P(SessionToken)]),
    "ra_client_offload": (c_int, [c_vp, c_u64, c_int, P(KvBatch)]),
    "ra_client_append": (c_int, [c_vp, c_u64, c_int, P(KvBatch)]),
    "ra_client_attend": (c_int, [c_vp, c_u64, c_int, P(AttendReq), P(AttendOut)]),
    "ra_client_attend_send": (c_int, [c_vp, c_u64, c_int, P(AttendReq), P(c_u64)]),
    "ra_client_attend_wait": (c_int, [c_vp, c_u64, P(AttendOut), c_int]),
    "ra_client_attend_cancel": (None, [c_vp, c_u64]),
    "ra_client_attend_batch": (c_int, [c_vp, c_int, P(AttendBatchReq), P(AttendOut)]),
    "ra_client_attend_batch_send": (c_int, [c_vp, c_int, P(AttendBatchReq), P(c_u64)]),
    "ra_op_name": (ctypes.c_char_p, [c_int]),
    "ra_client_stats": (c_int, [c_vp, P(ServerStats)]),
    "ra_client_session_stats": (c_int, [c_vp, c_u64, P(SessionStats)]),
    "ra_client_wait_ready": (c_int, [c_vp, c_u64, c_int]),
    "ra_client_abi_version": (c_u32, []),
    "ra_client_struct_size": (c_size, [c_int]),
    "ra_client_version": (ctypes.c_char_p, []),
    "ra_strerror": (ctypes.c_char_p, [c_int]),
    "ra_dtype_size": (ctypes.c_uint, [c_int]),
    "ra_dtype_name": (ctypes.c_char_p, [c_int]),
}
class AbiError(ImportError):
    """The library's ABI differs from the one this package mirrors."""


def bind(lib, path, package_version):
    """Sets restype/argtypes of every call and checks the ABI; returns lib."""
    missing = [n for n in SIGNATURES if not hasattr(lib, n)]
    if missing:
        raise AbiError("%s lacks %s: it is older than this ratd package (%s); rebuild the "
                       "library from the same tree, or point RATD_LIB_DIR at a matching "
                       "one" % (path, ", ".join(missing), package_version))
    for name, (res, args) in SIGNATURES.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    check_abi(lib, path, package_version)
    return lib


def has_attend_batch(lib):
    """True: every library of ABI 2 has ra_client_attend_batch (kept for callers)."""
    return hasattr(lib, "ra_client_attend_batch")


def check_abi(lib, path, package_version):
    """Refuses a library whose ABI version or struct sizes differ from this file's."""
    lib_abi = lib.ra_client_abi_version()
    lib_ver = (lib.ra_client_version() or b"?").decode(errors="replace")
    if lib_abi != ABI_VERSION:
        raise AbiError("%s has client ABI %d (ratd %s) but this ratd package (%s) speaks ABI "
                       "%d: install the package and the library from the same tree"
                       % (path, lib_abi, lib_ver, package_version, ABI_VERSION))
    bad = []
    for which, st in enumerate(STRUCTS):
        n = lib.ra_client_struct_size(which)
        if n != ctypes.sizeof(st):
            bad.append("%s: library %d bytes, package %d" % (st.__name__, n, ctypes.sizeof(st)))
    if bad:
        raise AbiError("%s (ratd %s) and this ratd package (%s) disagree on struct sizes (%s): "
                       "install both from the same tree" % (path, lib_ver, package_version,
                                                            "; ".join(bad)))
