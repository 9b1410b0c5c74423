"""The exact log-sum-exp merge of two partial attentions over disjoint token sets (the
FlashAttention rule, as ra_gpu_merge): per row, m = max(lse_a, lse_b),
o = (e^(lse_a-m) o_a + e^(lse_b-m) o_b) / (e^(lse_a-m) + e^(lse_b-m)),
lse = m + log(e^(lse_a-m) + e^(lse_b-m)). An empty side (lse = -inf) contributes nothing;
both empty give o = 0, lse = -inf. Vectorised over any leading dimensions."""

import numpy as np

from ._arrays import is_torch, torch


def _check(o_a, lse_a, o_b, lse_b):
    kinds = {("torch" if is_torch(x) else "numpy" if isinstance(x, np.ndarray) else type(x).__name__)
             for x in (o_a, lse_a, o_b, lse_b)}
    if len(kinds) != 1 or not kinds <= {"torch", "numpy"}:
        raise TypeError("merge takes four numpy arrays or four torch tensors, got %s" % sorted(kinds))
    if tuple(o_a.shape) != tuple(o_b.shape) or len(o_a.shape) < 1:
        raise ValueError("o_a %s and o_b %s must have the same shape [..., head_dim]"
                         % (tuple(o_a.shape), tuple(o_b.shape)))
    rows = tuple(o_a.shape[:-1])
    if tuple(lse_a.shape) != rows or tuple(lse_b.shape) != rows:
        raise ValueError("lse_a %s and lse_b %s must have the shape of o without its last "
                         "dimension, %s" % (tuple(lse_a.shape), tuple(lse_b.shape), rows))
    return kinds.pop()


def merge(o_a, lse_a, o_b, lse_b):
    """Merges (o_a, lse_a) with (o_b, lse_b): o [..., head_dim], lse [...]; numpy arrays
    or torch tensors (same device). Computes in float32, or float64 when an input is
    float64; returns (o, lse) of that type."""
    kind = _check(o_a, lse_a, o_b, lse_b)
    if kind == "numpy":
        wide = np.float64 if np.float64 in (o_a.dtype, o_b.dtype, lse_a.dtype, lse_b.dtype) else np.float32
        oa, ob = o_a.astype(wide, copy=False), o_b.astype(wide, copy=False)
        la, lb = lse_a.astype(wide, copy=False), lse_b.astype(wide, copy=False)
        m = np.maximum(la, lb)
        empty = np.isneginf(m)
        m = np.where(empty, 0.0, m).astype(wide, copy=False)
        wa, wb = np.exp(la - m), np.exp(lb - m)
        z = wa + wb
        zs = np.where(empty, 1.0, z).astype(wide, copy=False)
        o = (wa[..., None] * oa + wb[..., None] * ob) / zs[..., None]
        with np.errstate(divide="ignore"):
            lse = np.where(empty, -np.inf, m + np.log(zs)).astype(wide, copy=False)
        return o, lse
    wide = torch.float64 if torch.float64 in (o_a.dtype, o_b.dtype, lse_a.dtype, lse_b.dtype) else torch.float32
    oa, ob, la, lb = (x.to(wide) for x in (o_a, o_b, lse_a, lse_b))
    m = torch.maximum(la, lb)
    empty = torch.isneginf(m)
    m = torch.where(empty, torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    zs = torch.where(empty, torch.ones_like(m), wa + wb)
    o = (wa.unsqueeze(-1) * oa + wb.unsqueeze(-1) * ob) / zs.unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(zs))
    return o, lse
