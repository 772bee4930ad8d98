"""The Gluon int4 tensor-core kernel (``onecard.kernels.w4_mma``): where it runs, and its results on the GPU.

Gluon has no CPU interpreter, so the kernel itself is checked on the GPU only; on CPU these tests check which
inputs it takes (everything else falls back to the Triton kernels, which the interpreter tests)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from onecard.kernels import w4_mma
from onecard.kernels.counters import zeroed_counters
from onecard.kernels.wo_matmul import dequantize_reference, wo_matmul, wo_matmul_reference
from onecard.quant.packing import pack_rows
from onecard.quant.rtn import rtn_quantize

needs_gluon = pytest.mark.skipif(w4_mma.gluon is None, reason="this Triton has no Gluon")


def _packed(K: int, N: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    qw = rtn_quantize(torch.randn(N, K), 4, 128, sym=False)
    return (pack_rows(qw.q.t().contiguous(), 4).to(device), qw.scales.to(device), qw.zeros.half().to(device))


@needs_gluon
def test_pick_takes_int4_g128_bf16_at_2_to_64_rows_on_ampere_or_later(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(w4_mma, "_capability", lambda device: (8, 9))

    def pick(M, bits=4, group=128, N=4096, dtype=torch.bfloat16):
        return w4_mma.pick(torch.empty(M, 256, dtype=dtype), bits, group, N)

    for M in range(2, 65):  # 33-64 rows: two launches, the first of 32
        c = pick(M)
        assert c is not None and c.block_m >= min(max(M, 8), 32) and c.block_m & (c.block_m - 1) == 0
    assert pick(1) is None and pick(65) is None   # the GEMV; dequantize + cuBLAS
    assert pick(8, bits=8) is None and pick(8, group=64) is None and pick(8, group=4096) is None
    assert pick(8, dtype=torch.float16) is None and pick(8, dtype=torch.float32) is None
    assert pick(8, N=4096 + 32) is None                                 # N not a multiple of the tile
    rows = torch.empty(8, 256 + 8, dtype=torch.bfloat16)[:, :256]       # x rows 16-byte aligned, not 32
    assert w4_mma.pick(rows, 4, 128, 4096) is None
    assert w4_mma.pick(torch.empty(8, 256 + 16, dtype=torch.bfloat16)[:, :256], 4, 128, 4096) is not None
    monkeypatch.setattr(w4_mma, "_capability", lambda device: (7, 5))
    assert pick(8) is None


def test_pick_declines_cpu_tensors():
    assert w4_mma.pick(torch.empty(8, 256, dtype=torch.bfloat16), 4, 128, 4096) is None


def _bound(x, packed, s, z):
    """bf16 output: rounding of a sum whose terms reach ``|x| @ |w|`` (as the other GPU kernel tests)."""
    return 2 ** -7 * (x.float().abs() @ dequantize_reference(packed, s, z, 4, 128).abs()) + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("M", [2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 48, 64])
@pytest.mark.parametrize("K,N", [(4096, 4096), (11008, 4096), (1024, 22016)])
def test_engine_path_matches_reference_on_gpu(M, K, N):
    """``wo_matmul`` as the engine calls it takes this kernel here (split-K where the tiles alone are few; from 33
    rows in two launches)."""
    packed, s, z = _packed(K, N, "cuda", seed=M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    assert w4_mma.pick(x, 4, 128, N) is not None
    y = wo_matmul(x, packed, s, z, 4, 128)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert ((y.float() - wo_matmul_reference(x.float(), packed, s, z, 4, 128)).abs() <= _bound(x, packed, s, z)).all()
    assert not zeroed_counters(x.device, 1, "w4_mma").any()  # the last split of each tile reset its counter


@pytest.mark.gpu
@pytest.mark.parametrize("waves", [0.0, 1.0, 8.0])
def test_split_k_and_pdl_do_not_change_the_result_on_gpu(waves):
    K, N, M = 4096, 4096, 16
    packed, s, z = _packed(K, N, "cuda")
    big = torch.randn(M, K + 64, device="cuda", dtype=torch.bfloat16)
    x = big[:, :K]                                    # rows with a stride larger than K
    config = dataclasses.replace(w4_mma.pick(x, 4, 128, N), waves=waves)
    y = w4_mma.w4_mma(x, packed, s, z, config, pdl=True)
    assert torch.equal(y, w4_mma.w4_mma(x, packed, s, z, config, pdl=False))
    assert ((y.float() - wo_matmul_reference(x.float(), packed, s, z, 4, 128)).abs() <= _bound(x, packed, s, z)).all()
    base = w4_mma.w4_mma(x, packed, s, z, dataclasses.replace(config, waves=0.0))
    assert (y.float() - base.float()).abs().max() <= 2 ** -7 * base.float().abs().max()


@pytest.mark.gpu
def test_same_result_replayed_in_a_cuda_graph_on_gpu():
    K, N, M = 4096, 12288, 8
    packed, s, z = _packed(K, N, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    eager = wo_matmul(x, packed, s, z, 4, 128)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = wo_matmul(x, packed, s, z, 4, 128)
    for _ in range(3):
        g.replay()
        assert torch.equal(out, eager)


@needs_gluon
def test_a_triton_whose_gluon_cannot_build_it_falls_back_with_a_warning(monkeypatch):
    from triton.compiler.errors import CompilationError

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise CompilationError("k.py", None, "async_copy_global_to_shared has been removed")
            return launch

    monkeypatch.setattr(w4_mma, "_w4_mma_kernel", Broken())
    monkeypatch.setattr(w4_mma, "_unusable", None)
    packed, s, z = _packed(256, 64, "cpu")
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="does not build with Triton"):
        assert w4_mma.w4_mma(x, packed, s, z, w4_mma.CONFIGS[8]) is None
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(w4_mma, "_capability", lambda device: (9, 0))
    assert w4_mma.pick(x, 4, 128, 64) is None  # not tried again
