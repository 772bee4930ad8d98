"""Per-row fp8 (e4m3) quantization of activations in one kernel: ``Fp8Linear``'s input to ``torch._scaled_mm``.

Why a kernel: as PyTorch ops (abs, amax, divide, clamp, cast) it is five passes over the activations plus small
launches, and on an H100 that cost as much as the fp8 GEMM it feeds (~100 us for a 2048 x 4096 input against
52-155 us for the matmul, 14-22 us at one row; dev micro-benchmark, 2026-11-27), which erased fp8's speed-up.
Here one program per row reads the row once where it fits in registers (K up to ``ONE_PASS_MAX``: every linear
input and output gradient of an 8B-70B model), twice above that (amax, then quantize), and writes the codes and
one fp32 scale. One pass against two, bit-exact, H100 (dev A/B, graph-timed): 36.4 against 43.7 us for 8192 x 4096,
171.0 against 204.6 for 8192 x 14336, 3.0 against 3.8 at one row.

Arithmetic (both paths, bit for bit on CUDA): ``scale = max(amax(|x|) * fp32(1 / 448), MIN_SCALE)`` in fp32 (a
multiply: what PyTorch does when it divides by a Python number), ``codes = e4m3(clamp(x / scale))`` with IEEE division
(``div_rn``), rounded to nearest even. The CPU interpreter's fp8 stores round wrongly where rounding
carries into the exponent (numpy has no e4m3), so codes are compared exactly on CUDA; the interpreter test feeds
values that need no rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Smallest scale: an all-zero row quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12
BLOCK = 1024  # the two-pass walk's tile
ONE_PASS_MAX = 16384  # widest row held in registers (16 warps x 32 values a thread)


def rowwise_fp8_problem(capability: tuple[int, int], torch_version: str | None = None) -> str | None:
    """Why ``torch._scaled_mm`` with per-row scales (what ``Fp8Linear`` and fp8 LoRA bases run) cannot run on a GPU
    of ``capability`` with this torch; None where it can.

    Hopper has the kernel from torch 2.5 on. Ada (sm_89: RTX 40xx, L4) has it from 2.7, but until 2.12 it launches
    outside the caller's CUDA stream (pytorch/pytorch#177651), which breaks CUDA-graph capture and stalls side
    streams.
    """
    from torch.torch_version import TorchVersion

    if tuple(capability) < (8, 9):
        return (f"fp8 matmuls need fp8 tensor cores (compute capability 8.9+: RTX 40xx, L4, H100), this GPU has "
                f"{tuple(capability)}")
    version = TorchVersion(torch_version or torch.__version__)
    if version < (2, 5):
        return f"row-wise fp8 matmuls need torch >= 2.5 (this is {version}): pip install -U torch"
    if capability[0] == 8 and version < (2, 12):
        return (f"row-wise fp8 matmuls on Ada (sm_89) need torch >= 2.12 (torch {version} launches them outside "
                f"the CUDA stream, pytorch/pytorch#177651): pip install -U torch")
    return None


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` -> fp8 codes and the fp32 ``[M, 1]`` scales with ``x ~= codes * scales``."""
    scale = (x.abs().amax(-1, keepdim=True).float() * (1 / FP8_MAX)).clamp_(min=MIN_SCALE)
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, QMAX: tl.constexpr, MIN: tl.constexpr,
                          BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if ONE_PASS:  # BLOCK >= K: the row stays in registers between its amax and its codes
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 0) * (1.0 / QMAX), MIN)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
        tl.store(q_ptr + row * K + offs, y.to(q_ptr.dtype.element_ty), mask=offs < K)
        tl.store(s_ptr + row, scale)
        return
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) * (1.0 / QMAX), MIN)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
        tl.store(q_ptr + row * K + offs, y.to(q_ptr.dtype.element_ty), mask=offs < K)
    tl.store(s_ptr + row, scale)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_reference`` in one launch (rows may be strided; the last dimension must be contiguous)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    codes = torch.empty(M, K, dtype=FP8, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M:
        one_pass = K <= ONE_PASS_MAX
        block = max(triton.next_power_of_2(K), 128) if one_pass else BLOCK
        launch = {"num_warps": min(16, max(4, block // 1024))} if x.is_cuda else {}
        _quantize_rows_kernel[(M,)](x, codes, scale, K, x.stride(0), QMAX=FP8_MAX, MIN=MIN_SCALE, BLOCK=block,
                                    ONE_PASS=one_pass, **launch)
    return codes, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on CUDA, the PyTorch ops elsewhere (same arithmetic)."""
    return quantize_rows_triton(x) if x.is_cuda else quantize_rows_reference(x)
