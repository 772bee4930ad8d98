"""The training job's int4 base (``train.qlora``) dequantized in one Triton pass, beside the PyTorch reference.

Why a kernel: QLoRA dequantizes every frozen weight three times a step (forward, the checkpoint's recomputation,
the input gradient). In PyTorch ops that is five full-size kernels and their intermediates (the nibbles stacked,
widened, shifted by 8, scaled); here one pass reads the codes and scales and writes the weight once. A
Llama-3-8B QLoRA step (bs 1, seq 2048, an H100, ``benchmarks/train_vs_hf.py --part qlora-bases``) went from
510 ms to 374-412 ms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dequantize_int4_reference(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[out, in]`` in ``dtype`` from two codes a byte (even column in the low nibble, stored + 8) and one scale
    per group of columns: ``(code - 8) * scale``, rounded once to ``dtype``."""
    out_f, half = packed.shape
    groups = scales.shape[1]
    q = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(out_f, 2 * half)
    w = (q.to(dtype) - 8).reshape(out_f, groups, -1) * scales.to(dtype)[..., None]
    return w.reshape(out_f, 2 * half)


@triton.jit
def _dequant_int4_kernel(P, S, W, rows, half, groups, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                  # byte columns: output 2c and 2c + 1
    mask = (r < rows)[:, None] & (c < half)[None, :]
    p = tl.load(P + r[:, None] * half + c[None, :], mask=mask, other=0).to(tl.int32)
    # both of a byte's columns lie in one group (the group size is even); the product of a small integer and the
    # scale is exact in fp32, so one rounding to W's dtype gives what the reference's multiply in that dtype gives
    s = tl.load(S + r[:, None] * groups + (2 * c // GROUP)[None, :], mask=mask, other=0.0).to(tl.float32)
    lo = ((p & 0xF) - 8).to(tl.float32) * s
    hi = ((p >> 4) - 8).to(tl.float32) * s
    w = tl.reshape(tl.join(lo, hi), (BLOCK_R, 2 * BLOCK_C))                  # columns 2c, 2c + 1 interleaved
    cols = tl.program_id(1) * 2 * BLOCK_C + tl.arange(0, 2 * BLOCK_C)
    tl.store(W + r[:, None] * (2 * half) + cols[None, :], w.to(W.dtype.element_ty),
             mask=(r < rows)[:, None] & (cols < 2 * half)[None, :])


def dequantize_int4_triton(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_int4_reference``'s result in one kernel (bit-exact: see the kernel)."""
    rows, half = packed.shape
    groups = scales.shape[1]
    out = torch.empty(rows, 2 * half, dtype=dtype, device=packed.device)
    block_r, block_c = 16, 128
    grid = (triton.cdiv(rows, block_r), triton.cdiv(half, block_c))
    _dequant_int4_kernel[grid](packed.contiguous(), scales.contiguous(), out, rows, half, groups,
                               GROUP=2 * half // groups, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton on CUDA tensors, the PyTorch reference elsewhere (CPU training keeps working)."""
    if packed.is_cuda:
        return dequantize_int4_triton(packed, scales, dtype)
    return dequantize_int4_reference(packed, scales, dtype)
