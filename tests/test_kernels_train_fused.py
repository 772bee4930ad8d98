"""Training kernels (RMSNorm, RoPE, SwiGLU, fused linear+CE): Triton forward AND backward vs the PyTorch reference.

Without CUDA the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1), so shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch

from onecard.kernels.fused_linear_ce import (_ce_chunk_torch, fused_linear_cross_entropy,
                                             linear_cross_entropy_reference)
from onecard.kernels.rmsnorm import rmsnorm_reference, rmsnorm_triton
from onecard.kernels.rope import rope_reference, rope_triton
from onecard.kernels.swiglu import (lora_swiglu_grads_reference, lora_swiglu_grads_triton, lora_swiglu_reference,
                                    lora_swiglu_triton, swiglu_reference, swiglu_triton)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device="cpu").manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    loss.backward()
    return outs, [t.grad for t in inputs if t.requires_grad]


def _close(a, b, tol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [48, 40])  # power of two and not
def test_rmsnorm_forward_backward_matches_reference(n):
    x = torch.randn(3, 5, n, device=DEV)
    w = torch.randn(n, device=DEV)
    out_t, g_t = _grads(lambda a, b: rmsnorm_triton(a, b, 1e-5), x, w)
    out_r, g_r = _grads(lambda a, b: rmsnorm_reference(a, b, 1e-5), x, w)
    _close(out_t, out_r)
    _close(g_t, g_r, 1e-4)


def test_swiglu_forward_backward_matches_reference():
    g, u = torch.randn(2, 7, 33, device=DEV), torch.randn(2, 7, 33, device=DEV)
    out_t, g_t = _grads(swiglu_triton, g, u)
    out_r, g_r = _grads(swiglu_reference, g, u)
    _close(out_t, out_r)
    _close(g_t, g_r)


def _lora_gate_up_inputs(T, N, r, dtype=torch.float32, device=DEV):
    g = torch.Generator(device="cpu").manual_seed(T + N + r)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device, dtype)  # noqa: E731
    h = make(T, 2 * r)  # gate's and up's x A^T side by side, as train.lora's stacked Function passes them
    return make(T, N), make(T, N), h[:, :r], h[:, r:], make(N, r, s=0.1), make(N, r, s=0.1), make(T, N)


@pytest.mark.parametrize("T,N,r", [(70, 300, 16), (33, 128, 8), (5, 200, 32)])  # r below the dot's 16 is padded
def test_lora_swiglu_kernels_match_reference(T, N, r):
    yg, yu, hg, hu, bg, bu, dy = _lora_gate_up_inputs(T, N, r)
    torch.testing.assert_close(lora_swiglu_triton(yg, yu, hg, hu, bg, bu), lora_swiglu_reference(yg, yu, hg, hu, bg, bu))
    _close(lora_swiglu_grads_triton(dy, yg, yu, hg, hu, bg, bu), lora_swiglu_grads_reference(dy, yg, yu, hg, hu, bg, bu))


def test_lora_swiglu_refuses_hg_and_hu_of_different_layouts():
    yg, yu, hg, hu, bg, bu, _ = _lora_gate_up_inputs(8, 64, 4)
    with pytest.raises(ValueError, match="one shape and one row stride"):
        lora_swiglu_triton(yg, yu, hg, hu.contiguous(), bg, bu)


def test_lora_swiglu_grads_reference_is_autograd_of_the_forward():
    yg, yu, hg, hu, bg, bu, dy = (t.double() for t in _lora_gate_up_inputs(6, 40, 4, device="cpu"))
    yg.requires_grad_(True), yu.requires_grad_(True)
    lora_swiglu_reference(yg, yu, hg, hu, bg, bu).backward(dy)
    _close(lora_swiglu_grads_reference(dy, yg.detach(), yu.detach(), hg, hu, bg, bu), (yg.grad, yu.grad), 1e-6)


def test_rope_forward_backward_matches_reference_in_hf_layout():
    B, T, Hq, Hk, D = 2, 6, 4, 2, 16
    # HF layout: (B, T, H*D) -> view (B, T, H, D) -> transpose(1, 2): head_dim contiguous, heads strided
    q = torch.randn(B, T, Hq, D, device=DEV).transpose(1, 2)
    k = torch.randn(B, T, Hk, D, device=DEV).transpose(1, 2)
    ang = torch.randn(1, T, D // 2, device=DEV)
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q_t, g_t = _grads(lambda a, b: rope_triton(a, b, cos, sin), q, k)
    q_r, g_r = _grads(lambda a, b: rope_reference(a, b, cos, sin), q, k)
    _close(q_t, q_r)
    _close(g_t, g_r)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("num_items", [None, 11])
def test_fused_linear_ce_matches_full_logits(use_triton, num_items):
    N, H, V = 24, 16, 50
    h, w, b = torch.randn(N, H, device=DEV), torch.randn(V, H, device=DEV) * 0.3, torch.randn(V, device=DEV)
    labels = torch.randint(0, V, (N,), device=DEV)
    labels[[0, 5, 23]] = -100
    budget = 5 * V * 4  # 5-row chunks: the loop and its remainder are exercised
    fused = lambda a, c, d: fused_linear_cross_entropy(a, c, labels, bias=d, num_items_in_batch=num_items,
                                                       chunk_budget_bytes=budget, use_triton=use_triton)
    ref = lambda a, c, d: linear_cross_entropy_reference(a, c, labels, bias=d, num_items_in_batch=num_items)
    out_f, g_f = _grads(fused, h, w, b)
    out_r, g_r = _grads(ref, h, w, b)
    _close(out_f, out_r)
    _close(g_f, g_r, 1e-4)


def test_ce_chunk_all_ignored_rows_give_zero_loss_and_grad():
    logits = torch.randn(3, 10)
    loss = _ce_chunk_torch(logits, torch.full((3,), -100), 1.0)
    assert loss.abs().sum() == 0 and logits.abs().sum() == 0


def test_fused_linear_ce_without_grad_returns_same_loss():
    h, w = torch.randn(10, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (10,))
    with torch.no_grad():
        a = fused_linear_cross_entropy(h, w, labels, chunk_budget_bytes=3 * 30 * 4)
    torch.testing.assert_close(a, linear_cross_entropy_reference(h, w, labels))


@pytest.mark.gpu
def test_kernels_bf16_realistic_shapes_on_gpu():
    """Llama-3-8B widths in bf16: Triton vs reference, forward and backward."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 256, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(4096, device="cuda",
                                                                                           dtype=torch.bfloat16)
    o_t, g_t = _grads(lambda a, b: rmsnorm_triton(a, b, 1e-5), x, w)
    o_r, g_r = _grads(lambda a, b: rmsnorm_reference(a, b, 1e-5), x, w)
    _close(o_t, o_r, 2e-2)
    _close(g_t[:1], g_r[:1], 2e-2)
    torch.testing.assert_close(g_t[1].float(), g_r[1].float(), rtol=3e-2, atol=2.0)  # sum over 512 rows in bf16
    g, u = (torch.randn(2, 256, 14336, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o_t, g_t = _grads(swiglu_triton, g, u)
    o_r, g_r = _grads(swiglu_reference, g, u)
    _close(o_t, o_r, 2e-2)
    _close(g_t, g_r, 3e-2)
    yg, yu, hg, hu, bg, bu, dy = _lora_gate_up_inputs(512, 14336, 16, torch.bfloat16, "cuda")
    _close([lora_swiglu_triton(yg, yu, hg, hu, bg, bu)], [lora_swiglu_reference(yg, yu, hg, hu, bg, bu)], 2e-2)
    _close(lora_swiglu_grads_triton(dy, yg, yu, hg, hu, bg, bu), lora_swiglu_grads_reference(dy, yg, yu, hg, hu, bg, bu),
           3e-2)
    q = torch.randn(2, 256, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 256, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    ang = torch.randn(1, 256, 64, device="cuda")
    cos, sin = (f(torch.cat([ang, ang], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    o_t, g_t = _grads(lambda a, b: rope_triton(a, b, cos, sin), q, k)
    o_r, g_r = _grads(lambda a, b: rope_reference(a, b, cos, sin), q, k)
    _close(o_t, o_r, 2e-2)
    _close(g_t, g_r, 2e-2)
    h, W = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(
        128256, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, 128256, (1024,), device="cuda")
    fused = _grads(lambda a: fused_linear_cross_entropy(a, W, labels), h)
    ref = _grads(lambda a: linear_cross_entropy_reference(a, W, labels), h)
    torch.testing.assert_close(fused[0][0], ref[0][0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused[1][0].float(), ref[1][0].float(), rtol=5e-2, atol=1e-4)
