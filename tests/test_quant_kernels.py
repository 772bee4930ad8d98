"""Triton weight-only int4/int8 kernels vs their PyTorch references (TRITON_INTERPRET=1 on CPU; tiny shapes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from onecard.errors import BadInputError
from onecard.kernels.counters import zeroed_counters
from onecard.kernels.wo_matmul import (
    CONFIGS,
    KernelConfig,
    _rowwise,
    dequantize,
    dequantize_reference,
    kernel_for,
    pick_config,
    split_k_count,
    unpack_reference,
    wo_matmul,
    wo_matmul_bf16x2_reference,
    wo_matmul_reference,
)
from onecard.quant.linear import QuantLinear
from onecard.quant.packing import pack_rows
from onecard.quant.rtn import QuantizedWeight, rtn_quantize

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


@pytest.mark.parametrize("bits,group_size,K,N", [(4, 32, 96, 80), (4, 64, 80, 48), (8, -1, 96, 40), (4, 128, 256, 48)])
def test_dequant_kernel_bit_exact(bits, group_size, K, N):
    qw, packed, s, z, gs = _packed(K, N, bits, group_size)
    ref = dequantize_reference(packed, s, z, bits, gs)
    assert torch.equal(dequantize(packed, s, z, bits, gs), ref)
    # and the reference is the QuantizedWeight's own dequantization (same formula, same order of ops)
    assert torch.equal(ref.cpu(), qw.dequantize().t())


# (bits, group_size, K, N, M, config): every kernel (gemv / dot) with and without split-K, tiles inside one group
# and tiles spanning several (ROWWISE), K tails (K / P not a multiple of the tile), N not a multiple of the block.
# config None = the table's choice for that M (M = 40 and 70 land in the two largest buckets).
GEMV, DOT, DOT_T, BF16X2 = "gemv", "dot", "dot_t", "gemv_bf16x2"
MATMUL_CASES = [
    (4, 128, 256, 80, 1, None),
    (8, 128, 256, 80, 1, None),
    (4, 32, 224, 80, 3, None),
    (8, -1, 96, 40, 3, None),
    (8, 64, 256, 80, 8, None),
    (4, -1, 200, 80, 16, None),
    (4, 64, 256, 48, 40, None),
    (8, 128, 256, 80, 40, None),
    (4, 128, 256, 48, 70, None),
    (4, 64, 256, 48, 2, KernelConfig(GEMV, 2, 64, 8, 0.0)),
    (4, 128, 256, 80, 1, KernelConfig(GEMV, 1, 64, 16, 4.0)),
    (8, 32, 128, 80, 1, KernelConfig(GEMV, 1, 128, 16, 1.0)),
    (4, 32, 224, 48, 4, KernelConfig(GEMV, 4, 64, 16, 0.0)),
    (8, 128, 256, 80, 5, KernelConfig(DOT, 16, 64, 32, 0.0)),
    (4, 128, 256, 80, 16, KernelConfig(DOT, 16, 64, 16, 4.0)),
    (4, 32, 224, 48, 16, KernelConfig(DOT, 16, 64, 16, 0.0)),
    # prefetch: across a whole unsplit K, and with one tile per split (the next split's rows masked off); the
    # int8 per-channel case also takes the one-group path (scale and zero after the loop)
    (4, 64, 256, 48, 1, KernelConfig(GEMV, 1, 32, 8, 0.0, prefetch=True)),
    (8, -1, 256, 80, 1, KernelConfig(GEMV, 1, 64, 8, 4.0, prefetch=True)),
    (8, -1, 256, 80, 2, KernelConfig(GEMV, 2, 64, 16, 0.0)),
    # the transposed dot: split and not, 4- and 8-bit, M not a multiple of its block; spanning groups it runs the dot
    (4, 128, 256, 80, 16, KernelConfig(DOT_T, 16, 64, 16, 4.0)),
    (8, -1, 256, 48, 12, KernelConfig(DOT_T, 16, 32, 16, 0.0)),
    (4, 32, 224, 48, 16, KernelConfig(DOT_T, 16, 64, 16, 4.0)),
    # row tiles of 32 and 64 (what a sweep may pick for decode batches above 16 rows), M not a multiple of them
    (4, 128, 256, 80, 40, KernelConfig(DOT_T, 32, 64, 16, 2.0)),
    (8, -1, 256, 48, 70, KernelConfig(DOT_T, 64, 32, 32, 0.0)),
]


def _case_paths(bits, group_size, K, N, M, config) -> tuple[str, bool, bool]:
    """(kernel, rowwise, split) that a case runs: what the coverage test checks."""
    c = config or pick_config(M, bits)
    gs = K if group_size == -1 else group_size
    k_tiles = -(-(K * bits // 32) // c.block_kp)
    grid = -(-M // c.block_m) * -(-N // c.block_n)
    rowwise = _rowwise(gs, K, bits, c.block_kp)
    return kernel_for(c, bits, torch.empty(0, device=DEV), rowwise), rowwise, split_k_count(c.waves, grid, k_tiles, torch.device(DEV)) > 1


def test_matmul_cases_cover_every_path():
    """Every kernel x (one group per tile, several) x (split-K, not); on CPU ``gemv_bf16x2`` runs as the ``gemv``
    (its PTX has no interpreter), so its tile walk is covered there and its arithmetic by the emulation below."""
    paths = {_case_paths(*case) for case in MATMUL_CASES}
    assert paths == {(k, r, s) for k in (GEMV, DOT) for r in (False, True) for s in (False, True)} | {
        (DOT_T, False, s) for s in (False, True)}
    assert (DOT, True, True) in {_case_paths(*case) for case in MATMUL_CASES if case[-1] and case[-1].kernel == DOT_T}


def test_packed_bf16_needs_4_bit_bf16_on_an_ampere_or_later_gpu(monkeypatch):
    from onecard.kernels import wo_matmul as W

    meta = torch.empty(1, 8, dtype=torch.bfloat16, device="meta")  # stands in for a CUDA tensor's dtype
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(W, "_capability", lambda device: (8, 6))
    assert W.packed_bf16_ok(4, meta) and not W.packed_bf16_ok(8, meta)
    assert W.packed_bf16_ok(4, meta.half()) and not W.packed_bf16_ok(4, meta.float())  # fp16 rounds to bf16
    config = KernelConfig(BF16X2, 1, 32, 32, 8.0)
    assert kernel_for(config, 4, meta) == BF16X2
    monkeypatch.setattr(W, "_capability", lambda device: (7, 5))  # Turing: no bf16x2 FMA
    assert not W.packed_bf16_ok(4, meta) and kernel_for(config, 4, meta) == GEMV


@pytest.mark.parametrize("group_size,K,M,dtype", [(128, 256, 1, torch.bfloat16), (32, 224, 3, torch.bfloat16),
                                                   (128, 256, 2, torch.float16)])
def test_bf16x2_emulation_within_bf16_rounding_of_reference(group_size, K, M, dtype):
    """The packed kernel's arithmetic (``wo_matmul_bf16x2_reference``) stays within bf16 rounding of the exact
    product: each four-term chain rounds to bf16 (2**-9 relative), so the bound scales with |x| @ |w|."""
    _, packed, s, z, gs = _packed(K, 48, 4, group_size, seed=M)
    x = torch.randn(M, K, device=DEV).to(dtype)  # fp16 x: the kernel rounds it to bf16 first (2**-9 more)
    exact = wo_matmul_reference(x.float(), packed, s, z, 4, gs)
    emulated = wo_matmul_bf16x2_reference(x, packed, s, z, gs)
    bound = 2 ** -7 * (x.float().abs() @ dequantize_reference(packed, s, z, 4, gs).abs())
    assert ((emulated - exact).abs() <= bound).all()
    assert (emulated - exact).abs().max() > 0  # it does round: the emulation is not the fp32 reference again


@pytest.mark.gpu
@pytest.mark.parametrize("group_size,M,prefetch,waves,dtype", [(128, 1, False, 8.0, torch.bfloat16),
                                                               (32, 1, True, 4.0, torch.bfloat16),
                                                               (64, 2, False, 4.0, torch.bfloat16),
                                                               (128, 1, True, 0.0, torch.bfloat16),
                                                               (128, 4, True, 1.0, torch.bfloat16),
                                                               (128, 1, True, 4.0, torch.float16)])
def test_bf16x2_kernel_matches_its_emulation_on_gpu(group_size, M, prefetch, waves, dtype):
    """waves 0: one program walks all of K (the prefetch crosses every tile); 1-8: split-K, a few tiles each.
    fp16 x: rounded to bf16 as it loads, which the emulation does first."""
    K, N = 4096, 4096
    _, packed, s, z, gs = _packed(K, N, 4, group_size)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    config = KernelConfig(BF16X2, M, 32, 32, waves, prefetch=prefetch)
    assert kernel_for(config, 4, x) == BF16X2
    y = wo_matmul(x, packed, s, z, 4, gs, config)
    # the same roundings, summed in another order (fp32) and rounded once to bf16 at the end
    torch.testing.assert_close(y.float(), wo_matmul_bf16x2_reference(x, packed, s, z, gs), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("bits,group_size,K,N,M,config", MATMUL_CASES)
def test_matmul_kernel_matches_reference(bits, group_size, K, N, M, config):
    _, packed, s, z, gs = _packed(K, N, bits, group_size, seed=M)
    x = torch.randn(M, K, device=DEV)
    y = wo_matmul(x, packed, s, z, bits, gs, config)
    ref = wo_matmul_reference(x, packed, s, z, bits, gs)
    assert y.shape == (M, N) and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    if _case_paths(bits, group_size, K, N, M, config)[2]:  # split-K: the last split reset every tile's counter
        assert not zeroed_counters(x.device, 1, "wo_matmul").any()
        torch.testing.assert_close(wo_matmul(x, packed, s, z, bits, gs, config), y, rtol=0, atol=0)  # deterministic


def test_config_table_and_split():
    assert pick_config(1, 4).kernel == BF16X2 and pick_config(1, 8).kernel == GEMV
    assert pick_config(3, 8) == CONFIGS[(4, 8)]
    assert pick_config(10**6, 4) == CONFIGS[(max(m for m, _ in CONFIGS), 4)]
    cfg = KernelConfig(GEMV, 1, 64, 16, 1.0)
    assert split_k_count(cfg.waves, grid_mn=1, k_tiles=10, device=torch.device("cpu")) == 4      # 4 SMs x 1 wave, 3+3+3+1 tiles
    assert split_k_count(cfg.waves, grid_mn=1, k_tiles=3, device=torch.device("cpu")) == 3       # never more splits than tiles
    assert split_k_count(cfg.waves, grid_mn=8, k_tiles=10, device=torch.device("cpu")) == 1      # enough output tiles already
    with pytest.raises(BadInputError, match="tl.dot"):
        KernelConfig(DOT, 4, 64, 16, 0.0)
    with pytest.raises(BadInputError, match="power-of-two"):
        KernelConfig(GEMV, 3, 64, 16, 0.0)


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
@pytest.mark.parametrize("M", [1, 16, 32, 48, 64, 1024])
def test_kernel_bf16_on_gpu(M):
    K, N = 4096, 4096
    _, packed, s, z, gs = _packed(K, N, 4, 128)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    exact = wo_matmul_reference(x.float(), packed, s, z, 4, gs)
    # bf16 output: each element carries bf16 rounding of a sum whose terms reach |x| @ |w|, so the bound scales with
    # that magnitude, not with the (possibly cancelling) result
    bound = 2 ** -7 * (x.float().abs() @ dequantize_reference(packed, s, z, 4, gs).abs()) + 1e-3
    assert ((wo_matmul(x, packed, s, z, 4, gs).float() - exact).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,M,dtype,block_m", [
    (4, 128, 16, torch.bfloat16, 16), (4, 128, 5, torch.bfloat16, 16), (8, -1, 16, torch.bfloat16, 16),
    (4, 128, 16, torch.float16, 16), (4, 128, 40, torch.bfloat16, 32), (8, -1, 64, torch.bfloat16, 64)])
def test_dot_t_kernel_bf16_on_gpu(bits, group_size, M, dtype, block_m):
    """The transposed dot at bf16 (the bf16x2 dequantization for 4-bit, the fp32 conversion for 8-bit), split-K;
    fp16 x takes the bf16x2 codes too, rounded to bf16 as it loads; row tiles above 16 (decode batches of 17-128)."""
    K, N = 4096, 4096
    _, packed, s, z, gs = _packed(K, N, bits, group_size)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    config = KernelConfig(DOT_T, block_m, 128, 16 if bits == 4 else 32, 2.0, 8)
    assert kernel_for(config, bits, x) == DOT_T
    exact = wo_matmul_reference(x.float(), packed, s, z, bits, gs)
    bound = 2 ** -7 * (x.float().abs() @ dequantize_reference(packed, s, z, bits, gs).abs()) + 1e-3
    assert ((wo_matmul(x, packed, s, z, bits, gs, config).float() - exact).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize("M,act_order", [(1, False), (16, True), (2048, False)])
def test_tinygemm_repack_matches_the_reference_on_gpu(M, act_order):
    """The engine's default CUDA int4 path (PyTorch's _weight_int4pack_mm) computes our weights up to the bf16
    rounding of each group's scale and zero."""
    from onecard.quant.linear import use_tinygemm_

    K, N, gs = 4096, 1024, 128
    torch.manual_seed(0)
    g_idx = (torch.arange(K) // gs).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(K)]
    qw = QuantizedWeight(torch.randint(0, 16, (N, K), dtype=torch.uint8), torch.rand(K // gs, N).half() * 0.02 + 1e-3,
                         torch.randint(0, 16, (K // gs, N), dtype=torch.int32), g_idx, 4, gs)
    lin = QuantLinear.from_quantized(qw).cuda()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = qw.dequantize().float().cuda()
    exact = x.float() @ w.t()
    assert use_tinygemm_(lin) == 1 and lin.tg_weight is not None and lin.qweight.numel() == 0
    bound = 2 ** -6 * (x.float().abs() @ w.abs().t()) + 1e-3  # bf16 scale + zero rounding, bf16 output
    assert ((lin(x).float() - exact).abs() <= bound).all()


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


def test_sweep_grid_tries_what_each_row_runs(benchmark_script):
    """``benchmarks/quant_kernels.py --sweep`` prints the CONFIGS table: its grid must hold the kernels the table
    uses (bf16x2 for 4-bit rows up to M = 2, the fp32 gemv for 8-bit, dot from M = 4, dot_t alone above 16 rows),
    with and without the prefetch at M = 1, and the current table rows must be points of it (so a sweep can
    reproduce them)."""
    qk = benchmark_script("quant_kernels")
    for M, bits in ((1, 4), (2, 4), (1, 8), (2, 8)):
        grid = qk.candidates(M, bits, smoke=False)
        assert {c.kernel for c in grid if c.block_m <= 2} == ({BF16X2} if bits == 4 else {GEMV})
        assert {c.prefetch for c in grid} == ({False, True} if M == 1 else {False})
    assert {c.kernel for c in qk.candidates(16, 4, smoke=False)} == {DOT, DOT_T}
    for M in (32, 64, 128):  # decode batches above 16 rows: dot_t with row tiles up to M, against dequantize + cuBLAS
        grid = qk.candidates(M, 8, smoke=False)
        assert {c.kernel for c in grid} == {DOT_T}
        assert {c.block_m for c in grid} == {16, 32, 64, 128} & set(range(M + 1))
    for (M, bits), row in CONFIGS.items():
        if M <= 16:
            points = {dataclasses.replace(c, num_stages=row.num_stages, pdl=row.pdl)
                      for c in qk.candidates(M, bits, smoke=False)}
            assert row in points, (M, bits, row)


def test_wo_mma_sweep_grid_holds_its_table(benchmark_script):
    """``--sweep`` also tunes ``kernels.wo_mma`` per row bucket; each current row must be a point of its grid."""
    from onecard.kernels import wo_mma

    qk = benchmark_script("quant_kernels")
    for table in wo_mma.CONFIGS.values():
        for bucket, row in table.items():
            grid = qk.mma_candidates(bucket)
            assert row in grid and {c.block_m for c in grid} == {bucket}
