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


@pytest.mark.gpu
def test_triton_kernel_bf16_on_gpu():
    q, kc, vc, bt, ctx, _, _ = _setup([1, 17, 300, 64], Hq=32, Hkv=8, D=128, block_size=16, num_blocks=64)
    dev = "cuda"
    args = [t.to(dev) for t in (kc.bfloat16(), vc.bfloat16(), bt, ctx)]
    got = paged_decode_attention_triton(q.to(dev).bfloat16(), *args, 128 ** -0.5).float().cpu()
    ref = paged_decode_attention_reference(q.to(dev).bfloat16(), *args, 128 ** -0.5).float().cpu()
    assert (got - ref).abs().max() < 2e-2
