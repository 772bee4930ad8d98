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
def silu_times(g, u, dt: tl.constexpr):
    """``silu(g) * u`` in fp32 from fp32 ``g`` and ``u``, silu rounded to ``dt`` first as the PyTorch form rounds it:
    every kernel that makes an MLP's product (the fused SwiGLU, ``silu_mul``, the GEMVs that fold it in) calls this,
    so they give the same bits."""
    return (g * tl.sigmoid(g)).to(dt).to(tl.float32) * u


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # > 2**31 elements at long context
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, silu_times(g, u, G.dtype.element_ty).to(Y.dtype.element_ty), mask=mask)


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
    tl.store(Y + row * n + offs, silu_times(g, u, GU.dtype.element_ty).to(Y.dtype.element_ty), mask=mask)


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


def lora_gate_up_reference(yg: torch.Tensor, yu: torch.Tensor, hg: torch.Tensor, hu: torch.Tensor, bg: torch.Tensor,
                           bu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA gate and up pre-activations from their frozen bases' outputs ``y [T, N]``, the adapters' ``h = x A^T``
    ``[T, r]`` and scaled ``s B`` ``[N, r]``: ``y + h (s B)^T``, the rank-r product rounded to y's dtype first, as a
    PEFT layer adds its adapter's output to its base's."""
    return yg + (hg @ bg.t()).to(yg.dtype), yu + (hu @ bu.t()).to(yu.dtype)


def lora_swiglu_reference(yg: torch.Tensor, yu: torch.Tensor, hg: torch.Tensor, hu: torch.Tensor, bg: torch.Tensor,
                          bu: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the LoRA gate and up of ``lora_gate_up_reference``."""
    return swiglu_reference(*lora_gate_up_reference(yg, yu, hg, hu, bg, bu))


def lora_swiglu_grads_reference(dy: torch.Tensor, yg: torch.Tensor, yu: torch.Tensor, hg: torch.Tensor,
                                hu: torch.Tensor, bg: torch.Tensor,
                                bu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``lora_swiglu_reference`` at its gate and up pre-activations, from ``dy`` (fp32 math, as
    ``_swiglu_bwd``)."""
    g, u = (t.float() for t in lora_gate_up_reference(yg, yu, hg, hu, bg, bu))
    sig = torch.sigmoid(g)
    dy = dy.float()
    return (dy * u * sig * (1 + g * (1 - sig))).to(yg.dtype), (dy * g * sig).to(yu.dtype)


@triton.jit
def _lora_pre(Y, H, B, off, mask, h_off, h_mask, b_off, b_mask, IEEE: tl.constexpr):
    # one projection's pre-activation tile, y + round(h B^T), rounded to y's dtype, in fp32
    h = tl.load(H + h_off, mask=h_mask, other=0.0)
    b = tl.load(B + b_off, mask=b_mask, other=0.0)
    if IEEE:
        lora = tl.dot(h, tl.trans(b), input_precision="ieee")
    else:
        lora = tl.dot(h, tl.trans(b))
    y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
    return (y + lora.to(Y.dtype.element_ty).to(tl.float32)).to(Y.dtype.element_ty).to(tl.float32)


@triton.jit
def _lora_gate_up(YG, YU, HG, HU, BG, BU, T, N, R, SH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    # one [BLOCK_M, BLOCK_N] tile of lora_gate_up_reference in fp32 (rounded as it rounds): (gate, up, offsets, mask)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rmask, cmask, kmask = rows < T, cols < N, offs_r < R
    off = rows[:, None] * N + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    h_off, h_mask = rows[:, None] * SH + offs_r[None, :], rmask[:, None] & kmask[None, :]
    b_off, b_mask = cols[:, None] * R + offs_r[None, :], cmask[:, None] & kmask[None, :]
    g = _lora_pre(YG, HG, BG, off, mask, h_off, h_mask, b_off, b_mask, IEEE)
    u = _lora_pre(YU, HU, BU, off, mask, h_off, h_mask, b_off, b_mask, IEEE)
    return g, u, off, mask


@triton.jit
def _lora_swiglu_fwd(YG, YU, HG, HU, BG, BU, OUT, T, N, R, SH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    g, u, off, mask = _lora_gate_up(YG, YU, HG, HU, BG, BU, T, N, R, SH, BLOCK_M, BLOCK_N, BLOCK_R, IEEE)
    tl.store(OUT + off, silu_times(g, u, OUT.dtype.element_ty).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _lora_swiglu_bwd(DY, YG, YU, HG, HU, BG, BU, DG, DU, T, N, R, SH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    g, u, off, mask = _lora_gate_up(YG, YU, HG, HU, BG, BU, T, N, R, SH, BLOCK_M, BLOCK_N, BLOCK_R, IEEE)
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DU + off, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + off, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


_LORA_TILE = {"BLOCK_M": 16, "BLOCK_N": 128}  # best fwd + bwd of 24 tiles (H100, 8192 x 14336, r 16)


def _lora_launch(yg: torch.Tensor, hg: torch.Tensor, hu: torch.Tensor) -> tuple[tuple[int, int], dict]:
    """Grid and constants; ``hg`` and ``hu`` may be column slices of one stacked ``x [A_g; A_u]^T`` (same shape and
    row stride, unit column stride)."""
    if hg.shape != hu.shape or hg.stride() != hu.stride() or hg.stride(1) != 1:
        raise ValueError(f"lora_swiglu: hg {tuple(hg.shape)}/{hg.stride()} and hu {tuple(hu.shape)}/{hu.stride()} "
                         "need one shape and one row stride, columns contiguous")
    T, N = yg.shape
    return ((triton.cdiv(T, _LORA_TILE["BLOCK_M"]), triton.cdiv(N, _LORA_TILE["BLOCK_N"])),
            {**_LORA_TILE, "BLOCK_R": max(16, triton.next_power_of_2(hg.shape[1])), "IEEE": yg.dtype == torch.float32})


def lora_swiglu_triton(yg: torch.Tensor, yu: torch.Tensor, hg: torch.Tensor, hu: torch.Tensor, bg: torch.Tensor,
                       bu: torch.Tensor) -> torch.Tensor:
    """``lora_swiglu_reference`` in one kernel (no autograd: ``train.lora``'s Function calls it and the grads).

    Why: a LoRA gate or up projection otherwise adds its rank-r product inside the base GEMM (``addmm_``, beta =
    1), and cuBLAS's accumulating kernels run ~11 % slower than its plain ones on these shapes (H100 profile,
    docs/training.md), besides writing the ``[T, N]`` product first. Here the bases run plain and the rank-r
    products are made tile by tile where the activation reads its inputs anyway."""
    grid, consts = _lora_launch(yg, hg, hu)
    out = torch.empty_like(yg)
    _lora_swiglu_fwd[grid](yg, yu, hg, hu, bg, bu, out, yg.shape[0], yg.shape[1], hg.shape[1], hg.stride(0), **consts)
    return out


def lora_swiglu_grads_triton(dy: torch.Tensor, yg: torch.Tensor, yu: torch.Tensor, hg: torch.Tensor, hu: torch.Tensor,
                             bg: torch.Tensor, bu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_swiglu_grads_reference`` in one kernel: gate and up recomputed from the same inputs, bit for bit."""
    grid, consts = _lora_launch(yg, hg, hu)
    dg, du = torch.empty_like(yg), torch.empty_like(yu)
    _lora_swiglu_bwd[grid](dy.contiguous(), yg, yu, hg, hu, bg, bu, dg, du, yg.shape[0], yg.shape[1], hg.shape[1],
                           hg.stride(0), **consts)
    return dg, du


def lora_swiglu(yg: torch.Tensor, yu: torch.Tensor, hg: torch.Tensor, hu: torch.Tensor, bg: torch.Tensor,
                bu: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA tensors, the PyTorch reference elsewhere."""
    fn = lora_swiglu_triton if yg.is_cuda else lora_swiglu_reference
    return fn(yg, yu, hg, hu, bg, bu)


def lora_swiglu_grads(dy: torch.Tensor, yg: torch.Tensor, yu: torch.Tensor, hg: torch.Tensor, hu: torch.Tensor,
                      bg: torch.Tensor, bu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA tensors, the PyTorch reference elsewhere."""
    fn = lora_swiglu_grads_triton if yg.is_cuda else lora_swiglu_grads_reference
    return fn(dy, yg, yu, hg, hu, bg, bu)


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
