"""ratd's KV cache for a torch decoder, without transformers: what ratd.hf plugs into
transformers' Cache and AttentionInterface, and what a hand-written decoder can call.

Per layer and sequence the device keeps the first `sink` tokens and a tail of the last
`window` (up to window + append_batch - 1) tokens; everything else lives in ratd, one
session per sequence. Every token is on exactly one side, so the log-sum-exp merge of
the device's partial attention with ratd's is exact (ratd.merge's rule, in float32).
It mirrors the C reference decoder's ratd mode (bench/lm/eval.c):

  prefill   full causal attention over the prompt on the device (SDPA), then per layer
            Offload of the middle [sink, T - window) with a sample of the prefill queries
            (the last n_train/2 positions plus a stride, eval.c's sample_positions) and,
            with gpu_knn, each query's exact top-knn_k keys computed on the device, so
            that ratd skips its own kNN; the sink and the last `window` tokens stay;
  decode    one token per step: q goes to ratd (per-session Attends, or one batched
            Attend per layer where the library has it) while the device computes its
            partial attention over sink + tail; the two are merged; when the tail holds
            window + append_batch - 1 tokens its oldest append_batch go to ratd in one
            Append (before that step's Attend), so that batches leave the device.

Layouts follow transformers: q [batch][n_q_heads][T][head_dim], k, v [batch][n_kv_heads]
[T][head_dim] (post-RoPE), attention output [batch][T][n_q_heads][head_dim]. GQA: query
head h uses KV head h // (n_q_heads / n_kv_heads)."""

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F

from .client import Client, RatdError, _int
from .merge import merge

# SDPA with a scale argument: torch >= 2.1
_HAS_SDPA = hasattr(F, "scaled_dot_product_attention") and tuple(
    int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 1)
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_OF_TORCH = {v: k for k, v in _TORCH_DTYPES.items()}


class Options:
    """Settings of ratd's KV cache (all keyword-only; see ratd.hf.enable):
    sink, window: tokens kept on the device (first / last); top_k, effort: ratd's
    Attend; append_batch: tokens per Append (1 mirrors the C decoder exactly);
    n_train: prefill queries sent per layer for the index; gpu_knn: send exact top-
    knn_k lists computed on the device (graph only, which alone uses them; None: when
    the tensors are on CUDA); index and
    index_opts: the session's index ('graph', 'flat', 'ivf', 'hnsw', 'pscan'; options of
    create_session); kv_dtype: how ratd stores K/V (None: the model's dtype);
    wait_index_ms: after the prefill, wait up to this long for the index builds (0:
    don't; Attend is answered by an exact scan meanwhile)."""

    FIELDS = {"sink": (128, 0, 1 << 20), "window": (512, 1, 1 << 20), "top_k": (500, 1, 8192),
              "effort": (0, 0, 1 << 20), "append_batch": (32, 1, 4096), "n_train": (4096, 0, 65536),
              "knn_k": (100, 1, 1024), "wait_index_ms": (0, 0, 1 << 30)}

    def __init__(self, *, sink=128, window=512, top_k=500, effort=0, append_batch=32, n_train=4096,
                 gpu_knn=None, knn_k=100, index="pscan", index_opts=None, kv_dtype=None,
                 wait_index_ms=0):
        for name, value in (("sink", sink), ("window", window), ("top_k", top_k), ("effort", effort),
                            ("append_batch", append_batch), ("n_train", n_train), ("knn_k", knn_k),
                            ("wait_index_ms", wait_index_ms)):
            _, lo, hi = self.FIELDS[name]
            setattr(self, name, _int(name, value, lo, hi))
        if gpu_knn not in (None, True, False):
            raise TypeError("gpu_knn must be None (auto), True or False")
        if kv_dtype is not None and kv_dtype not in _TORCH_DTYPES:
            raise ValueError("kv_dtype %r is not None, 'f32', 'f16' or 'bf16'" % (kv_dtype,))
        if index not in ("graph", "flat", "ivf", "hnsw", "pscan"):
            raise ValueError("index %r is not one of 'graph', 'flat', 'ivf', 'hnsw', 'pscan'"
                             % (index,))
        self.gpu_knn, self.index, self.kv_dtype = gpu_knn, index, kv_dtype
        self.index_opts = dict(index_opts or {})

    def __repr__(self):
        return "Options(%s)" % ", ".join("%s=%r" % kv for kv in sorted(vars(self).items()))


