"""SwiGLU ``silu(gate) * up`` forward + backward as Triton kernels, beside the PyTorch reference.

Why a kernel: eager PyTorch keeps ``silu(gate)`` (an intermediate-size tensor)
alive for backward and launches three kernels. The fused op saves only gate
and up and recomputes the sigmoid in backward: one intermediate-size tensor
less per MLP, which at 14336 x seq-len is most of a Llama layer's activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from onecard.kernels.launch import pdl_launch, start_after_inputs


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The PyTorch definition used by LlamaMLP: ``silu(gate) * up``."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # > 2**31 elements at long context
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # > 2**31 elements at long context
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_fwd(GU, Y, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    start_after_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)  # rows on axis 0: a long prefill has more than 65535
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GU + row * 2 * n + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * n + n + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(GU.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * n + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)


_BLOCK = 1024


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate, dtype=torch.promote_types(gate.dtype, up.dtype))
        n = gate.numel()
        _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, y, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_BLOCK)
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused ``silu(gate) * up`` (Triton forward and backward)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    return _SwiGLUFn.apply(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA tensors, the PyTorch reference elsewhere."""
    return swiglu_triton(gate, up) if gate.is_cuda else swiglu_reference(gate, up)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[..., 2 * I]`` gate/up output (gate first), as the engine's MLP defines it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_mul_triton`` on CUDA tensors (inference), the PyTorch reference elsewhere."""
    return silu_mul_triton(gate_up) if gate_up.is_cuda else silu_mul_reference(gate_up)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_mul_reference`` in one kernel that reads both halves in place, inference only (no backward).

    Why: ``chunk`` leaves strided halves, so eager PyTorch runs silu and the
    product as two kernels (and ``swiglu_triton`` would first copy both halves);
    at bs=1 decode those launches cost more than their bytes.
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: last dim {gate_up.shape[-1]} must be even (gate rows then up rows)")
    n = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n).contiguous()
    y = torch.empty((gu.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
    if gu.shape[0]:
        _silu_mul_fwd[(gu.shape[0], triton.cdiv(n, _BLOCK))](gu, y, n, BLOCK=_BLOCK, **pdl_launch(gu))
    return y.view(*gate_up.shape[:-1], n)
