"""Inference-only fused kernels of the engine's layer (add + RMSNorm, silu * up on the fused gate/up output):
same bits as the PyTorch forms they replace. Without CUDA they run in the interpreter (conftest sets
TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from onecard.kernels.rmsnorm import add_rmsnorm_reference, add_rmsnorm_triton
from onecard.kernels.swiglu import silu_mul_reference, silu_mul_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype: torch.dtype) -> float:
    """fp32: one rounding; bf16: one bf16 step on CUDA, three in the interpreter (it truncates fp32 -> bf16)."""
    return 1e-6 if dtype == torch.float32 else (1e-2 if DEV == "cuda" else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 40])  # power of two and not
def test_add_rmsnorm_matches_add_then_norm(dtype, n):
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, n, generator=g).to(DEV, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(DEV, dtype)
    y, s = add_rmsnorm_triton(x, r, w, 1e-5)
    y_ref, s_ref = add_rmsnorm_reference(x, r, w, 1e-5)
    if DEV == "cuda" or dtype == torch.float32:
        assert torch.equal(s, s_ref)  # the residual stream is the plain add, bit for bit
    else:  # the interpreter truncates fp32 -> bf16 where CUDA rounds to nearest even: one bf16 step apart
        torch.testing.assert_close(s.float(), s_ref.float(), rtol=2 ** -7, atol=0)
    # the reference takes mean(x^2) with torch's reduction order, the kernel a tree sum: one rounding apart
    tol = _tol(dtype)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    assert y.dtype == y_ref.dtype and y.shape == x.shape


def test_add_rmsnorm_refuses_mismatched_inputs():
    x = torch.zeros(2, 8, device=DEV)
    with pytest.raises(ValueError, match="must match"):
        add_rmsnorm_triton(x, torch.zeros(2, 4, device=DEV), torch.ones(8, device=DEV), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_reads_both_halves_in_place(dtype):
    gate_up = torch.randn(2, 3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)  # > one block
    out = silu_mul_triton(gate_up)
    ref = silu_mul_reference(gate_up)
    assert out.shape == (2, 3, 1500)
    # sigmoid in the kernel vs torch's silu formula: the fp32 silu may differ in its last bit before rounding
    tol = _tol(dtype)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="even"):
        silu_mul_triton(gate_up[..., :-1])


def test_mlp_asks_a_gate_up_layer_with_a_gated_gemv_for_silu_mul(monkeypatch):
    """With the fused kernels on, the MLP takes ``silu(gate) * up`` from a gate/up layer that has
    ``forward_silu_mul`` (the bf16 decode GEMV's epilogue) and runs ``silu_mul_triton`` after any other layer;
    both give the PyTorch MLP's result."""
    from onecard.kernels.gemv import GemvLinear
    from onecard.models import llama
    from onecard.models.config import ModelArgs

    torch.manual_seed(0)
    args = ModelArgs("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                     num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
                     rope_theta=10000.0)
    mlp, x = llama.MLP(args), torch.randn(2, 32)
    with torch.no_grad():
        ref = mlp(x)  # off CUDA: the PyTorch forms
        monkeypatch.setattr(llama, "_fused", lambda t: True)
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)  # nn.Linear: then silu_mul_triton
        asked = []
        mlp.gate_up_proj.__class__ = GemvLinear
        plain = GemvLinear.forward_silu_mul
        monkeypatch.setattr(GemvLinear, "forward_silu_mul", lambda self, t: asked.append(t) or plain(self, t))
        torch.testing.assert_close(mlp(x), ref, rtol=0, atol=0)
    assert len(asked) == 1 and asked[0] is x


@pytest.mark.gpu
def test_fused_layer_matches_unfused_on_gpu():
    """The engine model on CUDA under no_grad (fused kernels) vs the same model with autograd on (PyTorch forms):
    bf16 logits within rounding, the same greedy token."""
    from onecard.models.config import ModelArgs
    from onecard.models.llama import LlamaModel

    torch.manual_seed(0)
    args = ModelArgs("LlamaForCausalLM", vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-5,
                     rope_theta=10000.0)
    model = LlamaModel(args).cuda().bfloat16()
    model.rotary.init_table()
    ids = torch.randint(0, 512, (40,), device="cuda")
    with torch.no_grad():
        fused = model.logits(ids)
    with torch.enable_grad():
        plain = model.compute_logits(model(ids, torch.arange(40, device="cuda")))
    assert (fused.float() - plain.float()).abs().max() < 5e-2
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))