def sample_positions(n, want):
    """Training query positions of a prefill of n tokens: all when want >= n, else the
    last want/2 plus a stride over the rest (bench/lm/eval.c, sample_positions)."""
    if want >= n:
        return np.arange(n, dtype=np.int64)
    tail = want // 2
    head = want - tail
    span = n - tail
    first = (np.arange(head, dtype=np.int64) * span) // head
    return np.concatenate([first, np.arange(n - tail, n, dtype=np.int64)])


def full_attention(q, k, v, scale, mask=None):
    """Causal attention of q [B][H][T][D] over k, v [B][G][S][D] (the last T of S
    positions are the queries'), output [B][H][T][D] in q's dtype. SDPA where torch has
    it; the same math in float32 chunks otherwise (torch < 2.0)."""
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    if mask is not None:
        check_causal_mask(mask, T, S)
    if H != G:
        k = k.repeat_interleave(H // G, dim=1)
        v = v.repeat_interleave(H // G, dim=1)
    if _HAS_SDPA:
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    out = torch.empty_like(q)
    kf, vf = k.float(), v.float()
    for t0 in range(0, T, 256):
        t1 = min(T, t0 + 256)
        s = torch.matmul(q[:, :, t0:t1].float(), kf.transpose(-1, -2)) * scale
        rows = torch.arange(t0, t1, device=q.device)[:, None] + (S - T)
        s = s.masked_fill(torch.arange(S, device=q.device)[None, :] > rows, float("-inf"))
        out[:, :, t0:t1] = torch.matmul(torch.softmax(s, dim=-1), vf).to(q.dtype)
    return out


def check_causal_mask(mask, T, S):
    """Refuses an attention mask that hides more than causality does (padding)."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if allowed.dim() != 4 or tuple(allowed.shape[-2:]) != (T, S):
        raise ValueError("ratd: an attention mask of shape %s does not fit %d queries over %d keys"
                         % (tuple(mask.shape), T, S))
    causal = torch.ones(T, S, dtype=torch.bool, device=mask.device).tril(S - T)
    if not torch.equal(allowed, causal.expand_as(allowed)):
        raise ValueError("ratd serves unpadded causal batches only: this attention mask hides "
                         "tokens (left padding?); run sequences of equal length (batch them by "
                         "length) or one at a time")


def local_attention(q, k, v, scale):
    """Partial attention of one decode query per sequence: q [B][H][1][D] over k, v
    [B][G][L][D]; returns o [B][H][D] and lse [B][H], float32 (natural log)."""
    B, H, _, D = q.shape
    G = k.shape[1]
    qg = q[:, :, 0, :].float().reshape(B, G, H // G, D)
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B][G][R][L]
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float())
    return o.reshape(B, H, D), lse.reshape(B, H)


class _Layer:
    """One layer's device part: buf [B][G][sink + tail_cap][D] holds the sink, then the
    tail; positions of the tail run from tail_pos0."""

    __slots__ = ("k", "v", "n_sink", "n_tail", "tail_pos0", "n_seen", "n_remote", "prefill_pending")

    def __init__(self):
        self.k = self.v = None
        self.n_sink = self.n_tail = self.tail_pos0 = self.n_seen = self.n_remote = 0
        self.prefill_pending = False


class RatdKV:
    """The KV state of a batch of sequences for one model: per layer the device part
    (sink + tail) and, in ratd, one session per sequence holding the rest.

    RatdKV(client, n_layers=, n_q_heads=, n_kv_heads=, head_dim=, options=Options()):
    `client` is a ratd.Client (shared; calls are serialised). Call update() with each
    layer's new k, v (it returns the k, v attention must see), then attention() with
    that layer's q; close() drops the sessions."""

    def __init__(self, client, *, n_layers, n_q_heads, n_kv_heads, head_dim, options=None):
        if not isinstance(client, Client):
            raise TypeError("client must be a ratd.Client")
        self.client = client
        self.n_layers = _int("n_layers", n_layers, 1, 1 << 16)
        self.n_q_heads = _int("n_q_heads", n_q_heads, 1, 1 << 16)
        self.n_kv_heads = _int("n_kv_heads", n_kv_heads, 1, self.n_q_heads)
        if self.n_q_heads % self.n_kv_heads:
            raise ValueError("n_q_heads (%d) must be a multiple of n_kv_heads (%d)" % (n_q_heads, n_kv_heads))
        self.head_dim = _int("head_dim", head_dim, 1, 1 << 16)
        self.opts = options if options is not None else Options()
        if not isinstance(self.opts, Options):
            raise TypeError("options must be a ratd.kv.Options")
        self.tail_cap = self.opts.window + self.opts.append_batch - 1
        self.layers = [_Layer() for _ in range(self.n_layers)]
        self.sessions = []
        self.batch = None
        self.broken = None
        self.stats = {"attends": 0, "appends": 0, "offloads": 0, "tokens_appended": 0,
                      "knn_s": 0.0, "attend_s": 0.0}

    # ---- bookkeeping ----------------------------------------------------------------

    def _ok(self):
        if self.broken:
            raise RuntimeError("this ratd KV cache is unusable after an earlier error (%s): "
                               "make a new one" % self.broken)

    def seq_length(self, layer=0):
        """Tokens seen so far per sequence on `layer` (device + ratd)."""
        return self.layers[layer].n_seen if 0 <= layer < self.n_layers else 0

    def local_length(self, layer):
        L = self.layers[layer]
        return L.n_sink + L.n_tail

    def device_bytes(self):
        """Bytes of K and V this cache holds on the device (all layers)."""
        return sum(L.k.nelement() * L.k.element_size() * 2 for L in self.layers if L.k is not None)

    def _kv_dtype(self, t):
        if self.opts.kv_dtype:
            return self.opts.kv_dtype
        if t.dtype not in _DTYPE_OF_TORCH:
            raise TypeError("ratd stores K/V as float32, float16 or bfloat16, the model's are %s: "
                            "pass kv_dtype" % t.dtype)
        return _DTYPE_OF_TORCH[t.dtype]

    def _open_sessions(self, k):
        B = k.shape[0]
        dt = self._kv_dtype(k)
        lim = self.client.info["limits"] if self.client.info else {}
        if lim.get("max_sessions") and B > lim["max_sessions"]:
            raise ValueError("batch %d needs %d ratd sessions, the daemon allows %d" % (B, B, lim["max_sessions"]))
        try:
            for _ in range(B):
                self.sessions.append(self.client.create_session(
                    n_layers=self.n_layers, n_q_heads=self.n_q_heads, n_kv_heads=self.n_kv_heads,
                    head_dim=self.head_dim, dtype=dt, index=self.opts.index, **self.opts.index_opts))
        except BaseException:
            self.close()
            raise
        self.batch = B

    def close(self):
        """Drops this cache's sessions on the daemon (idempotent)."""
        sessions, self.sessions = self.sessions, []
        for s in sessions:
            try:
                self.client.session_drop(s)
            except RatdError:
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- update: what attention sees ----------------------------------------------------

    def update(self, layer, k, v):
        """Adds a layer's new tokens k, v [B][G][T][D] and returns the k, v attention
        must see: all of them for the prefill (the layer's first call), the device's
        sink + tail (views) for a decode step (T = 1)."""
        _active.kv = None
        self._ok()
        if not 0 <= layer < self.n_layers:
            raise ValueError("layer %d outside [0, %d)" % (layer, self.n_layers))
        L = self.layers[layer]
        B, G, T, D = k.shape
        if (G, D) != (self.n_kv_heads, self.head_dim) or tuple(v.shape) != tuple(k.shape):
            raise ValueError("layer %d: k %s / v %s, expected [batch][%d][T][%d]"
                             % (layer, tuple(k.shape), tuple(v.shape), self.n_kv_heads, self.head_dim))
        if L.prefill_pending:
            self.broken = "layer %d's prefill was never offloaded" % layer
            raise RuntimeError("ratd: layer %d got new tokens before its prefill was offloaded: "
                               "the model must run with attn_implementation='ratd'" % layer)
        if L.n_seen == 0:
            if self.batch is not None and B != self.batch:
                raise ValueError("batch %d, but this cache holds %d sequences" % (B, self.batch))
            L.prefill_pending = True
            _active.kv, _active.layer = self, layer
            return k, v
        if T != 1:
            raise NotImplementedError("ratd decodes one token per forward after the prefill "
                                      "(got %d): prefill the whole prompt in one call" % T)
        if B != self.batch:
            raise ValueError("batch %d, but this cache holds %d sequences" % (B, self.batch))
        S = self.opts.sink
        if L.n_sink < S:
            L.k[:, :, L.n_sink] = k[:, :, 0]
            L.v[:, :, L.n_sink] = v[:, :, 0]
            L.n_sink += 1
        else:
            if L.n_tail == self.tail_cap:
                self._flush(layer)
            L.k[:, :, S + L.n_tail] = k[:, :, 0]
            L.v[:, :, S + L.n_tail] = v[:, :, 0]
            L.n_tail += 1
        L.n_seen += 1
        n = self.local_length(layer)
        _active.kv, _active.layer = self, layer
        return L.k[:, :, :n], L.v[:, :, :n]

    def _flush(self, layer):
        """Appends the tail's oldest append_batch tokens to ratd, then drops them here."""
        L = self.layers[layer]
        S, A = self.opts.sink, self.opts.append_batch
        kk = L.k[:, :, S:S + A]
        vv = L.v[:, :, S:S + A]
        dt = _TORCH_DTYPES[self.sessions[0].dtype]
        kh = kk.to(dt).cpu()
        vh = vv.to(dt).cpu()
        pos = torch.arange(L.tail_pos0, L.tail_pos0 + A, dtype=torch.int64)
        try:
            for b, s in enumerate(self.sessions):
                self.client.append(s, layer, kh[b].contiguous(), vh[b].contiguous(), pos)
        except BaseException as e:
            self.broken = "append failed: %s" % e
            raise
        rest = L.n_tail - A
        L.k[:, :, S:S + rest] = L.k[:, :, S + A:S + L.n_tail].clone()
        L.v[:, :, S:S + rest] = L.v[:, :, S + A:S + L.n_tail].clone()
        L.n_tail, L.tail_pos0, L.n_remote = rest, L.tail_pos0 + A, L.n_remote + A
        self.stats["appends"] += len(self.sessions)
        self.stats["tokens_appended"] += A

    # ---- prefill ------------------------------------------------------------------------

    def prefill(self, layer, q, k, v):
        """After the layer's full attention over the prompt (q [B][H][T][D], k, v as given
        to update): keeps sink and tail on the device and offloads the middle to ratd
        with the sampled queries (and their exact top-k lists with gpu_knn)."""
        self._ok()
        L = self.layers[layer]
        if not L.prefill_pending:
            raise RuntimeError("ratd: layer %d has no prefill to offload" % layer)
        try:
            self._prefill(layer, L, q, k, v)
        except BaseException as e:
            self.broken = "prefill of layer %d failed: %s" % (layer, e)
            raise
        L.prefill_pending = False

    def _prefill(self, layer, L, q, k, v):
        B, G, T, D = k.shape
        S, W = self.opts.sink, self.opts.window
        if not self.sessions:
            self._open_sessions(k)
        L.k = torch.empty(B, G, S + self.tail_cap, D, dtype=k.dtype, device=k.device)
        L.v = torch.empty_like(L.k)
        L.n_sink = min(S, T)
        L.k[:, :, :L.n_sink] = k[:, :, :L.n_sink]
        L.v[:, :, :L.n_sink] = v[:, :, :L.n_sink]
        t0 = max(S, T - W)  # first tail position
        L.n_tail = T - t0 if T > S else 0
        L.tail_pos0 = t0
        if L.n_tail:
            L.k[:, :, S:S + L.n_tail] = k[:, :, t0:T]
            L.v[:, :, S:S + L.n_tail] = v[:, :, t0:T]
        n_mid = max(0, t0 - S)
        L.n_seen, L.n_remote = T, n_mid
        if n_mid:
            self._offload(layer, q, k[:, :, S:t0], v[:, :, S:t0], S)
        if layer == self.n_layers - 1 and self.opts.wait_index_ms and n_mid:
            for s in self.sessions:
                self.client.wait_ready(s, self.opts.wait_index_ms)

    def _offload(self, layer, q, k_mid, v_mid, pos0):
        B, H, T, D = q.shape
        n = k_mid.shape[2]
        dt = _TORCH_DTYPES[self.sessions[0].dtype]
        P = torch.from_numpy(sample_positions(T, self.opts.n_train)).to(q.device)
        use_knn = self.opts.index == "graph" and (self.opts.gpu_knn if self.opts.gpu_knn is not None
                                                  else q.device.type == "cuda")
        kk = min(self.opts.knn_k, n)
        pos = torch.arange(pos0, pos0 + n, dtype=torch.int64)
        for b, s in enumerate(self.sessions):
            kb = k_mid[b].to(dt)
            qt = q[b][:, P].float() if len(P) else None  # [H][nq][D]
            knn = self._knn(qt, kb) if use_knn and qt is not None and kk > 0 else None
            self.client.offload(s, layer, kb.contiguous().cpu(), v_mid[b].to(dt).contiguous().cpu(), pos,
                                q_train=qt.contiguous().cpu() if qt is not None else None,
                                train_knn=knn)
            self.stats["offloads"] += 1

    def _knn(self, qt, kb):
        """Exact top-knn_k keys (indices into kb's tokens) of each training query, on the
        tensors' device: [H][nq][K] int32 on the host."""
        import time

        t = time.perf_counter()
        H, nq, D = qt.shape
        G, n, _ = kb.shape
        K = min(self.opts.knn_k, n)
        R = H // G
        out = torch.empty(H, nq, K, dtype=torch.int32)
        kf = kb.float()
        step = max(1, (64 << 20) // max(1, 4 * n))  # queries per chunk: ~64 MiB of scores
        for h in range(H):
            for i in range(0, nq, step):
                sc = torch.matmul(qt[h, i:i + step], kf[h // R].transpose(0, 1))
                out[h, i:i + step] = sc.topk(K, dim=-1).indices.to(torch.int32).cpu()
        self.stats["knn_s"] += time.perf_counter() - t
        return out

    # ---- attention ------------------------------------------------------------------------

    def attention(self, layer, q, k, v, scale, mask=None):
        """Attention of one layer, q [B][H][T][D] with the k, v update() returned; output
        [B][T][H][D] in q's dtype. Prefill (the layer's first call): full attention,
        then the offload. Decode: the device's part merged with ratd's."""
        self._ok()
        L = self.layers[layer]
        B, H, T, D = q.shape
        if H != self.n_q_heads or D != self.head_dim:
            raise ValueError("q %s, expected [batch][%d][T][%d]" % (tuple(q.shape), self.n_q_heads, self.head_dim))
        if L.prefill_pending:
            out = full_attention(q, k, v, scale, mask)
            self.prefill(layer, q, k, v)
            return out.transpose(1, 2).contiguous()
        if T != 1:
            raise NotImplementedError("ratd decodes one token per forward after the prefill")
        remote = self.attend_send(layer, q, scale) if L.n_remote else None
        o, lse = local_attention(q, k, v, scale)
        if remote is not None:
            o_r, lse_r = self.attend_wait(remote, o.device)
            o, lse = merge(o, lse, o_r, lse_r)
        return o.to(q.dtype).unsqueeze(1)

    def attend_send(self, layer, q, scale):
        """Sends this step's queries of `layer` to ratd; returns a handle for attend_wait."""
        qh = q[:, :, 0, :].float().cpu()  # [B][H][D]
        o = self.opts
        top_k = min(o.top_k, self.client.info["limits"]["max_top_k"]) if self.client.info else o.top_k
        try:
            if len(self.sessions) > 1 and self.client.has_attend_batch():
                r = self.client.attend_batch(self.sessions, layer, qh.contiguous(), top_k=top_k,
                                             effort=o.effort, scale=float(scale))
                return ("batch", r)
            return ("tickets", [self.client.attend_send(s, layer, qh[b].contiguous(), top_k=top_k,
                                                        effort=o.effort, scale=float(scale))
                                for b, s in enumerate(self.sessions)])
        except BaseException as e:
            self.broken = "attend failed: %s" % e
            raise

    def attend_wait(self, handle, device):
        """ratd's part: o [B][H][D], lse [B][H] float32 on `device`."""
        kind, x = handle
        try:
            if kind == "batch":
                o, lse = x.o, x.lse
            else:
                rs = [self.client.attend_wait(t) for t in x]
                o = torch.stack([r.o for r in rs])
                lse = torch.stack([r.lse for r in rs])
        except BaseException as e:
            self.broken = "attend failed: %s" % e
            raise
        self.stats["attends"] += 1
        return o.to(device, non_blocking=True), lse.to(device, non_blocking=True)


# The RatdKV whose update() ran last on this thread, and its layer: transformers calls a
# layer's cache update and then its attention function, which finds the cache here.
_active = threading.local()


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function ratd.hf registers with transformers' AttentionInterface as
    'ratd' (transformers' signature: q [B][H][T][D], k, v [B][G][S][D] from the cache's
    update, output ([B][T][H][D], None)). With a RatdKV behind the layer's cache it runs
    RatdKV.attention; without one (a forward with no cache) it is full causal attention."""
    kv, layer = getattr(_active, "kv", None), getattr(_active, "layer", None)
    _active.kv = None
    if dropout and getattr(module, "training", False):
        raise RuntimeError("ratd attention is for inference: call model.eval() (dropout %g)" % dropout)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if kv is None or layer != getattr(module, "layer_idx", None):
        if query.shape[2] != key.shape[2]:
            raise RuntimeError("attn_implementation='ratd' decodes through ratd's cache, but this "
                               "forward runs with another cache: call ratd.hf.enable(model, ...) "
                               "(generate() then uses one), or pass past_key_values="
                               "ratd.hf.RatdCache(model)")
        return full_attention(query, key, value, scale, attention_mask).transpose(1, 2).contiguous(), None
    return kv.attention(layer, query, key, value, scale, attention_mask), None
