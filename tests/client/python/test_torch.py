"""The ratd package with torch tensors (CPU; CUDA where present) against a real ratd:
results are tensors of q's kind and device, bf16 and f16 sessions take torch bf16/f16
K and V without conversion, and the torch inputs of issue 11 are refused before C sees
them (a bf16 q, which the old binding read 1 KiB past; fp16 K into a bf16 session)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ratd  # noqa: E402

H, G, D, N = 8, 2, 64, 200


def ref(q, K, V, scale=None):
    scale = scale or D ** -0.5
    q, K, V = q.double(), K.double(), V.double()
    Kq = K.repeat_interleave(H // G, dim=0)  # [H][n][D]
    Vq = V.repeat_interleave(H // G, dim=0)
    s = scale * torch.einsum("hd,hnd->hn", q, Kq)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), Vq)
    return o, lse


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(5)
    K = torch.randn(G, N, D, generator=g)
    V = torch.randn(G, N, D, generator=g)
    q = 1.3 * torch.randn(H, D, generator=g)
    return K, V, torch.arange(N, dtype=torch.int64), q


@pytest.mark.parametrize("dt", ["f32", "f16", "bf16"])
def test_torch_sessions(client, data, dt):
    K, V, pos, q = data
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dt]
    s = client.create_session(n_layers=1, n_q_heads=H, n_kv_heads=G, head_dim=D, dtype=dt, index="flat")
    k, v = K.to(tdt), V.to(tdt)
    client.offload(s, 0, k[:, :150].contiguous(), v[:, :150].contiguous(), pos[:150].clone(),
                   q_train=torch.randn(H, 16, D))
    client.append(s, 0, k[:, 150:].contiguous(), v[:, 150:].contiguous(), pos[150:].clone())
    qq = q.clone().requires_grad_(True)  # read through a detached view
    r = client.attend(s, 0, qq, top_k=N, want_topk=True)
    assert isinstance(r.o, torch.Tensor) and r.o.dtype == torch.float32 and r.o.shape == (H, D)
    assert r.pos.dtype == torch.int64 and r.counts.dtype == torch.int32
    o, lse = ref(q, k.float(), v.float())
    assert (r.o.double() - o).abs().max() < 2e-4
    assert (r.lse.double() - lse).abs().max() < 2e-4
    t = client.attend_send(s, 0, q, top_k=N)
    assert torch.equal(client.attend_wait(t).o, r.o)
    client.session_drop(s)


def test_torch_bad_inputs(client, data):
    K, V, pos, q = data
    s = client.create_session(n_layers=1, n_q_heads=H, n_kv_heads=G, head_dim=D, dtype="bf16")
    k, v = K.bfloat16(), V.bfloat16()
    with pytest.raises(TypeError, match=r"q must be torch.float32, got torch.bfloat16.*\.float\(\)"):
        client.attend(s, 0, q.bfloat16(), top_k=10)
    with pytest.raises(TypeError, match=r"k must be torch.bfloat16, got torch.float16"):
        client.offload(s, 0, K.half(), V.half(), pos)
    with pytest.raises(TypeError, match=r"pos must be torch.int64, got torch.int32"):
        client.offload(s, 0, k, v, pos.int())
    with pytest.raises(ValueError, match=r"q has shape \(1, 64\), expected \[n_q_heads=8\]"):
        client.attend(s, 0, q[:1], top_k=10)
    with pytest.raises(ValueError, match=r"v has shape \(2, 1, 64\)"):
        client.append(s, 0, k[:, :4].contiguous(), v[:, :1].contiguous(), pos[:4].clone())
    with pytest.raises(ValueError, match=r"q is not contiguous: pass q.contiguous\(\)"):
        client.attend(s, 0, torch.zeros(D, H).t(), top_k=10)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        client.attend(s, 0, memoryview(q.numpy()), top_k=10)
    # a numpy q gives numpy results even into a torch session's client
    client.offload(s, 0, k.contiguous(), v.contiguous(), pos.clone())
    r = client.attend(s, 0, q.numpy(), top_k=N)
    assert isinstance(r.o, np.ndarray)
    client.session_drop(s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors(client, data):
    K, V, pos, q = data
    s = client.create_session(n_layers=1, n_q_heads=H, n_kv_heads=G, head_dim=D, dtype="bf16", index="flat")
    client.offload(s, 0, K.bfloat16().cuda(), V.bfloat16().cuda(), pos.cuda())
    r = client.attend(s, 0, q.cuda(), top_k=N)
    assert r.o.device.type == "cuda" and r.lse.device.type == "cuda"
    o, _ = ref(q, K.bfloat16().float(), V.bfloat16().float())
    assert (r.o.double().cpu() - o).abs().max() < 2e-4
    client.session_drop(s)
