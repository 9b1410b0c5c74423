"""ratd for Hugging Face transformers (>= 4.56; written against 5.x).

    import ratd.hf
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="ratd")
    ratd.hf.enable(model, endpoint="ipc:///tmp/ratd.sock", sink=128, window=512, top_k=500)
    model.generate(ids, max_new_tokens=256)       # generate() gets a RatdCache of its own

Importing this module registers the attention function 'ratd' with transformers'
AttentionInterface (and the SDPA mask builder under the same name, without which
transformers would build no causal mask for the prefill). enable() checks that the
model's attention can be served (refusing it with the reason otherwise), connects to
ratd, selects 'ratd' and makes generate() use a RatdCache. A RatdCache keeps sink +
window on the device and the rest in ratd (ratd.kv.RatdKV does the work; see there for
the prefill / decode protocol); pass your own as past_key_values to step the model by
hand (teacher forcing) or to keep the cache after generate():

    cache = ratd.hf.RatdCache(model)
    out = model(prompt_ids, past_key_values=cache, use_cache=True)    # prefill
    out = model(next_id, past_key_values=cache, use_cache=True)       # one token per step
    cache.close()                                                       # drops the sessions

Not supported (refused, with the reason): sliding-window or chunked layers, logit
soft-capping, attention sinks, MLA (different key and value head sizes), encoder-
decoder models, models whose attention does not go through AttentionInterface, padded
batches, multi-token steps after the prefill, beam search."""

import functools

import torch

from . import kv as _kv
from .client import Client, default_endpoint

MIN_TRANSFORMERS = (4, 56)

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # transformers missing, or too old to have these
    _v = getattr(locals().get("transformers"), "__version__", None)
    raise ImportError("ratd.hf needs transformers >= %d.%d (AttentionInterface, "
                      "AttentionMaskInterface, Cache layers)%s: %s"
                      % (MIN_TRANSFORMERS + (", found %s" % _v if _v else ", which is not installed", e))) from e


def _version_tuple(v):
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


if _version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError("ratd.hf needs transformers >= %d.%d, found %s" % (MIN_TRANSFORMERS + (transformers.__version__,)))

NAME = "ratd"
AttentionInterface.register(NAME, _kv.attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)

Options = _kv.Options


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def model_shape(model_or_config):
    """(n_layers, n_q_heads, n_kv_heads, head_dim) of a decoder config or model."""
    c = _text_config(model_or_config)
    H = c.num_attention_heads
    G = getattr(c, "num_key_value_heads", None) or H
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    return c.num_hidden_layers, H, G, D


def check_model(model, limits=None):
    """Raises ValueError naming why ratd cannot serve this model's attention; returns the
    attention modules (one per layer) otherwise."""
    c = _text_config(model)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("%s is an encoder-decoder model: ratd serves decoder self-attention only" % name)
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError("%s does not dispatch its attention through transformers' AttentionInterface "
                         "(_supports_attention_backend is False), so 'ratd' would never be called" % name)
    types = getattr(c, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        raise ValueError("%s has %s layers: ratd serves full-attention layers only (a sliding or "
                         "chunked layer has nothing to offload)" % (name, sorted(set(types) - {"full_attention"})))
    if types is None and (getattr(c, "attention_chunk_size", None) or (
            getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True))):
        raise ValueError("%s uses sliding-window or chunked attention: ratd serves full attention only" % name)
    if getattr(c, "attn_logit_softcapping", None):
        raise ValueError("%s soft-caps attention logits (attn_logit_softcapping): ratd's partial "
                         "attention is a plain softmax, so the merge would not be exact" % name)
    for f in ("v_head_dim", "kv_lora_rank", "qk_rope_head_dim"):
        if getattr(c, f, None):
            raise ValueError("%s uses latent / split-head attention (%s): ratd needs keys and values "
                             "of one head_dim" % (name, f))
    n_layers, H, G, D = model_shape(model)
    if H % G:
        raise ValueError("%s: %d query heads are not a multiple of %d KV heads" % (name, H, G))
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if len(mods) != n_layers or sorted(m.layer_idx for m in mods) != list(range(n_layers)):
        raise ValueError("%s: found %d attention modules with layer_idx for %d layers: not a decoder "
                         "whose self-attention ratd can serve" % (name, len(mods), n_layers))
    for m in mods:
        if any(n in ("sinks", "s_aux") for n, _ in m.named_parameters(recurse=False)):
            raise ValueError("%s has attention sinks (learned per-head logits): ratd's merge would "
                             "not be exact" % name)
    dt = next(model.parameters()).dtype
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError("%s runs in %s: ratd serves float32, float16 and bfloat16 models" % (name, dt))
    if limits:
        if D > limits["max_dim"] or H > limits["max_heads"] or n_layers > limits["max_layers"]:
            raise ValueError("%s (%d layers, %d heads, head_dim %d) exceeds the daemon's limits "
                             "(max_layers %d, max_heads %d, max_dim %d)" % (
                                 name, n_layers, H, D, limits["max_layers"], limits["max_heads"], limits["max_dim"]))
    return mods


