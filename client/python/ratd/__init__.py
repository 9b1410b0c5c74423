"""ratd: the Python binding of libratd-client (include/ratd/client.h) through ctypes.

    import ratd
    c = ratd.Client("ipc:///tmp/ratd.sock")            # Hello at once: a fast, clear error
    s = c.create_session(n_layers=32, n_q_heads=32, n_kv_heads=8, head_dim=128, dtype="bf16")
    c.offload(s, layer, k, v, pos, q_train=q)           # numpy arrays or torch tensors
    r = c.attend(s, layer, q, top_k=500)                 # r.o [H][D], r.lse [H]
    o, lse = ratd.merge(o_gpu, lse_gpu, r.o, r.lse)      # exact log-sum-exp merge

The library is loaded (and its ABI checked) on first use; see _load for where it is
searched (RATD_LIB_DIR overrides). ratd.hf is the Hugging Face transformers integration
(import it explicitly: it needs torch and transformers)."""

from ._version import __version__
from .client import (CAPABILITIES, INDEX_KINDS, STATUS, AttendResult, Client, RatdError,
                     Session, Ticket, abi_version, default_endpoint, dtype_name, dtype_size,
                     library_path, library_version, op_name, strerror)
from .merge import merge
from ._abi import AbiError

__all__ = ["__version__", "Client", "RatdError", "AbiError", "Session", "Ticket",
           "AttendResult", "merge", "STATUS", "INDEX_KINDS", "CAPABILITIES", "abi_version",
           "library_version", "library_path", "strerror", "op_name", "dtype_size",
           "dtype_name", "default_endpoint"]
