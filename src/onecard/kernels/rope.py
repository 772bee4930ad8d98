"""Rotary position embedding (RoPE) forward + backward as a Triton kernel, beside the PyTorch reference.

Why a kernel: HF's ``apply_rotary_pos_emb`` builds ``rotate_half`` copies
(a cat of two slices and a negation) for q and k and keeps them for backward.
The kernel rotates each (batch, position) row for all heads in one pass and
its backward is the same rotation with the sine negated, so nothing but
cos/sin (already alive) is saved.

Layout: q, k are (batch, heads, seq, head_dim) with any strides as long as
head_dim is contiguous (HF's view+transpose layout); cos, sin are
(batch or 1, seq, head_dim) in HF's "halves" convention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch definition (identical to transformers' apply_rotary_pos_emb)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@triton.jit
def _rope_kernel(X, Y, C, S, sxb, sxh, sxt, syb, syh, syt, scb, sct, T, H,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    dmask = d < HALF
    mask = (h[:, None] < H) & dmask[None, :]
    cbase = b * scb + t * sct
    c1 = tl.load(C + cbase + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(C + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(S + cbase + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(S + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    xp = X + b * sxb + t * sxt + h[:, None] * sxh + d[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yp = Y + b * syb + t * syt + h[:, None] * syh + d[None, :]
    tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    y = torch.empty_like(x)  # keeps x's (transposed) strides, like HF's output
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_kernel[(B * T,)](x, y, cos, sin, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
                           y.stride(2), scb, cos.stride(1), T, H, HALF=D // 2, BLOCK_H=triton.next_power_of_2(H),
                           BLOCK_D=triton.next_power_of_2(D // 2), BACKWARD=backward)
    return y


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None else _rotate(dq, cos, sin, True)
        dk = None if dk is None else _rotate(dk, cos, sin, True)
        return dq, dk, None, None


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RoPE on (batch, heads, seq, head_dim) q and k; cos/sin get no gradient (they come from buffers)."""
    if q.dim() != 4 or cos.dim() != 3 or q.shape[-1] % 2 or cos.shape[-1] != q.shape[-1]:
        raise ValueError(f"rope: expected q/k (B,H,T,D) and cos/sin (B,T,D), got q {tuple(q.shape)}, "
                         f"cos {tuple(cos.shape)}")
    return _RoPEFn.apply(q, k, cos, sin)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA tensors, the PyTorch reference elsewhere."""
    return rope_triton(q, k, cos, sin) if q.is_cuda else rope_reference(q, k, cos, sin)
