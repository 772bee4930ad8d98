"""Paged decode attention: reference and Triton kernel (TRITON_INTERPRET=1 on CPU) vs contiguous SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onecard.kernels.paged_attention import paged_decode_attention_reference, paged_decode_attention_triton, store_kv


def _setup(ctx_lens, Hq=4, Hkv=2, D=16, block_size=8, num_blocks=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, block_size, Hkv, D)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered, not in order
    tables, ks, vs = [], [], []
    width = max((n + block_size - 1) // block_size for n in ctx_lens)
    for n in ctx_lens:
        nb = (n + block_size - 1) // block_size
        table = [perm.pop() for _ in range(nb)]
        k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
        pos = torch.arange(n)
        store_kv(k, v, k_cache, v_cache, torch.tensor(table)[pos // block_size] * block_size + pos % block_size)
        tables.append(table + [0] * (width - nb))
        ks.append(k)
        vs.append(v)
    q = torch.randn(len(ctx_lens), Hq, D, generator=g)
    return q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(ctx_lens, dtype=torch.int32), ks, vs


def _contiguous(q, ks, vs, scale):
    outs = []
    for b, (k, v) in enumerate(zip(ks, vs)):
        rep = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(q[b].unsqueeze(1), kk, vv, scale=scale).squeeze(1))
    return torch.stack(outs)


def test_reference_matches_contiguous_attention():
    q, kc, vc, bt, ctx, ks, vs = _setup([5, 19, 8, 1])
    got = paged_decode_attention_reference(q, kc, vc, bt, ctx, 0.25)
    assert torch.allclose(got, _contiguous(q, ks, vs, 0.25), atol=1e-5)


def test_triton_kernel_matches_reference():
    pytest.importorskip("triton")
    q, kc, vc, bt, ctx, ks, vs = _setup([5, 19, 130], D=16, num_blocks=24)  # 130 tokens: three 64-token tiles
    got = paged_decode_attention_triton(q, kc, vc, bt, ctx, 0.25)
    assert torch.allclose(got, _contiguous(q, ks, vs, 0.25), atol=1e-5)
    # the CUDA-graph path passes int64 context lengths (one packed buffer)
    assert torch.allclose(paged_decode_attention_triton(q, kc, vc, bt, ctx.long(), 0.25), got, atol=1e-6)


@pytest.mark.gpu
def test_triton_kernel_bf16_on_gpu():
    q, kc, vc, bt, ctx, _, _ = _setup([1, 17, 300, 64], Hq=32, Hkv=8, D=128, block_size=16, num_blocks=64)
    dev = "cuda"
    args = [t.to(dev) for t in (kc.bfloat16(), vc.bfloat16(), bt, ctx)]
    got = paged_decode_attention_triton(q.to(dev).bfloat16(), *args, 128 ** -0.5).float().cpu()
    ref = paged_decode_attention_reference(q.to(dev).bfloat16(), *args, 128 ** -0.5).float().cpu()
    assert (got - ref).abs().max() < 2e-2


def _rope_inputs(T=3, H=4, Hkv=2, D=16, nb=4, bs=8):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g)
    positions = torch.tensor([5, 0, 17])[:T]
    freqs = torch.outer(torch.arange(32).float(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    slots = torch.tensor([3, 9, 30])[:T]
    return qkv, positions, cos_sin, torch.zeros(nb, bs, Hkv, D), torch.zeros(nb, bs, Hkv, D), slots, H, Hkv, D


def test_fused_rope_store_matches_reference_and_the_model_rotary():
    pytest.importorskip("triton")
    from onecard.kernels.paged_attention import rope_store_kv_reference, rope_store_kv_triton

    qkv, pos, cs, kc1, vc1, slots, H, Hkv, D = _rope_inputs()
    kc2, vc2 = kc1.clone(), vc1.clone()
    q_ref = rope_store_kv_reference(qkv, pos, cs, kc1, vc1, slots, H, Hkv, D)
    q_tri = rope_store_kv_triton(qkv, pos, cs, kc2, vc2, slots, H, Hkv, D)
    assert torch.allclose(q_ref, q_tri, atol=1e-6)
    assert torch.allclose(kc1, kc2, atol=1e-6) and torch.equal(vc1, vc2)
    v = qkv[:, (H + Hkv) * D:].reshape(-1, Hkv, D)
    assert torch.equal(vc1.view(-1, Hkv, D)[slots], v)  # v copied to its slots untouched
    kc3, vc3 = torch.zeros_like(kc1), torch.zeros_like(vc1)
    q_k, k_k = rope_store_kv_triton(qkv, pos, cs, kc3, vc3, slots, H, Hkv, D, return_k=True)  # prefill's form
    q_r, k_r = rope_store_kv_reference(qkv, pos, cs, kc1.clone(), vc1.clone(), slots, H, Hkv, D, return_k=True)
    assert torch.equal(q_k, q_tri) and torch.equal(kc3, kc2) and torch.equal(vc3, vc2)
    assert torch.allclose(k_k, k_r, atol=1e-6) and torch.equal(q_r, q_ref)
    assert torch.equal(kc3.view(-1, Hkv, D)[slots], k_k)  # the k it returns is the k it stored


def test_prefill_with_fused_rope_store_gives_the_pytorch_paths_logits_and_cache():
    """The model's prefill branch with ``fused_rope_store`` (CUDA in the engine; here the kernel under the
    interpreter): same logits and cache as RoPE + store_kv in PyTorch, and the decode after it agrees too."""
    pytest.importorskip("triton")
    from test_dist_tp import prefill_then_decode

    from onecard.models import open_model_folder
    from onecard.models.loader import load_model
    from onecard.testing import make_random_checkpoint

    model = load_model(open_model_folder(make_random_checkpoint("llama-3-8b", "tiny")), torch.float32, "cpu")
    ids = torch.randint(3, model.args.vocab_size, (11,), generator=torch.Generator().manual_seed(0))
    runs = []
    for fused in (False, True):
        logits = prefill_then_decode(model, ids, model.args.num_kv_heads, fused_prefill=fused)
        runs.append((logits, model.layers[-1].self_attn.k_cache.clone()))
    (ref, k_ref), (got, k_got) = runs
    assert torch.allclose(ref, got, atol=1e-5) and torch.allclose(k_ref, k_got, atol=1e-6)
    assert k_got[:, :, 0].abs().sum() > 0  # the cache was written


@pytest.mark.gpu
def test_fused_rope_store_and_rmsnorm_on_gpu():
    from onecard.kernels.paged_attention import rope_store_kv_reference, rope_store_kv_triton
    from onecard.models.llama import RMSNorm

    qkv, pos, cs, kc1, vc1, slots, H, Hkv, D = (t.cuda() if torch.is_tensor(t) else t for t in _rope_inputs())
    qkv, kc1, vc1 = qkv.bfloat16(), kc1.bfloat16(), vc1.bfloat16()
    kc2, vc2 = kc1.clone(), vc1.clone()
    q_ref = rope_store_kv_reference(qkv, pos, cs, kc1, vc1, slots, H, Hkv, D)
    q_tri = rope_store_kv_triton(qkv, pos, cs, kc2, vc2, slots, H, Hkv, D)
    # fp32 math in both; the kernel may contract to FMA, so allow a bf16 rounding step
    assert (q_ref.float() - q_tri.float()).abs().max() < 2e-2 and (kc1.float() - kc2.float()).abs().max() < 2e-2
    assert torch.equal(vc1, vc2)
    norm = RMSNorm(64, 1e-5).cuda().bfloat16()
    x = torch.randn(5, 64, device="cuda").bfloat16()
    xf = x.float()
    ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    assert (norm(x).float() - ref.float()).abs().max() < 1e-2
