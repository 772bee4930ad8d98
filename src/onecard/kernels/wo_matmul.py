"""Weight-only int4 / int8 matmul with fused dequantization (Triton), beside its PyTorch reference.

Why: decoding is memory-bound — each step streams every weight once — so
reading 4-bit (or 8-bit) codes instead of bf16 cuts the bytes per token ~4x
(~2x) if the dequantization happens in registers, never in memory.

Kernel layout (what ``onecard.quant.linear.QuantLinear`` repacks checkpoints into at load time):

- ``qweight`` int32 ``[K / P, N]`` with ``P = 32 / bits`` codes per word, packed along K
  (input channel ``P*r + j`` in bits ``bits*j ..`` of row ``r``). A program reads
  whole rows of words: consecutive threads read consecutive output columns, so
  loads are coalesced and each word feeds ``P`` multiply-adds.
- ``scales``, ``zeros`` ``[G, N]`` (fp16; zeros are exact small integers), groups
  *contiguous*: input channel ``k`` belongs to group ``k // group_size``. Act-order
  checkpoints are made contiguous at load time by permuting K (rows of the codes)
  and gathering the activations with the same permutation.
- ``w[k, n] = (code - zeros[g, n]) * scales[g, n]`` in fp32, cast to the activation dtype.

Two launch policies of the one kernel: ``M <= 16`` (decode) runs 16-row tiles
with split-K, so even a 4096-wide GEMV fills every SM; larger ``M`` runs square
tiles without split. On CUDA, ``M >= DEQUANT_GEMM_MIN_M`` (long prefill,
compute-bound) dequantizes once into a scratch bf16 weight and calls cuBLAS,
as exllamav2 does: the dequant is a small fraction of a 2k-token GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEQUANT_GEMM_MIN_M = 512


# ---- PyTorch reference -------------------------------------------------------------------------------------

def unpack_reference(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[K / P, N]`` -> int32 codes ``[K, N]``."""
    per = 32 // bits
    shifts = (torch.arange(per, device=qweight.device, dtype=torch.int32) * bits).view(1, per, 1)
    codes = (qweight.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1, qweight.shape[1])


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                         group_size: int) -> torch.Tensor:
    """The fp32 weight ``[K, N]`` the kernel computes with."""
    codes = unpack_reference(qweight, bits)
    g = torch.arange(codes.shape[0], device=codes.device) // group_size
    return (codes.float() - zeros.float()[g]) * scales.float()[g]


def wo_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bits: int, group_size: int) -> torch.Tensor:
    """``x[..., K] @ W[K, N]`` with W dequantized in fp32 and cast to x's dtype (what the kernel does)."""
    w = dequantize_reference(qweight, scales, zeros, bits, group_size).to(x.dtype)
    return x @ w


# ---- Triton ------------------------------------------------------------------------------------------------

@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, K, GROUP: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 weight tile ``[BLOCK_K, BLOCK_N]`` starting at input channel ``k0`` (BLOCK_K divides GROUP or GROUP >= K)."""
    PACK: tl.constexpr = 32 // BITS
    offs_kp = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    n_mask = offs_n < N
    words = tl.load(qw_ptr + offs_kp[:, None] * N + offs_n[None, :],
                    mask=(offs_kp[:, None] < K // PACK) & n_mask[None, :], other=0)
    shifts = tl.arange(0, PACK) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
    g = k0 // GROUP
    gmask = n_mask & ((tl.zeros_like(offs_n) + k0) < K)
    s = tl.load(s_ptr + g * N + offs_n, mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=gmask, other=0.0).to(tl.float32)
    return (codes.to(tl.float32) - z[None, :]) * s[None, :]


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr, BITS: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, K, GROUP, BITS, BLOCK_K, BLOCK_N)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


@triton.jit
def _wo_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_split,
                      tiles_per_split, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * tiles_per_split * BLOCK_K
    for t in range(0, tiles_per_split):
        k0 = k_start + t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, K, GROUP, BITS, BLOCK_K, BLOCK_N)
        acc += tl.dot(x, w.to(x.dtype))
    out = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _block_k(group_size: int, K: int, want: int) -> int:
    """Largest power of two <= ``want`` whose tiles never straddle a group boundary."""
    bk = want
    while bk > 16 and group_size < K and group_size % bk:
        bk //= 2
    if group_size < K and group_size % bk:
        raise ValueError(f"group size {group_size} is not a multiple of 16")
    return bk


def _check(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    G = (K + group_size - 1) // group_size
    if qweight.dtype != torch.int32 or tuple(scales.shape) != (G, N) or tuple(zeros.shape) != (G, N):
        raise ValueError(f"bad packed weight: qweight {qweight.dtype} {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)} for K={K}, N={N}, group {group_size}")
    return K, N


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton dequantization to ``[K, N]`` in ``dtype`` (bit-exact with ``dequantize_reference`` in fp32)."""
    K, N = _check(qweight, scales, zeros, bits, group_size)
    out = torch.empty(K, N, dtype=dtype, device=qweight.device)
    bk = _block_k(group_size, K, 64)
    grid = (triton.cdiv(K, bk), triton.cdiv(N, 64))
    _dequant_kernel[grid](qweight, scales, zeros, out, N, K, GROUP=group_size, BITS=bits, BLOCK_K=bk, BLOCK_N=64)
    return out


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def wo_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
              group_size: int) -> torch.Tensor:
    """``x[..., K] @ dequant(W)[K, N]`` -> ``[..., N]`` in x's dtype; decode shapes use split-K."""
    K, N = _check(qweight, scales, zeros, bits, group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    interpret = x.device.type != "cuda"
    if not interpret and M >= DEQUANT_GEMM_MIN_M:
        w = dequantize(qweight, scales, zeros, bits, group_size, dtype=x.dtype)
        return (x2 @ w).reshape(*lead, N)
    if M <= 16:
        bm, bn, bk, warps, stages = 16, (32 if interpret else 64), (32 if interpret else 128), 4, 4
    else:
        bm, bn, bk, warps, stages = (16, 32, 32, 4, 1) if interpret else (64, 128, 64, 4, 3)
    bk = _block_k(group_size, K, bk)
    k_tiles = triton.cdiv(K, bk)
    grid_mn = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = 1
    if M <= 16:
        split = max(1, min(k_tiles, (2 * _sm_count(x.device)) // max(grid_mn, 1)))
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)
    if split == 1:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        stride_split = 0
    else:
        out = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        stride_split = M * N
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    kwargs = {} if interpret else {"num_warps": warps, "num_stages": stages}
    _wo_matmul_kernel[grid](x2, qweight, scales, zeros, out, M, N, K, x2.stride(0), N, stride_split, tiles_per_split,
                            GROUP=group_size, BITS=bits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **kwargs)
    if split > 1:
        out = out.sum(0).to(x.dtype)
    return out.reshape(*lead, N)
