"""RMSNorm forward + backward as Triton kernels, beside the PyTorch reference.

Why a kernel: HF's RMSNorm is five elementwise ops that each read and write the
whole activation and keep fp32 copies for backward. The fused forward reads x
once and saves only one fp32 ``rstd`` per row; the backward recomputes the
normalised row from x, so training holds x, not its fp32 intermediates.

Semantics match ``LlamaRMSNorm``: normalise in fp32, cast to the input dtype,
then multiply by the weight (output dtype = promote(input, weight)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from onecard.kernels.launch import let_next_start, pdl_launch, wait_for_inputs


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The PyTorch definition (identical to transformers' LlamaRMSNorm.forward)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * xn).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, M, N, rows_per_prog,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(rows_per_prog):
        row = (start + i).to(tl.int64)
        if row < M:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xn = x * rstd
            dw += dy * xn.to(X.dtype.element_ty).to(tl.float32)
            dn = dy * w
            dx = rstd * (dn - xn * (tl.sum(dn * xn, axis=0) / N))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


@triton.jit
def _add_rmsnorm_fwd(X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, N, eps, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    let_next_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    r, w = residual_and_weight(R, W, row, cols, mask, stride_r)
    wait_for_inputs(PDL)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    add_rmsnorm_row(x, r, w, Y, S, row, cols, mask, stride_y, stride_s, N, eps)


@triton.jit
def residual_and_weight(R, W, row, cols, mask, stride_r):
    """The residual row and the norm weight (fp32), which a decode step's norm loads before its PDL wait: no
    kernel of the step writes weights, and the residual comes from a kernel two or more launches back, which
    had finished before the previous kernel passed its own wait and let this one launch (``kernels.launch``).
    Only ``x``, the previous kernel's output, has to wait. H100 dev A/B, Llama-2-7B arch bs=1: int4 2.408 ->
    2.365 ms/token, bf16 4.963 -> 4.930, fp8 unchanged."""
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    return r, tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def add_rmsnorm_row(x, r, w, Y, S, row, cols, mask, stride_y, stride_s, N, eps):
    """One row of ``add_rmsnorm``: ``x`` (fp32, already loaded or summed) plus the residual row ``r``, then the
    norm with weight ``w`` (``residual_and_weight``)."""
    s = (x + r).to(S.dtype.element_ty)  # the residual stream is rounded to its dtype before the norm reads it
    tl.store(S + row * stride_s + cols, s, mask=mask)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    sn = (s * rstd).to(S.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * sn).to(Y.dtype.element_ty), mask=mask)


def row_launch(N: int) -> dict:
    """``BLOCK`` and ``num_warps`` of a kernel that holds one ``N``-wide row per program (the norm kernels)."""
    block = triton.next_power_of_2(N)
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 16)}


def _num_progs(x: torch.Tensor, rows: int) -> int:
    if x.is_cuda:
        return min(rows, torch.cuda.get_device_properties(x.device).multi_processor_count * 4)
    return min(rows, 4)  # interpreter: few programs keep tests fast


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M, N = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((M, N), dtype=out_dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        _rmsnorm_fwd[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps, **row_launch(N))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(-1, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        progs = _num_progs(x2, M)
        rows_per = triton.cdiv(M, progs)
        dw_part = torch.empty((progs, N), dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd[(progs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0),
                               M, N, rows_per, **row_launch(N))
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm (Triton forward and backward); same result as ``rmsnorm_reference``."""
    return _RMSNormFn.apply(x, weight, eps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton on CUDA tensors, the PyTorch reference elsewhere (CPU training keeps working)."""
    return rmsnorm_triton(x, weight, eps) if x.is_cuda else rmsnorm_reference(x, weight, eps)


def add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in their dtype), then ``(rmsnorm(s), s)``: a decoder layer's residual add and the norm
    that reads it."""
    s = x + residual
    return rmsnorm_reference(s, weight, eps), s


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm_reference`` in one kernel, inference only (no backward).

    Why: at bs=1 decode each elementwise kernel costs a few microseconds of launch
    and tail, not bytes; fusing the two residual adds of a layer into its norms
    drops 2 of its ~12 kernels with the same bits out.
    """
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rmsnorm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must match")
    N = x.shape[-1]
    x2, r2 = x.reshape(-1, N), residual.reshape(-1, N)
    x2, r2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, r2))
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M:
        _add_rmsnorm_fwd[(M,)](x2, r2, weight, y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), N, eps,
                               **row_launch(N), **pdl_launch(x))
    return y.view(x.shape), s.view(x.shape)
