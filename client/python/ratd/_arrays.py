"""Checks caller tensors before their addresses reach C, and makes result tensors of the
caller's kind.

A tensor is a numpy.ndarray or a torch.Tensor. Each input is checked for its kind,
element type, exact shape, C-contiguity, alignment and (torch) device and layout; only
then is its address taken, and the object is kept alive for the call. Nothing is
converted silently: a wrong dtype or layout is a TypeError/ValueError that names the
argument, what was expected and how to get it. CUDA tensors are copied to host memory
explicitly (the copy is the only conversion) and results go back to the same device."""

import numpy as np

try:  # torch is optional
    import torch
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None

# element types by name: numpy dtype, torch dtype attribute name, C dtype value
F32, F16, BF16 = 0, 1, 2  # ra_dtype
DTYPE_NAMES = {"f32": F32, "f16": F16, "bf16": BF16}
_NP = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "i64": np.dtype(np.int64),
       "i32": np.dtype(np.int32), "bf16": np.dtype(np.uint16)}  # bf16 bits: uint16 in numpy
_TORCH = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64", "i32": "int32"}
_CAST = {"f32": ".astype(np.float32) / .float()", "f16": ".astype(np.float16) / .half()",
         "bf16": ".bfloat16() (torch), or uint16 bf16 bits (numpy)",
         "i64": ".astype(np.int64) / .long()", "i32": ".astype(np.int32) / .int()"}


def is_torch(x):
    return torch is not None and isinstance(x, torch.Tensor)


def kind_of(name, x):
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_torch(x):
        return "torch"
    raise TypeError("%s must be a numpy array or a torch tensor, got %s: use np.asarray(...) "
                    "with an explicit dtype" % (name, type(x).__name__))


def dtype_name_of(x):
    """'f32', 'f16', 'bf16', 'i64', 'i32' or the tensor's own dtype text."""
    if is_torch(x):
        for k, v in _TORCH.items():
            if x.dtype == getattr(torch, v):
                return k
        return str(x.dtype).replace("torch.", "")
    for k, v in _NP.items():
        if x.dtype == v and k != "bf16":
            return k
    return str(x.dtype)


class Arg:
    """A checked input: its address (0 for an empty tensor) and the object that owns it."""

    __slots__ = ("ptr", "obj", "kind", "device")

    def __init__(self, ptr, obj, kind, device):
        self.ptr, self.obj, self.kind, self.device = ptr, obj, kind, device


def _shape_text(names, shape):
    return "[" + "][".join("%s=%d" % (n, s) for n, s in zip(names, shape)) + "]"


def check(name, x, want, shape, dims):
    """Checks input `x` (`want`: a dtype name, or a tuple of accepted ones) against
    `shape` (ints, named by `dims`) and returns an Arg. CUDA tensors are copied to the
    host here; torch tensors that need grad are detached (only read)."""
    kind = kind_of(name, x)
    wants = want if isinstance(want, tuple) else (want,)
    device = None
    if kind == "torch":
        if x.layout != torch.strided:
            raise TypeError("%s is a %s torch tensor: pass a dense one (.to_dense())" % (name, x.layout))
        device = x.device
        got = dtype_name_of(x)
        if got not in wants or got not in _TORCH:
            raise TypeError("%s must be %s, got torch.%s: convert it explicitly with %s"
                            % (name, " or ".join("torch." + _TORCH[w] for w in wants),
                               str(x.dtype).replace("torch.", ""), _CAST[wants[0]]))
        if tuple(x.shape) != tuple(shape):
            raise ValueError("%s has shape %s, expected %s" % (name, tuple(x.shape), _shape_text(dims, shape)))
        if not x.is_contiguous():
            raise ValueError("%s is not contiguous: pass %s.contiguous()" % (name, name))
        if x.device.type != "cpu":
            x = x.detach().to("cpu")  # the explicit copy to host memory
        elif x.requires_grad:
            x = x.detach()
        ptr = x.data_ptr() if x.numel() else 0
    else:
        got = None
        for w in wants:
            if x.dtype == _NP[w] and x.dtype.isnative:
                got = w
        if got is None:
            raise TypeError("%s must be %s, got numpy %s: convert it explicitly with %s"
                            % (name, " or ".join("uint16 (bf16 bits)" if w == "bf16" else str(_NP[w])
                                                 for w in wants), x.dtype, _CAST[wants[0]]))
        if tuple(x.shape) != tuple(shape):
            raise ValueError("%s has shape %s, expected %s" % (name, tuple(x.shape), _shape_text(dims, shape)))
        if not x.flags.c_contiguous or not x.flags.aligned:
            raise ValueError("%s is not C-contiguous and aligned: pass np.ascontiguousarray(%s)" % (name, name))
        ptr = x.ctypes.data if x.size else 0
    return Arg(ptr, x, kind, device)


def check_out(name, x, shape, dims, dtype="f32"):
    """A caller-provided result buffer: like check, and writable."""
    a = check(name, x, dtype, shape, dims)
    if a.kind == "numpy" and not x.flags.writeable:
        raise ValueError("%s is read-only: pass a writable array" % name)
    if a.kind == "torch" and (a.obj is not x):
        raise ValueError("%s must be a host (CPU) tensor that does not require grad: results "
                         "are written into it" % name)
    return a


def values_within(name, x, lo, hi):
    """Checks that the integer tensor x holds values in [lo, hi]."""
    empty = x.size == 0 if isinstance(x, np.ndarray) else x.numel() == 0
    if empty:
        return
    mn, mx = (int(x.min()), int(x.max()))
    if mn < lo or mx > hi:
        raise ValueError("%s holds values in [%d, %d], allowed [%d, %d]" % (name, mn, mx, lo, hi))


def empty(kind, shape, dtype, like_device=None):
    """A new host tensor for results: numpy, or torch (on the host)."""
    if kind == "numpy":
        return np.empty(shape, dtype=_NP[dtype])
    return torch.empty(shape, dtype=getattr(torch, _TORCH[dtype]))


def to_caller(kind, x, device):
    """Moves a host result to the caller's device (torch CUDA inputs)."""
    if kind == "torch" and device is not None and device.type != "cpu":
        return x.to(device, non_blocking=False)
    return x


def address(t):
    """Address of a host result tensor made by `empty` (or a checked out buffer)."""
    if isinstance(t, np.ndarray):
        return t.ctypes.data if t.size else 0
    return t.data_ptr() if t.numel() else 0
