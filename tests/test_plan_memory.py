"""The planner's byte counts against what transformers/PEFT actually build and save."""

from __future__ import annotations

import pytest
import torch

from onecard.models import ModelArgs, arch_config, builtin_archs, scale_config
from onecard.plan import memory as M
from onecard.plan.spec import resolve_model, spec_from_config
from onecard.testing.checkpoints import build_random_model


def _cfg(arch: str, size: str) -> dict:
    cfg = scale_config(arch_config(arch), size)
    cfg.pop("_onecard_source", None)
    return cfg


def _hf_count(cfg: dict, device: str) -> int:
    model = build_random_model(cfg, dtype="bfloat16" if device == "meta" else "float32", device=device)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", builtin_archs())
def test_weight_count_matches_hf_tiny(arch):
    cfg = _cfg(arch, "tiny")
    spec = spec_from_config(cfg, arch)
    n = _hf_count(cfg, "cpu")
    assert spec.num_parameters() == n
    assert M.weight_bytes(spec, "bf16") == 2 * n


@pytest.mark.parametrize("arch", builtin_archs())
@pytest.mark.parametrize("size", ["small", "full"])
def test_weight_count_matches_hf_meta(arch, size):
    """Full size is built on the meta device: HF's real module tree, no memory."""
    cfg = _cfg(arch, size)
    spec = spec_from_config(cfg, arch)
    assert spec.num_parameters() == _hf_count(cfg, "meta")
    if spec.vision is None:
        assert spec.num_parameters() == ModelArgs.from_hf_config(cfg).num_parameters()


def test_llava_counts_vision_tower_and_projector():
    spec = resolve_model("llava-1.5-7b")
    assert spec.vision is not None and spec.vision.image_tokens == 576
    assert spec.vision.tower_parameters() == 303_507_456  # CLIP ViT-L/14-336 as transformers builds it
    assert spec.vision.projector_parameters() == 20_979_712


@pytest.mark.parametrize("arch, kv_heads, layers, head_dim", [("llama-2-7b", 32, 32, 128), ("llama-3-8b", 8, 32, 128),
                                                              ("qwen2-7b", 4, 28, 128), ("llama-2-70b", 8, 80, 128)])
def test_kv_bytes_per_token_by_hand(arch, kv_heads, layers, head_dim):
    spec = resolve_model(arch)
    assert M.kv_bytes_per_token(spec, "auto") == 2 * layers * kv_heads * head_dim * 2
    scales = 2 * layers * kv_heads * 2  # one fp16 scale per token, layer, K/V and kv head (the engine's layout)
    assert M.kv_bytes_per_token(spec, "fp8") == 2 * layers * kv_heads * head_dim + scales
    assert M.kv_bytes_per_token(spec, "int8") == 2 * layers * kv_heads * head_dim + scales


def test_kv_llama2_7b_is_half_a_mib_per_token():
    # MHA 7B: 2 (K,V) x 32 layers x 4096 x 2 bytes = 512 KiB per token; GQA Llama-3-8B is 4x smaller.
    assert M.kv_bytes_per_token(resolve_model("llama-2-7b")) == 512 * 1024
    assert M.kv_bytes_per_token(resolve_model("llama-3-8b")) == 128 * 1024


def test_int4_70b_weights_are_about_35_gb():
    """ERRATA item 2: 70B x 4 bit is ~35 GB before scales and KV; with scales and 16-bit embeddings more."""
    b = M.weight_bytes(resolve_model("llama-2-70b"), "int4")
    assert 35e9 < b < 38e9
    assert M.weight_bytes(resolve_model("llama-2-70b"), "int8") > 68e9


