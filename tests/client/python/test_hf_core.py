"""ratd.hf's attention function (ratd.kv.attention_forward, what transformers calls as
attn_implementation 'ratd') and its cache (ratd.kv.RatdKV) on CPU tensors, without
transformers, against a real ratd: a prefill then decode steps of a 2-layer GQA
"model" of random q, k, v, every output compared with full causal attention over all
tokens in float64 (top_k covers every offloaded token, so the merge must be exact);
tokens leaving the window reach ratd in batches; batch 2, bf16, the graph index with
training lists from torch kNN; and the refusals."""
import types

import pytest

torch = pytest.importorskip("torch")

import ratd  # noqa: E402
from ratd import kv as rkv  # noqa: E402

H, G, D, L = 6, 2, 32, 2


def reference(q, K, V, scale):
    """Causal attention in float64: q [B][H][T][D] are the last T of K's S positions."""
    B, _, T, _ = q.shape
    S = K.shape[2]
    Kq = K.double().repeat_interleave(H // G, dim=1)
    Vq = V.double().repeat_interleave(H // G, dim=1)
    s = torch.matmul(q.double(), Kq.transpose(-1, -2)) * scale
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), Vq).transpose(1, 2)  # [B][T][H][D]


def run(client, *, B=1, T=80, steps=30, dtype=torch.float32, tol=2e-5, **opts):
    g = torch.Generator().manual_seed(B * 100 + T)
    o = dict(sink=4, window=16, append_batch=4, top_k=8192, index="flat", n_train=32)
    o.update(opts)
    kv = rkv.RatdKV(client, n_layers=L, n_q_heads=H, n_kv_heads=G, head_dim=D, options=rkv.Options(**o))
    mods = [types.SimpleNamespace(layer_idx=i, training=False) for i in range(L)]
    scale = D ** -0.5
    hist = [None] * L
    worst = 0.0
    for step in range(steps + 1):
        n = T if step == 0 else 1
        for layer in range(L):
            q = torch.randn(B, H, n, D, generator=g).to(dtype)
            k = torch.randn(B, G, n, D, generator=g).to(dtype)
            v = torch.randn(B, G, n, D, generator=g).to(dtype)
            hist[layer] = (k, v) if step == 0 else (torch.cat([hist[layer][0], k], 2), torch.cat([hist[layer][1], v], 2))
            ks, vs = kv.update(layer, k, v)
            out, w = rkv.attention_forward(mods[layer], q, ks, vs, None, scaling=scale)
            assert w is None and out.shape == (B, n, H, D) and out.dtype == dtype
            ref = reference(q, *hist[layer], scale)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            assert err < tol, (step, layer, err)
            if step:
                assert kv.local_length(layer) <= o["sink"] + o["window"] + o["append_batch"] - 1
    return kv, worst


