"""ratd.hf in transformers (skipped where transformers >= 4.56 is missing; run on the
GPU host by bench/hf/device-run.sh): the project's model (bench/models/kjv-byte-llama,
a LlamaForCausalLM) with attn_implementation 'ratd' against 'sdpa' on held-out text,
teacher-forced and through generate(), batch 1 and 2, float32 and bfloat16, and the
models and uses it refuses. top_k covers every offloaded token and the index is exact,
so ratd's logits must equal sdpa's up to float rounding."""
import os
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
try:
    import ratd.hf as rhf  # noqa: E402
except ImportError as e:  # transformers older than ratd.hf needs
    pytest.skip(str(e), allow_module_level=True)

import ratd  # noqa: E402

SRC = os.environ["RA_SOURCE_DIR"]
MODEL = os.path.join(SRC, "bench", "models", "kjv-byte-llama")
TEXT = os.path.join(SRC, "bench", "data", "heldout-kjv.txt")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = dict(sink=32, window=64, append_batch=8, top_k=8192, index="flat", n_train=256)


def load(attn, dtype=torch.float32):
    kw = dict(attn_implementation=attn)
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype, **kw)
    except TypeError:  # transformers 4.x spells it torch_dtype
        m = transformers.AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=dtype, **kw)
    return m.to(DEV).eval()


def ids(n, offset=0, batch=1):
    b = open(TEXT, "rb").read()
    rows = [list(b[offset + i * 3000: offset + i * 3000 + n]) for i in range(batch)]
    return torch.tensor(rows, dtype=torch.long, device=DEV)


def teacher_forced(model, x, prefill, cache):
    """Logits of the prefill's last position and of each later step, one token at a time."""
    with torch.no_grad():
        out = model(x[:, :prefill], past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1].float()]
        cache = out.past_key_values
        for t in range(prefill, x.shape[1]):
            out = model(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


@pytest.fixture(scope="module")
def models(daemon):
    sdpa = load("sdpa")
    r = load("ratd")
    rhf.enable(r, endpoint=daemon[0], **EXACT)
    return sdpa, r


def test_registered_and_prefill_is_sdpa(models):
    sdpa, r = models
    assert r.config._attn_implementation == "ratd"
    x = ids(300)
    with torch.no_grad():
        a = sdpa(x, use_cache=False).logits
        b = r(x, use_cache=False).logits
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("batch", [1, 2])
def test_teacher_forced_equals_sdpa(models, batch):
    sdpa, r = models
    x = ids(700, batch=batch)
    cache, dyn = rhf.RatdCache(r), transformers.DynamicCache()
    ref = teacher_forced(sdpa, x, 600, dyn)
    got = teacher_forced(r, x, 600, cache)
    assert cache.kv.layers[0].n_remote > 0 and cache.kv.stats["appends"] > 0
    assert 0 < cache.device_bytes() < rhf.kv_cache_bytes(dyn)
    err = (got - ref).abs().max().item()
    assert err < 2e-3, err
    assert len(cache.kv.sessions) == batch
    cache.close()


def test_generate_equals_sdpa(models, daemon):
    sdpa, r = models
    x = ids(400, offset=5000, batch=2)
    with torch.no_grad():
        a = sdpa.generate(x, max_new_tokens=48, do_sample=False)
        c = ratd.Client(daemon[0])
        before = c.stats()["sessions"]
        b = r.generate(x, max_new_tokens=48, do_sample=False)
        assert c.stats()["sessions"] == before  # generate's own cache was closed
    assert b.shape == a.shape
    same = (a[:, 400:] == b[:, 400:]).float().mean().item()
    assert same > 0.9, same  # exact attention in float32: greedy tokens agree


def test_bf16_and_graph(daemon):
    r = load("ratd", torch.bfloat16)
    rhf.enable(r, endpoint=daemon[0], sink=32, window=64, top_k=200, wait_index_ms=60000)
    x = ids(1200)
    with torch.no_grad():
        out = r.generate(x, max_new_tokens=16, do_sample=False)
    assert out.shape == (1, 1216)
    rhf.disable(r)
    assert r.config._attn_implementation != "ratd"


def test_refusals(daemon, tmp_path):
    small = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    mistral = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(sliding_window=16, **small))
    with pytest.raises(ValueError, match="sliding"):
        rhf.enable(mistral, endpoint=daemon[0])
    t0 = time.monotonic()
    llama = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**small))
    with pytest.raises(ratd.RatdError, match="no ratd"):
        rhf.enable(llama, endpoint="ipc://%s/none.sock" % tmp_path)
    assert time.monotonic() - t0 < 30
    with pytest.raises(TypeError):
        rhf.enable(llama, endpoint=daemon[0], windw=4)
    # 'ratd' selected but decoding with transformers' own cache: a clear error
    m = load("ratd")
    x = ids(50)
    with torch.no_grad(), pytest.raises(RuntimeError, match="ratd.hf.enable"):
        m.generate(x, max_new_tokens=2, do_sample=False)
    rhf.enable(m, endpoint=daemon[0], **EXACT)
    with torch.no_grad(), pytest.raises((NotImplementedError, ValueError)):
        m.generate(ids(200), max_new_tokens=4, num_beams=2, do_sample=False)
