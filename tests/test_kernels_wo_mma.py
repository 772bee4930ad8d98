"""The Gluon tensor-core kernel (``onecard.kernels.wo_mma``, int4 g128 and int8 per-channel): where it runs, and
its results on the GPU.

Gluon has no CPU interpreter, so the kernel itself is checked on the GPU only; on CPU these tests check which
inputs it takes (everything else falls back to the Triton kernels, which the interpreter tests)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from onecard.kernels import wo_mma
from onecard.kernels.counters import zeroed_counters
from onecard.kernels.wo_matmul import dequantize_reference, wo_matmul, wo_matmul_reference
from onecard.quant.packing import pack_rows
from onecard.quant.rtn import rtn_quantize

needs_gluon = pytest.mark.skipif(wo_mma.gluon is None, reason="this Triton has no Gluon")
FORMATS = {4: 128, 8: -1}  # bits -> the group size the kernel reads (-1: per channel)


def _packed(K: int, N: int, device: str, bits: int = 4, seed: int = 0):
    """Codes as the engine stores them, with the group size ``wo_matmul`` is called with (K for per channel)."""
    torch.manual_seed(seed)
    qw = rtn_quantize(torch.randn(N, K), bits, FORMATS[bits], sym=False)
    group = FORMATS[bits] if FORMATS[bits] > 0 else K
    return (pack_rows(qw.q.t().contiguous(), bits).to(device), qw.scales.to(device), qw.zeros.half().to(device),
            group)


@needs_gluon
def test_pick_takes_int4_g128_at_2_to_64_rows_and_int8_per_channel_at_1_to_32(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(wo_mma, "_capability", lambda device: (8, 9))

    def pick(M, bits=4, group=128, N=4096, dtype=torch.bfloat16, K=256):
        return wo_mma.pick(torch.empty(M, K, dtype=dtype), bits, group, N)

    for bits, group, rows in ((4, 128, range(2, 65)), (8, 256, range(1, 33))):
        for M in rows:  # int4's 33-64 rows: two launches, the first of 32
            c = pick(M, bits, group)
            assert c is not None and c.block_m >= min(max(M, 8), 32) and c.block_m & (c.block_m - 1) == 0
    assert pick(1) is None and pick(65) is None                       # the int4 GEMV; dequantize + cuBLAS
    assert pick(33, 8, 256) is None                                   # int8 dot_t reads less from 33 rows
    assert pick(8, group=64) is None and pick(8, group=256) is None   # int4 in other groups
    assert pick(8, 8, 128) is None and pick(8, 8, 256, K=320) is None  # int8 in groups; K not of 128
    assert pick(8, bits=3) is None
    assert pick(8, dtype=torch.float16) is None and pick(8, dtype=torch.float32) is None
    assert pick(8, N=4096 + 32) is None                                 # N not a multiple of the tile
    rows = torch.empty(8, 256 + 8, dtype=torch.bfloat16)[:, :256]       # x rows 16-byte aligned, not 32
    assert wo_mma.pick(rows, 4, 128, 4096) is None
    assert wo_mma.pick(torch.empty(8, 256 + 16, dtype=torch.bfloat16)[:, :256], 4, 128, 4096) is not None
    monkeypatch.setattr(wo_mma, "_capability", lambda device: (7, 5))
    assert pick(8) is None and pick(8, 8, 256) is None


def test_pick_declines_cpu_tensors():
    assert wo_mma.pick(torch.empty(8, 256, dtype=torch.bfloat16), 4, 128, 4096) is None
    assert wo_mma.pick(torch.empty(8, 256, dtype=torch.bfloat16), 8, 256, 4096) is None


def _bound(x, packed, s, z, bits, group):
    """bf16 output: rounding of a sum whose terms reach ``|x| @ |w|`` (as the other GPU kernel tests)."""
    return 2 ** -7 * (x.float().abs() @ dequantize_reference(packed, s, z, bits, group).abs()) + 1e-3


def _rows(bits: int) -> list[int]:
    return [M for M in (1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 48, 64) if wo_mma.MIN_ROWS[bits] <= M
            <= wo_mma.MAX_ROWS[bits]]


@pytest.mark.gpu
@pytest.mark.parametrize("bits,M", [(b, M) for b in FORMATS for M in _rows(b)])
@pytest.mark.parametrize("K,N", [(4096, 4096), (11008, 4096), (1024, 22016)])
def test_engine_path_matches_reference_on_gpu(bits, M, K, N):
    """``wo_matmul`` as the engine calls it takes this kernel here (split-K where the tiles alone are few; int4 from
    33 rows in two launches)."""
    packed, s, z, group = _packed(K, N, "cuda", bits, seed=M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    assert wo_mma.pick(x, bits, group, N) is not None
    y = wo_matmul(x, packed, s, z, bits, group)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    ref = wo_matmul_reference(x.float(), packed, s, z, bits, group)
    assert ((y.float() - ref).abs() <= _bound(x, packed, s, z, bits, group)).all()
    assert not zeroed_counters(x.device, 1, "wo_mma").any()  # the last split of each tile reset its counter


@pytest.mark.gpu
def test_int8_keeps_small_and_large_activations_on_gpu():
    """x goes to fp16 scaled by 2**-8 for the int8 mma: a row of activations ~1e-3 and rows with 3e4 in a few
    (outlier) channels stay within the bf16 output's rounding (no flush to zero, no overflow)."""
    K, N, M = 4096, 4096, 4
    packed, s, z, group = _packed(K, N, "cuda", 8)
    x = torch.randn(M, K, device="cuda") * 1e-3   # row 0 small throughout: its output is ~0.1
    x[1:, :8] = 3e4
    x = x.bfloat16()
    y = wo_matmul(x, packed, s, z, 8, group)
    ref = wo_matmul_reference(x.float(), packed, s, z, 8, group)
    assert torch.isfinite(y).all() and ((y.float() - ref).abs() <= _bound(x, packed, s, z, 8, group)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("bits", list(FORMATS))
@pytest.mark.parametrize("waves", [0.0, 1.0, 8.0])
def test_split_k_and_pdl_do_not_change_the_result_on_gpu(bits, waves):
    K, N, M = 4096, 4096, 16
    packed, s, z, group = _packed(K, N, "cuda", bits)
    big = torch.randn(M, K + 64, device="cuda", dtype=torch.bfloat16)
    x = big[:, :K]                                    # rows with a stride larger than K
    config = dataclasses.replace(wo_mma.pick(x, bits, group, N), waves=waves)
    y = wo_mma.wo_mma(x, packed, s, z, bits, config, pdl=True)
    assert torch.equal(y, wo_mma.wo_mma(x, packed, s, z, bits, config, pdl=False))
    ref = wo_matmul_reference(x.float(), packed, s, z, bits, group)
    assert ((y.float() - ref).abs() <= _bound(x, packed, s, z, bits, group)).all()
    base = wo_mma.wo_mma(x, packed, s, z, bits, dataclasses.replace(config, waves=0.0))
    assert (y.float() - base.float()).abs().max() <= 2 ** -7 * base.float().abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("bits", list(FORMATS))
def test_same_result_replayed_in_a_cuda_graph_on_gpu(bits):
    K, N, M = 4096, 12288, 8
    packed, s, z, group = _packed(K, N, "cuda", bits)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    eager = wo_matmul(x, packed, s, z, bits, group)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = wo_matmul(x, packed, s, z, bits, group)
    for _ in range(3):
        g.replay()
        assert torch.equal(out, eager)


def _compile_error():
    from triton.compiler.errors import CompilationError

    return CompilationError("k.py", None, "async_copy_global_to_shared has been removed")


def _ptxas_error():
    from triton.runtime.errors import PTXASError

    return PTXASError("ptxas fatal: unknown instruction")


def _out_of_shared_memory():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(131072, 101376, "shared memory")


@needs_gluon
@pytest.mark.parametrize("error", [_compile_error, _ptxas_error, _out_of_shared_memory])
def test_a_triton_whose_gluon_cannot_build_it_falls_back_with_a_warning(monkeypatch, error):
    """A Gluon API change (compile error), a ptxas that rejects its PTX, a GPU with less shared memory a block than
    a config needs: each is a warning and the Triton kernels, not a failed request."""
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise error()
            return launch

    monkeypatch.setattr(wo_mma, "_wo_mma_kernel", Broken())
    monkeypatch.setattr(wo_mma, "_unusable", None)
    packed, s, z, _ = _packed(256, 64, "cpu")
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="does not build with Triton"):
        assert wo_mma.wo_mma(x, packed, s, z, 4, wo_mma.CONFIGS[4][8]) is None
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(wo_mma, "_capability", lambda device: (9, 0))
    assert wo_mma.pick(x, 4, 128, 64) is None  # not tried again
