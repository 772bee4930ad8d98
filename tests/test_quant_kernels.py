"""Triton weight-only int4/int8 kernels vs their PyTorch references (TRITON_INTERPRET=1 on CPU; tiny shapes)."""

from __future__ import annotations

import pytest
import torch

from onecard.kernels.wo_matmul import (dequantize, dequantize_reference, unpack_reference, wo_matmul,
                                       wo_matmul_reference)
from onecard.quant.linear import QuantLinear
from onecard.quant.packing import pack_rows
from onecard.quant.rtn import rtn_quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _packed(K: int, N: int, bits: int, group_size: int, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(N, K)
    qw = rtn_quantize(w, bits, group_size, sym=False)
    gs = K if group_size == -1 else group_size
    return qw, pack_rows(qw.q.t().contiguous(), bits).to(DEV), qw.scales.to(DEV), qw.zeros.half().to(DEV), gs


def test_unpack_reference_inverts_pack():
    codes = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    assert torch.equal(unpack_reference(pack_rows(codes, 4), 4), codes)
    codes8 = torch.randint(0, 256, (64, 24), dtype=torch.int32)
    assert torch.equal(unpack_reference(pack_rows(codes8, 8), 8), codes8)


@pytest.mark.parametrize("bits,group_size,K,N", [(4, 32, 96, 80), (4, 64, 80, 48), (8, -1, 96, 40)])
def test_dequant_kernel_bit_exact(bits, group_size, K, N):
    qw, packed, s, z, gs = _packed(K, N, bits, group_size)
    ref = dequantize_reference(packed, s, z, bits, gs)
    assert torch.equal(dequantize(packed, s, z, bits, gs), ref)
    # and the reference is the QuantizedWeight's own dequantization (same formula, same order of ops)
    assert torch.equal(ref.cpu(), qw.dequantize().t())


@pytest.mark.parametrize("bits,group_size,M", [(4, 32, 1), (4, 32, 5), (8, -1, 3), (4, 64, 20)])
def test_matmul_kernel_matches_reference(bits, group_size, M):
    """M <= 16 takes the split-K decode path, M = 20 the tiled GEMM path; K = 96 ends in a partial tile."""
    K, N = 96, 80
    _, packed, s, z, gs = _packed(K, N, bits, group_size, seed=M)
    x = torch.randn(M, K, device=DEV)
    y = wo_matmul(x, packed, s, z, bits, gs)
    ref = wo_matmul_reference(x, packed, s, z, bits, gs)
    assert y.shape == (M, N) and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_kernel_rejects_inconsistent_tensors():
    _, packed, s, z, gs = _packed(64, 32, 4, 32)
    with pytest.raises(ValueError, match="bad packed weight"):
        wo_matmul(torch.randn(1, 64, device=DEV), packed, s[:1], z, 4, gs)


def test_quant_linear_act_order_permutation():
    """An act-order weight is repacked with contiguous groups; forward and dequantized weight stay exact."""
    from onecard.quant.rtn import QuantizedWeight

    torch.manual_seed(0)
    K, N, gs = 64, 32, 16 * 2
    perm = torch.randperm(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // gs).to(torch.int32)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    qw = QuantizedWeight(q, torch.rand(K // gs, N).half() + 0.01, torch.randint(1, 16, (K // gs, N), dtype=torch.int32),
                         g_idx, 4, gs)
    lin = QuantLinear.from_quantized(qw)
    assert lin.perm is not None
    assert torch.equal(lin.dequantized_weight(), qw.dequantize())
    x = torch.randn(3, K)
    torch.testing.assert_close(lin(x), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)
    if DEV == "cpu":  # the Triton path on the same module, through the interpreter
        y = wo_matmul(x.index_select(-1, lin.perm), lin.qweight, lin.scales, lin.zeros, 4, lin.group_size)
        torch.testing.assert_close(y, x @ qw.dequantize().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 1024])
def test_kernel_bf16_on_gpu(M):
    K, N = 4096, 4096
    _, packed, s, z, gs = _packed(K, N, 4, 128)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(wo_matmul(x, packed, s, z, 4, gs), wo_matmul_reference(x, packed, s, z, 4, gs),
                               rtol=2e-2, atol=2e-1)


def test_concat_linear_fallback_adds_fused_bias():
    """Projections that cannot be fused (different g_idx) run side by side; the fused bias still applies."""
    from onecard.quant.linear import ConcatLinear

    torch.manual_seed(0)
    a = QuantLinear.from_quantized(rtn_quantize(torch.randn(8, 32), 4, 32))
    b = QuantLinear.from_quantized(rtn_quantize(torch.randn(4, 32), 4, 32))
    cat = ConcatLinear([a, b])
    cat.bias = torch.nn.Parameter(torch.randn(12))
    x = torch.randn(3, 32)
    torch.testing.assert_close(cat(x), torch.cat([a(x), b(x)], -1) + cat.bias)
