"""Patching is real: modules change type in their parents, and loss + every gradient match the unpatched model."""

from __future__ import annotations

import copy

import pytest
import torch

from onecard.errors import UnsupportedModelError
from onecard.train.patching import FusedRMSNorm, FusedSwiGLUMLP, patch_model


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")


def _loss_and_grads(model, ids, labels, position_ids=None):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, position_ids=position_ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama-3.1-8b", "qwen2-0.5b", "mistral-7b"])
def test_patched_model_matches_unpatched_loss_and_grads(random_checkpoint, arch):
    ref = _load(random_checkpoint(arch)).train()
    ours = copy.deepcopy(ref)
    report = patch_model(ours)
    n_layers = ref.config.num_hidden_layers
    assert report.rmsnorm == 2 * n_layers + 1 and report.swiglu_mlp == n_layers
    assert report.rope_attention == n_layers and report.fused_cross_entropy
    # the modules really changed, in their parents
    assert isinstance(ours.model.norm, FusedRMSNorm) and isinstance(ours.model.layers[0].mlp, FusedSwiGLUMLP)
    assert type(ref.model.norm).__name__.endswith("RMSNorm") and not isinstance(ref.model.norm, FusedRMSNorm)
    assert "forward" in vars(ours.model.layers[0].self_attn) and "forward" not in vars(ref.model.layers[0].self_attn)
    # same parameter names: checkpoints and PEFT targets are unchanged
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, ref.config.vocab_size, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    # packed rows: two documents in row 1 (position ids restart)
    pos = torch.cat([torch.arange(24)[None], torch.cat([torch.arange(10), torch.arange(14)])[None]])
    l_ref, g_ref = _loss_and_grads(ref, ids, labels, pos)
    l_ours, g_ours = _loss_and_grads(ours, ids, labels, pos)
    torch.testing.assert_close(l_ours, l_ref, rtol=1e-5, atol=1e-6)
    assert g_ours.keys() == g_ref.keys() and len(g_ref) == len(list(ref.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_unpatched_model_in_same_process_is_untouched(random_checkpoint):
    """The RoPE dispatcher is process-wide, but only patched attention modules switch it on."""
    path = random_checkpoint("llama-3.1-8b")
    ref = _load(path).eval()
    ids = torch.randint(3, 100, (1, 12))
    before = ref(input_ids=ids).logits
    patch_model(_load(path))
    after = ref(input_ids=ids).logits
    assert torch.equal(before, after)


def test_patched_forward_without_labels_returns_logits(random_checkpoint):
    model = _load(random_checkpoint("llama-3.1-8b")).eval()
    ids = torch.randint(3, 100, (1, 9))
    want = model(input_ids=ids).logits
    patch_model(model)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_unsupported_family_is_refused():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        patch_model(Fake())


def _lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lean_lora_forward_matches_peft_and_steps_aside_when_merged(random_checkpoint):
    """Same loss and adapter gradients as PEFT's own forward (fp32, and bf16 autocast with fp32 masters)."""
    from peft.tuners.lora import Linear as LoraLinear

    from onecard.train.lora import add_lora, lean_lora_forward

    base = _load(random_checkpoint("llama-3.1-8b")).train()
    ours = add_lora(copy.deepcopy(base), r=4, alpha=8, seed=0)
    ref = copy.deepcopy(ours)
    lora = [m for m in ours.modules() if type(m) is LoraLinear]
    assert lora and all(vars(m)["forward"].__func__ is lean_lora_forward for m in lora)
    for m in ref.modules():
        vars(m).pop("forward", None) if type(m) is LoraLinear else None
    for m in [*ours.modules(), *ref.modules()]:  # B starts at zero: give it values so A's gradient is tested too
        if type(m) is LoraLinear:
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, base.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    l_ref, g_ref = _lora_grads(ref, ids)
    l_ours, g_ours = _lora_grads(ours, ids)
    torch.testing.assert_close(l_ours, l_ref, rtol=1e-5, atol=1e-6)
    assert g_ours.keys() == g_ref.keys() and all("lora_" in n for n in g_ref) and len(g_ref) == 2 * len(lora)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-7, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb_ref, gb_ref = _lora_grads(ref, ids)
        lb_ours, gb_ours = _lora_grads(ours, ids)
    torch.testing.assert_close(lb_ours, lb_ref, rtol=2e-2, atol=2e-2)
    assert all(g.dtype == torch.float32 for g in gb_ours.values())  # the masters stay fp32
    x = torch.randn(3, lora[0].in_features)
    with torch.no_grad():
        unmerged = lora[0](x)
        lora[0].merge()  # merged: PEFT's own forward runs (the base alone already holds the adapter)
        torch.testing.assert_close(lora[0](x), unmerged, rtol=1e-4, atol=1e-5)


def test_long_inputs_run_the_mlp_in_checkpointed_chunks(random_checkpoint, monkeypatch):
    """Above MLP_CHUNK_TOKENS the MLP runs per chunk: the same output and gradients as in one piece."""
    import onecard.train.patching as patching

    model = _load(random_checkpoint("llama-3.1-8b"))
    patch_model(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    whole = mlp(x)
    (gx_whole,) = torch.autograd.grad(whole.square().sum(), x)
    calls = []
    monkeypatch.setattr(patching, "MLP_CHUNK_TOKENS", 4)
    monkeypatch.setattr(mlp, "_mlp", lambda t: calls.append(t.numel() // t.shape[-1]) or type(mlp)._mlp(mlp, t))
    chunked = mlp(x)
    (gx_chunked,) = torch.autograd.grad(chunked.square().sum(), x)
    assert calls[:5] == [4, 4, 4, 4, 2]  # 18 tokens in pieces of 4 (then each piece again in backward)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_chunked, gx_whole, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        calls.clear()
        torch.testing.assert_close(mlp(x), whole, rtol=1e-5, atol=1e-6)
        assert calls == [4, 4, 4, 4, 2]  # no gradients (offloaded checkpoints' forward): pieces too, once each


@pytest.mark.parametrize("offload,chunk,frozen", [(False, None, "dense"), (True, None, "dense"), (False, 12, "dense"),
                                                  (True, None, "int4"), (False, None, "fp8")])
def test_recomputation_skips_the_last_matmul_and_keeps_every_gradient(random_checkpoint, monkeypatch, offload,
                                                                        chunk, frozen):
    """Patched + LoRA + checkpointing (plain, offloaded, the MLP in chunks, a QLoRA int4 base and an fp8 base):
    the down projection's output is not computed on recomputation, and the loss and every adapter gradient equal
    PEFT's without checkpointing (over the same base)."""
    import onecard.train.lora as lora
    import onecard.train.patching as patching
    from onecard.train.checkpointing import enable_checkpointing
    from onecard.train.fp8_base import Fp8FrozenLinear, use_fp8_bases_
    from onecard.train.precision import fp8_linear_filter
    from onecard.train.qlora import quantize_model_int4

    base = _load(random_checkpoint("llama-3.1-8b")).train()
    if frozen == "int4":
        quantize_model_int4(base, 64, torch.float32)
    if frozen == "fp8":
        assert use_fp8_bases_(base, fp8_linear_filter) == 7 * base.config.num_hidden_layers
        assert isinstance(base.model.layers[0].mlp.down_proj, Fp8FrozenLinear)
    ref = lora.add_lora(copy.deepcopy(base), r=4, alpha=8, seed=0)
    patch_model(base)
    ours = lora.add_lora(base, r=4, alpha=8, seed=0)
    enable_checkpointing(ours, offload=offload)
    for a, b in zip(ref.parameters(), ours.parameters()):  # B starts at zero: give it values so A's gradient counts
        if a.requires_grad:
            torch.nn.init.normal_(a, std=0.05, generator=torch.Generator().manual_seed(a.numel()))
            b.data.copy_(a.data)
    if chunk:
        monkeypatch.setattr(patching, "MLP_CHUNK_TOKENS", chunk)
    skips, mlp_runs, frozen_calls = [], [], []
    downs = {layer.mlp.down_proj.base_layer for layer in ours.base_model.model.model.layers}
    forward = lora._FrozenLoRALinear.forward

    def spy(ctx, *a):
        frozen_calls.append(a[-1])
        if a[1] in downs:
            skips.append(a[-1])
        return forward(ctx, *a)
    monkeypatch.setattr(lora._FrozenLoRALinear, "forward", staticmethod(spy))
    fused_gate_up, fused_forward = [], lora._FrozenLoRASwiGLU.forward
    monkeypatch.setattr(lora._FrozenLoRASwiGLU, "forward",
                        staticmethod(lambda ctx, *a: fused_gate_up.append(1) or fused_forward(ctx, *a)))
    fused_qkv, qkv_forward = [], lora._FrozenLoRAQKV.forward
    monkeypatch.setattr(lora._FrozenLoRAQKV, "forward",
                        staticmethod(lambda ctx, *a: fused_qkv.append(1) or qkv_forward(ctx, *a)))
    run_mlp = patching.FusedSwiGLUMLP._mlp
    monkeypatch.setattr(patching.FusedSwiGLUMLP, "_mlp", lambda self, t: mlp_runs.append(1) or run_mlp(self, t))
    ids = torch.randint(3, base.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    l_ref, g_ref = _lora_grads(ref, ids)
    for calls in (mlp_runs, frozen_calls, skips):  # PEFT's reference takes the lean forward too
        calls.clear()
    l_ours, g_ours = _lora_grads(ours, ids)
    layers = base.config.num_hidden_layers * (4 if chunk else 1)  # 40 tokens in chunks of 12: 4 pieces a layer
    # offloaded, or chunked: the first forward runs without autograd (a plain layer call); every rerun skips
    assert skips.count(False) == (0 if offload or chunk else layers) and skips.count(True) >= layers
    # every adapted linear runs through a frozen-base Function while gradients are recorded, forward (unless
    # offloaded or chunked: no autograd then) and again in the recomputation: over dense bases gate and up as one
    # _FrozenLoRASwiGLU (its rank-r products added in the SwiGLU kernel), q, k and v as one _FrozenLoRAQKV, the
    # others one by one
    assert len(fused_gate_up) == (layers * (1 if offload or chunk else 2) if frozen == "dense" else 0)
    n_layers = base.config.num_hidden_layers
    assert len(fused_qkv) == (n_layers * (1 if offload else 2) if frozen == "dense" else 0)
    others = 1 if frozen == "dense" else 6
    outside_down = frozen_calls.count(False) - skips.count(False)
    if frozen == "dense":  # o_proj alone: forward (with autograd unless offloaded) and recomputation
        assert outside_down == n_layers * (1 if offload else 2)
    else:
        assert outside_down >= others * n_layers
    # twice per piece, as an unchunked checkpointed MLP: forward, then in backward (none in the layer's recompute)
    assert len(mlp_runs) == 2 * layers
    torch.testing.assert_close(l_ours, l_ref, rtol=1e-5, atol=1e-6)
    assert g_ours.keys() == g_ref.keys() and len(g_ref) == 14 * base.config.num_hidden_layers
    for name in g_ref:
        if frozen == "fp8":  # a gradient a rounding away quantizes to a neighbouring e4m3 code: compare norms
            assert (g_ours[name] - g_ref[name]).norm() < 2e-2 * g_ref[name].norm(), name
        else:
            torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lean_lora_output_adds_in_place_without_view_replay(random_checkpoint):
    """Over a frozen base the layer is one autograd node (``_FrozenLoRALinear``: the base's GEMM accumulates onto
    the adapter's product, forward and backward); with dropout the adapter's product is added into the base's
    2-D output by addmm_ (no full-activation copy in forward), not into a view of it (autograd would replay the
    view with CopySlices: a full clone in backward)."""
    from peft.tuners.lora import Linear as LoraLinear

    from onecard.train.lora import add_lora

    for dropout, first, second in ((0.0, "_FrozenLoRALinearBackward", None), (0.1, "ViewBackward0", "AddmmBackward0")):
        model = add_lora(_load(random_checkpoint("llama-3.1-8b")), r=4, alpha=8, dropout=dropout, seed=0)
        layer = next(m for m in model.modules() if type(m) is LoraLinear)
        x = torch.randn(2, 5, layer.in_features, requires_grad=True)
        out = layer(x)
        assert out.grad_fn.name() == first
        if second:
            assert out.grad_fn.next_functions[0][0].name() == second
        torch.nn.init.normal_(layer.lora_B["default"].weight, generator=torch.Generator().manual_seed(0))
        if dropout == 0.0:  # the Function's gradients are PEFT's
            (gx,) = torch.autograd.grad(layer(x).square().sum(), x)
            vars(layer).pop("forward")
            (gx_ref,) = torch.autograd.grad(layer(x).square().sum(), x)
            torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_adapter_copies_are_made_once_per_forward_and_after_every_change():
    """``_compute_copy``: the same copy for the recomputation and backward of one forward; a fresh one after an
    in-place change (an optimizer step) or the next forward of the model (FSDP2 refills without one)."""
    from onecard.train import lora

    p = torch.nn.Parameter(torch.randn(4, 8))
    first = lora._compute_copy(p, torch.bfloat16, 2.0)
    assert lora._compute_copy(p, torch.bfloat16, 2.0) is first
    torch.testing.assert_close(first, (p.detach() * 2).bfloat16())
    with torch.no_grad():
        p.add_(1.0)  # what an optimizer step does
    after_step = lora._compute_copy(p, torch.bfloat16, 2.0)
    assert after_step is not first
    torch.testing.assert_close(after_step, (p.detach() * 2).bfloat16())
    lora._next_generation(torch.nn.Identity(), ())  # the model's forward pre-hook
    assert lora._compute_copy(p, torch.bfloat16, 2.0) is not after_step


def test_stacked_adapter_copies_follow_every_factor():
    """``_stacked_copy``: reused within a forward; remade when any stacked factor changes or the model runs again."""
    from onecard.train import lora

    ps = tuple(torch.nn.Parameter(torch.randn(r, 8)) for r in (4, 2, 2))
    first = lora._stacked_copy(ps, torch.bfloat16)
    assert lora._stacked_copy(ps, torch.bfloat16) is first
    torch.testing.assert_close(first, torch.cat([p.detach() for p in ps]).bfloat16())
    with torch.no_grad():
        ps[2].mul_(3.0)  # a step that moves only the last factor
    after_step = lora._stacked_copy(ps, torch.bfloat16)
    assert after_step is not first
    torch.testing.assert_close(after_step, torch.cat([p.detach() for p in ps]).bfloat16())
    lora._next_generation(torch.nn.Identity(), ())
    assert lora._stacked_copy(ps, torch.bfloat16) is not after_step


@pytest.mark.parametrize("arch", ["llama-3.1-8b", "qwen2-7b"])  # grouped k/v; qwen2's q/k/v carry a bias
def test_qkv_function_matches_three_lora_layers(random_checkpoint, arch):
    """``frozen_lora_qkv``'s one Function gives the outputs and the input and adapter gradients of the three
    layers run one by one, and the attention forward's q/k/v calls return its outputs (nothing is recomputed)."""
    import onecard.train.lora as lora

    model = lora.add_lora(_load(random_checkpoint(arch)), r=4, alpha=8, seed=0)
    attn = model.base_model.model.model.layers[0].self_attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    for m in layers:  # B starts at zero: give it values so A's gradient counts
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    factors = [p for m in layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]

    def outputs_and_grads(fused: bool):
        recorded = lora.frozen_lora_qkv(*layers, x) if fused else None
        with lora.precomputed_outputs(recorded):
            outs = [m(x) for m in layers]
        loss = sum((o * torch.linspace(-1, 1, o.shape[-1])).square().sum() for o in outs)
        return outs, torch.autograd.grad(loss, [x, *factors]), recorded

    ref_outs, ref_grads, _ = outputs_and_grads(False)
    outs, grads, recorded = outputs_and_grads(True)
    assert all(recorded[m][1] is o for m, o in zip(layers, outs))  # the very tensors the Function made
    assert outs[0].grad_fn.name() == "_FrozenLoRAQKVBackward"
    for ours, ref in zip(outs + list(grads), ref_outs + list(ref_grads)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradients recorded: the layers run on their own
        assert lora.frozen_lora_qkv(*layers, x) is None