def test_quantized_linear_layouts():
    assert M.linear_tensor_bytes(4096, 4096, "int4") == [4096 * 4096 // 2, 2 * 32 * 4096, 2 * 32 * 4096]
    assert M.linear_tensor_bytes(4096, 4096, "int8") == [4096 * 4096, 2 * 4096, 2 * 4096]
    assert M.linear_tensor_bytes(4096, 4096, "int4-g64") == [4096 * 4096 // 2, 2 * 64 * 4096]
    nf4 = sum(M.linear_tensor_bytes(4096, 4096, "nf4"))
    assert 4.1 < nf4 * 8 / (4096 * 4096) < 4.2  # NF4 with double-quantized absmax: ~4.13 bits per weight


def test_allocator_rounding():
    assert M.allocator_bytes(1) == 512
    assert M.allocator_bytes(11 * M.MIB + 1) == 12 * M.MIB
    assert M.allocator_bytes(3 * M.MIB + 7) == 3 * M.MIB + 512


def test_bad_inputs_raise_one_line():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        M.kv_bytes_per_token(resolve_model("llama-3-8b"), "fp4")
    with pytest.raises(ValueError, match="weight format"):
        M.weight_format(3)
    with pytest.raises(ValueError, match="LoRA target"):
        M.lora_targets(["qkv"])


def _saved_bytes_per_token(model, tokens: int, labels: bool = True) -> float:
    """Bytes autograd saves for a forward (+ loss), each storage counted once, parameters and buffers excluded;
    plus the adapters' compute copies the forward made (``train.lora._compute_copy``, and ``_stacked_copy`` for
    adapters sharing an input), which live through backward."""
    from onecard.train.lora import _COPIES, _STACKS

    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 1000, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids if labels else None)
    for param in model.parameters():
        for copies in (_COPIES, _STACKS):
            if param in copies:
                pack(copies[param][1])
    return sum(seen.values())


@pytest.mark.parametrize("arch, method, lora", [("llama-2-7b", "full", None), ("qwen2-7b", "full", None),
                                                ("llama-2-7b", "lora", "peft"), ("qwen2-7b", "lora", "peft"),
                                                ("mistral-7b", "qlora", "peft"), ("llama-3.1-8b", "lora", "lean"),
                                                ("qwen2-7b", "qlora", "lean")])
def test_training_activations_match_autograd(arch, method, lora):
    """Every tensor autograd keeps, by hook, equals model_activation_bytes + the fp32 log-softmax of the loss:
    for PEFT's own LoRA forward (adapter_bytes=4) and onecard's lean one (add_lora, adapter_bytes=2)."""
    cfg = _cfg(arch, "tiny")
    model = build_random_model(cfg, dtype="bfloat16")
    model.train()
    targets = M.LORA_TARGETS["all"]
    if method == "qlora":
        from onecard.train.qlora import quantize_model_int4

        quantize_model_int4(model, group_size=64)
    if lora is not None:
        model.enable_input_require_grads()  # what HF does with gradient checkpointing; makes layer 0 like the rest
    if lora == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=list(targets), lora_dropout=0.0))
    elif lora == "lean":
        from onecard.train.lora import add_lora

        model = add_lora(model, r=8, alpha=16)
    tokens = 128
    spec = spec_from_config(cfg, arch)
    measured = _saved_bytes_per_token(model, tokens)
    predicted = M.model_activation_bytes(spec, tokens, method, targets, mixed=False, checkpointing=False, lora_rank=8,
                                         adapter_bytes=4 if lora == "peft" else 2)
    predicted += tokens * spec.args.vocab_size * 4 + 8 * tokens  # log-softmax kept by the loss; labels
    assert abs(measured - predicted) / measured < 0.01, (measured, predicted)


def test_fused_lora_activations_match_autograd(monkeypatch):
    """onecard's fused path (patch_model's Triton RMSNorm/SwiGLU/RoPE, run by the CPU interpreter here, as on
    CUDA) with the lean LoRA forward keeps what model_activation_bytes(fused=True) counts."""
    import onecard.train.patching as patching
    from onecard.kernels.rmsnorm import rmsnorm_triton
    from onecard.kernels.rope import rope_triton
    from onecard.kernels.swiglu import swiglu_triton
    from onecard.train.lora import add_lora

    for name, fn in (("rmsnorm", rmsnorm_triton), ("swiglu", swiglu_triton), ("rope", rope_triton)):
        monkeypatch.setattr(patching, name, fn)
    cfg = _cfg("llama-3.1-8b", "tiny")
    model = build_random_model(cfg, dtype="bfloat16")
    patching.patch_model(model)
    model.enable_input_require_grads()
    model = add_lora(model, r=8, alpha=16).train()
    tokens = 64
    spec = spec_from_config(cfg, "llama-3.1-8b")
    measured = _saved_bytes_per_token(model, tokens, labels=False)  # without labels: no loss, HF's lm_head
    targets = M.LORA_TARGETS["all"]
    predicted = M.model_activation_bytes(spec, tokens, "lora", targets, mixed=False, checkpointing=False, lora_rank=8,
                                         fused=True) - 8 * tokens  # no labels
    assert abs(measured - predicted) / measured < 0.01, (measured, predicted)


