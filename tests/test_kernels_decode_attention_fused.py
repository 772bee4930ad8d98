"""The one-launch decode attention (``paged_decode_attention_fused``: RoPE, the new token's K/V into the paged cache,
flash-decoding and the in-kernel merge of its partitions) against RoPE + store + attention in PyTorch, under
TRITON_INTERPRET=1 on CPU, and against the three-kernel Triton path on a GPU."""

from __future__ import annotations

import pytest
import torch
from test_engine_kv_quant import _paged  # scattered-block paged cache builder (optionally quantized)

from onecard.errors import BadInputError
from onecard.kernels.counters import zeroed_counters
from onecard.kernels.kv_quant import dequantize_kv
from onecard.kernels.paged_attention import (
    paged_decode_attention_fused,
    paged_decode_attention_reference,
    paged_decode_attention_split,
    rope_store_kv_reference,
    rope_store_kv_triton,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")
FP8, INT8 = torch.float8_e4m3fn, torch.int8
# 150: three 64-token partitions merged in the kernel; 64 fills one partition exactly; 1: the new token alone; 129:
# a last partition holding only the new token
CTX = [1, 150, 64, 37, 129]


def _step(ctx_lens, fmt, Hq, Hkv, D=16, block_size=8, num_blocks=64, device="cpu", dtype=torch.float32):
    """A paged cache holding each sequence's first ``ctx - 1`` tokens (and junk where its new token goes), plus
    the decode step's fused q|k|v rows, positions, slots and RoPE table."""
    q, kc, vc, ks, vs, bt, ctx, *_ = _paged(ctx_lens, fmt, Hq=Hq, Hkv=Hkv, D=D, block_size=block_size,
                                            num_blocks=num_blocks)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(len(ctx_lens), (Hq + 2 * Hkv) * D, generator=g) * 2
    pos = ctx.long() - 1
    slots = bt.long()[torch.arange(len(ctx_lens)), pos // block_size] * block_size + pos % block_size
    freqs = torch.outer(torch.arange(max(ctx_lens)).float(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    cs = torch.cat([freqs.cos(), freqs.sin()], -1)
    moved = [t.to(device) if t is not None else None for t in (qkv.to(dtype), pos, cs, kc, vc, slots, bt, ctx, ks, vs)]
    return moved


def _reference(qkv, pos, cs, kc, vc, slots, bt, ctx, ks, vs, Hq, Hkv, D):
    caches = [t.clone() if t is not None else None for t in (kc, vc, ks, vs)]
    q = rope_store_kv_reference(qkv, pos, cs, caches[0], caches[1], slots, Hq, Hkv, D, caches[2], caches[3])
    out = paged_decode_attention_reference(q, caches[0], caches[1], bt, ctx, D ** -0.5, caches[2], caches[3])
    return out, caches


@pytest.mark.parametrize("fmt", [None, INT8])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "group4", "group8"])
@pytest.mark.parametrize("partition", [64, None], ids=["split64", "planned"])
def test_fused_decode_matches_rope_store_then_attention(fmt, heads, partition):
    Hq, Hkv = heads
    qkv, pos, cs, kc, vc, slots, bt, ctx, ks, vs = _step(CTX, fmt, Hq, Hkv)
    want, caches = _reference(qkv, pos, cs, kc, vc, slots, bt, ctx, ks, vs, Hq, Hkv, 16)
    got = paged_decode_attention_fused(qkv, pos, cs, kc, vc, slots, bt, ctx, Hq, Hkv, 16, 16 ** -0.5, ks, vs,
                                       partition=partition)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip((kc, vc, ks, vs), caches):  # the whole cache: the new tokens, nothing else touched
        if mine is not None:
            assert torch.equal(mine, theirs)
    assert not zeroed_counters(qkv.device, 1, "paged_decode").any()  # every merge reset its counter


def test_fused_decode_matches_the_three_kernel_path():
    # same partitions as rope_store_kv_triton + the split and combine kernels; only the new token's score and
    # weight are summed in another order (from registers); the cache writes are the same bytes
    qkv, pos, cs, kc, vc, slots, bt, ctx, *_ = _step(CTX, None, 8, 2)
    kc2, vc2 = kc.clone(), vc.clone()
    q = rope_store_kv_triton(qkv, pos, cs, kc2, vc2, slots, 8, 2, 16)
    want = paged_decode_attention_split(q, kc2, vc2, bt, ctx, 0.25, partition=64)
    got = paged_decode_attention_fused(qkv, pos, cs, kc, vc, slots, bt, ctx, 8, 2, 16, 0.25, partition=64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_fused_decode_twice_reuses_the_counters():
    # a second call (the next layer, the next step) must find every counter back at zero
    qkv, pos, cs, kc, vc, slots, bt, ctx, *_ = _step(CTX, None, 8, 2)
    first = paged_decode_attention_fused(qkv, pos, cs, kc, vc, slots, bt, ctx, 8, 2, 16, 0.25, partition=64)
    second = paged_decode_attention_fused(qkv, pos, cs, kc, vc, slots, bt, ctx, 8, 2, 16, 0.25, partition=64)
    assert torch.equal(first, second)


def test_fused_decode_refuses_fp8_off_cuda():
    qkv, pos, cs, kc, vc, slots, bt, ctx, ks, vs = _step([5], FP8, 4, 2)
    with pytest.raises(BadInputError, match="CUDA"):
        paged_decode_attention_fused(qkv, pos, cs, kc, vc, slots, bt, ctx, 4, 2, 16, 0.25, ks, vs)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [None, FP8])
def test_fused_decode_on_gpu(fmt):
    # bf16 dots, Llama-3-8B heads (the merge holds all 4 query heads of a KV head), long and short contexts in one
    # batch; vs the three-kernel path on the same card
    Hq, Hkv, D = 32, 8, 128
    lens = [1, 17, 3000, 640, 64]
    qkv, pos, cs, kc, vc, slots, bt, ctx, ks, vs = _step(lens, fmt, Hq, Hkv, D=D, block_size=16, num_blocks=320,
                                                         device="cuda", dtype=torch.bfloat16)
    if fmt is None:
        kc, vc = kc.bfloat16(), vc.bfloat16()
    caches = [t.clone() if t is not None else None for t in (kc, vc, ks, vs)]
    q = rope_store_kv_triton(qkv, pos, cs, caches[0], caches[1], slots, Hq, Hkv, D, caches[2], caches[3])
    for partition in (None, 256):
        want = paged_decode_attention_split(q, caches[0], caches[1], bt, ctx, D ** -0.5, caches[2], caches[3],
                                            partition=partition).float()
        k_run, v_run, ks_run, vs_run = (t.clone() if t is not None else None for t in (kc, vc, ks, vs))
        got = paged_decode_attention_fused(qkv, pos, cs, k_run, v_run, slots, bt, ctx, Hq, Hkv, D, D ** -0.5,
                                           ks_run, vs_run, partition=partition).float()
        # bf16 outputs: the new token's terms summed in fp32 from registers may move an output by a rounding step
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        if fmt is None:
            assert torch.equal(k_run, caches[0]) and torch.equal(v_run, caches[1])
        else:  # k may differ by a bf16 rounding (FMA contraction), so rarely by one quantization step
            x, y = dequantize_kv(caches[0], caches[2], torch.float32), dequantize_kv(k_run, ks_run, torch.float32)
            assert ((x - y).abs() <= x.abs() * 2.0 ** -3 + caches[2].float().unsqueeze(-1) * 1.01).all()
            assert torch.equal(v_run.view(torch.uint8), caches[1].view(torch.uint8)) and torch.equal(vs_run, caches[3])