class _Layer:
    """transformers-facing view of one layer (keys/values: the device part)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, kv, i):
        self._kv, self._i = kv, i

    @property
    def keys(self):
        L = self._kv.layers[self._i]
        return None if L.k is None else L.k[:, :, :self._kv.local_length(self._i)]

    @property
    def values(self):
        L = self._kv.layers[self._i]
        return None if L.v is None else L.v[:, :, :self._kv.local_length(self._i)]

    @property
    def is_initialized(self):
        return self._kv.layers[self._i].n_seen > 0

    def get_seq_length(self, *args, **kwargs):
        return self._kv.seq_length(self._i)

    def get_max_cache_shape(self, *args, **kwargs):
        return -1


class RatdCache(Cache):
    """A transformers Cache whose layers keep sink + window on the device and the rest in
    ratd (one session per sequence; ratd.kv.RatdKV). RatdCache(model) takes the settings
    and the connection of ratd.hf.enable(model, ...); without enable, pass them here
    (client= or endpoint=, and the Options keywords). close() drops the sessions."""

    def __init__(self, model=None, *, config=None, client=None, endpoint=None, **options):
        if model is None and config is None:
            raise TypeError("RatdCache needs the model (or its config=)")
        state = getattr(model, "_ratd", None) if model is not None else None
        opts = _kv.Options(**options) if options or state is None else state.options
        if client is None:
            client = state.client if state is not None and endpoint is None else Client(endpoint or default_endpoint())
        n_layers, H, G, D = model_shape(model if model is not None else config)
        kv = _kv.RatdKV(client, n_layers=n_layers, n_q_heads=H, n_kv_heads=G, head_dim=D, options=opts)
        layers = [_Layer(kv, i) for i in range(n_layers)]
        try:
            super().__init__(layers=layers)
        except TypeError:  # a Cache.__init__ without layers=
            super().__init__()
        self.layers = layers
        self.kv = kv

    # the Cache API transformers' models and generate() call
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *args, **kwargs):
        return self.kv.update(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx=0, *args, **kwargs):
        return self.kv.seq_length(layer_idx or 0)

    def get_mask_sizes(self, cache_position_or_length, layer_idx=0, *args, **kwargs):
        q = cache_position_or_length
        q_len = q if isinstance(q, int) else int(q.shape[0])
        return self.kv.seq_length(layer_idx or 0) + q_len, 0

    def get_max_cache_shape(self, layer_idx=0, *args, **kwargs):
        return -1

    def get_max_length(self):
        return None

    def get_usable_length(self, new_seq_length=None, layer_idx=0):
        return self.kv.seq_length(layer_idx or 0)

    @property
    def is_compileable(self):
        return False

    @property
    def is_initialized(self):
        return self.kv.layers[0].n_seen > 0

    @property
    def is_sliding(self):
        return [False] * self.kv.n_layers

    @property
    def max_batch_size(self):
        return self.kv.batch or 0

    @property
    def max_cache_len(self):
        return -1

    def __len__(self):
        return self.kv.n_layers

    def reset(self):
        raise NotImplementedError("a RatdCache cannot be reset: close() it and make a new one")

    def crop(self, max_length):
        if max_length < 0 or max_length < self.kv.seq_length(0):
            raise NotImplementedError("a RatdCache cannot be cropped (assisted generation is not supported)")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("beam search is not supported with ratd (use greedy or sampling)")

    def batch_repeat_interleave(self, repeats):
        if self.kv.seq_length(0) and repeats != 1:
            raise NotImplementedError("a filled RatdCache cannot be expanded (num_return_sequences)")

    def batch_select_indices(self, indices):
        if self.kv.seq_length(0):
            raise NotImplementedError("a filled RatdCache cannot drop sequences")

    # ratd's own
    def device_bytes(self):
        """Bytes of K and V this cache holds on the device."""
        return self.kv.device_bytes()

    def close(self):
        """Drops the cache's sessions on the daemon."""
        self.kv.close()


class _State:
    def __init__(self, client, options, generate, attn):
        self.client, self.options, self.generate, self.attn = client, options, generate, attn


def _set_attn(model, name):
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
            return
        except Exception:  # older APIs: set the config field below
            pass
    model.config._attn_implementation = name


def enable(model, *, endpoint=None, client=None, timeout_ms=30000, connect_timeout_ms=2000, **options):
    """Makes `model` run its attention through ratd: checks it (ValueError with the reason
    for a model ratd cannot serve), connects (a RatdError at once when no daemon answers),
    selects attn_implementation 'ratd' and makes generate() use a RatdCache when none is
    passed (its sessions are dropped when generate returns). options: those of
    ratd.kv.Options (sink, window, top_k, effort, append_batch, n_train, gpu_knn, knn_k,
    index, index_opts, kv_dtype, wait_index_ms). Returns the model."""
    opts = _kv.Options(**options)
    if client is None:
        client = Client(endpoint or default_endpoint(), timeout_ms=timeout_ms,
                        connect_timeout_ms=connect_timeout_ms)
    check_model(model, client.info["limits"] if client.info else None)
    if getattr(model, "_ratd", None) is not None:
        disable(model)
    orig_generate = model.generate
    orig_attn = getattr(model.config, "_attn_implementation", None)
    if orig_attn == NAME:  # loaded with attn_implementation="ratd": disable() falls back to SDPA
        orig_attn = "sdpa"
    _set_attn(model, NAME)

    @functools.wraps(orig_generate)
    def generate(*args, **kwargs):
        own = kwargs.get("past_key_values") is None
        if own:
            kwargs["past_key_values"] = cache = RatdCache(model)
        try:
            return orig_generate(*args, **kwargs)
        finally:
            if own:
                cache.close()

    model._ratd = _State(client, opts, orig_generate, orig_attn)
    model.generate = generate
    return model


def disable(model):
    """Undoes enable(): the previous attention implementation ('sdpa' for a model loaded
    with attn_implementation='ratd', which cannot run without ratd) and generate()."""
    st = getattr(model, "_ratd", None)
    if st is None:
        return model
    model.__dict__.pop("generate", None)
    if st.attn:
        _set_attn(model, st.attn)
    model._ratd = None
    return model


def kv_cache_bytes(cache):
    """Device bytes of K and V held by a transformers cache (RatdCache or a dynamic one)."""
    if isinstance(cache, RatdCache):
        return cache.device_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nelement() * t.element_size()
    return total