def test_long_fused_layers_hold_one_mlp_chunk():
    """Above MLP_CHUNK_TOKENS a fused LoRA layer's MLP part is one chunk's, the rest grows with the length."""
    spec = resolve_model("llama-3-8b")
    MLP_CHUNK_TOKENS = M.MLP_CHUNK_TOKENS
    targets = M.LORA_TARGETS["all"]
    per_token = M.layer_activation_bytes(spec, "qlora", targets, fused=True)
    mlp = M.mlp_activation_bytes(spec, targets, fused=True)
    n = 4 * MLP_CHUNK_TOKENS
    assert M.layer_saved_bytes(spec, n, "qlora", targets, fused=True) == n * (per_token - mlp) + MLP_CHUNK_TOKENS * mlp
    assert M.layer_saved_bytes(spec, n, "qlora", targets) == n * M.layer_activation_bytes(spec, "qlora", targets)
    assert M.layer_saved_bytes(spec, MLP_CHUNK_TOKENS, "qlora", targets, fused=True) == MLP_CHUNK_TOKENS * per_token


def test_checkpointed_peak_is_one_layer_beside_the_loss_or_two_layers_alone():
    """The loss is freed before a layer is recomputed: the peak is never the loss plus the recompute."""
    kept, layer = 100, 30
    saved = kept + 2 * layer  # model_activation_bytes with checkpointing counts the recomputed layer twice
    assert M.checkpointed_peak_bytes(saved, layer, loss_bytes=50) == kept + layer + 50  # a large vocabulary
    assert M.checkpointed_peak_bytes(saved, layer, loss_bytes=10) == kept + 2 * layer  # recompute outgrows it
    spec = resolve_model("llama-2-7b")
    assert M.loss_segment_bytes(spec, 10, fused_ce=False) == 10 * 32000 * 14
    assert M.loss_segment_bytes(spec, 10, fused_ce=True) == M.logits_bytes(spec, 10, True)


def _committed_training_rows():
    import json

    from onecard.bench.results import RESULTS_DIR

    for path in sorted(RESULTS_DIR.glob("plan_accuracy_*.json")):
        data = json.loads(path.read_text())
        for r in data["configs"]:
            if r["path"].startswith("train-") and r.get("measured_gib") is not None:
                yield data, r


def test_committed_training_peaks_are_within_target():
    """Re-plans every measured training row of benchmarks/plan_accuracy.py (full/LoRA/QLoRA, 1k and 4k tokens)."""
    from onecard.hardware import find_gpu
    from onecard.plan import plan_training

    rows = list(_committed_training_rows())
    assert len(rows) >= 18
    misses = []
    for data, r in rows:
        cfg = _cfg(r["arch"], "full")
        cfg["num_hidden_layers"] = r["layers"]
        p = plan_training(spec_from_config(cfg, r["arch"]), find_gpu(data["card_planned"]), method=r["path"].split("-")[1],
                          seq_len=r["length"], gradient_checkpointing=True, gpu_memory_utilization=1.0,
                          cuda_context_gib=data["cuda_context_gib"],
                          peft_forward=data.get("lora_forward", "peft") == "peft")  # files before lean LoRA: PEFT's
        if abs(p.total_gib - r["measured_gib"]) > max(0.5, 0.05 * r["measured_gib"]):
            misses.append(f"{r['arch']} {r['path']} {r['length']}: {p.total_gib:.2f} vs {r['measured_gib']:.2f} GiB")
    assert not misses, misses