def test_prefill_decode_exact(client):
    kv, _ = run(client)
    S, W, A, T, steps = 4, 16, 4, 80, 30
    for layer in range(L):
        Ly = kv.layers[layer]
        assert Ly.n_seen == T + steps
        assert Ly.n_remote + Ly.n_sink + Ly.n_tail == T + steps  # every token on one side
        assert Ly.n_remote > T - S - W  # appends happened
        assert Ly.n_tail >= W
    assert kv.stats["tokens_appended"] == L * ((steps + W - 1 - (W + A - 1)) // A + 1) * A or kv.stats["appends"] > 0
    st = client.session_stats(kv.sessions[0])
    assert st["heads"] == L * G
    kv.close()
    assert kv.sessions == []


def test_mirror_of_the_c_decoder(client):
    """append_batch 1: the device holds sink + the last `window` tokens, as eval.c."""
    kv, _ = run(client, steps=12, append_batch=1)
    for layer in range(L):
        assert kv.local_length(layer) == 4 + 16
    kv.close()


def test_batch_bf16_graph_knn(client):
    kv, _ = run(client, B=2, steps=10)
    assert len(kv.sessions) == 2
    kv.close()
    kv, _ = run(client, steps=6, dtype=torch.bfloat16, tol=1.5e-2)
    assert kv.sessions[0].dtype == "bf16"
    kv.close()
    kv, _ = run(client, steps=6, index="graph", gpu_knn=True, knn_k=16, wait_index_ms=60000)
    assert kv.stats["knn_s"] > 0 and kv.stats["offloads"] == L
    assert client.session_stats(kv.sessions[0])["heads_building"] == 0
    kv.close()
    kv, _ = run(client, T=12, steps=8)  # a prompt shorter than sink + window: nothing offloaded at first
    kv.close()


def test_pscan_index(client):
    """index='pscan' (the default) reaches the daemon (Options refused it before): exact at
    top_k >= n."""
    assert rkv.Options().index == "pscan"
    kv, _ = run(client, steps=6, index="pscan", wait_index_ms=60000)
    st = client.session_stats(kv.sessions[0])
    assert st["heads_building"] == 0 and st["heads_ready"] == L * G  # built, not failed
    assert kv.opts.index == "pscan"
    kv.close()


def test_refusals(client):
    kv = rkv.RatdKV(client, n_layers=1, n_q_heads=H, n_kv_heads=G, head_dim=D,
                    options=rkv.Options(sink=2, window=4, index="flat"))
    m = types.SimpleNamespace(layer_idx=0, training=False)
    q, k = torch.randn(1, H, 10, D), torch.randn(1, G, 10, D)
    ks, vs = kv.update(0, k, k)
    pad = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    pad[..., 0] = False  # the first token hidden: left padding
    with pytest.raises(ValueError, match="unpadded causal batches only"):
        rkv.attention_forward(m, q, ks, vs, pad, scaling=0.1)
    kv.attention(0, q, ks, vs, 0.1, torch.ones(1, 1, 10, 10, dtype=torch.bool).tril())  # causal: fine
    with pytest.raises(NotImplementedError, match="one token per forward"):
        kv.update(0, k[:, :, :2], k[:, :, :2])
    with pytest.raises(ValueError, match="batch 2, but this cache holds 1"):
        kv.update(0, torch.randn(2, G, 1, D), torch.randn(2, G, 1, D))
    with pytest.raises(ValueError, match=r"expected \[batch\]\[2\]\[T\]\[32\]"):
        kv.update(0, torch.randn(1, G, 1, D + 1), torch.randn(1, G, 1, D + 1))
    kv.close()
    # a layer updated twice without its attention: the model did not run 'ratd'
    kv = rkv.RatdKV(client, n_layers=1, n_q_heads=H, n_kv_heads=G, head_dim=D)
    kv.update(0, k, k)
    with pytest.raises(RuntimeError, match="attn_implementation='ratd'"):
        kv.update(0, k[:, :, :1], k[:, :, :1])
    with pytest.raises(RuntimeError, match="unusable after an earlier error"):
        kv.update(0, k[:, :, :1], k[:, :, :1])
    # no ratd cache behind the layer: full attention for a prefill, an error for a decode
    out, _ = rkv.attention_forward(m, q, k, k, None, scaling=0.1)
    ref = reference(q, k, k, 0.1)
    assert (out.double() - ref).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="ratd.hf.enable"):
        rkv.attention_forward(m, q[:, :, :1], k, k, None, scaling=0.1)
    m.training = True
    with pytest.raises(RuntimeError, match="model.eval"):
        rkv.attention_forward(m, q, k, k, None, scaling=0.1, dropout=0.1)
    for bad, exc in ((dict(window=0), ValueError), (dict(sink=-1), ValueError), (dict(top_k=9000), ValueError),
                     (dict(gpu_knn="yes"), TypeError), (dict(index="hnsw32"), ValueError),
                     (dict(kv_dtype="fp16"), ValueError), (dict(windw=4), TypeError)):
        with pytest.raises(exc):
            rkv.Options(**bad)
    with pytest.raises(TypeError, match="client must be a ratd.Client"):
        rkv.RatdKV("ipc:///x", n_layers=1, n_q_heads=H, n_kv_heads=G, head_dim=D)


def test_sample_positions():
    p = rkv.sample_positions(100, 10)
    assert list(p[5:]) == [95, 96, 97, 98, 99] and p[0] == 0 and len(p) == 10 and (p[1:] > p[:-1]).all()
    assert list(rkv.sample_positions(5, 10)) == [0, 1, 2, 3, 4]
