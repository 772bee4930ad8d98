"""QLoRA int4 base, LoRA target checks, offloaded checkpointing, config validation, precision benchmark."""

from __future__ import annotations

import copy

import pytest
import torch

from onecard.errors import BadInputError
from onecard.train.qlora import Int4Linear, dequantize_int4, quantize_int4, quantize_model_int4


def test_int4_roundtrip_error_is_within_half_a_step():
    w = torch.randn(16, 128)
    packed, scales = quantize_int4(w, 64, torch.float32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 64) and scales.shape == (16, 2)
    err = (dequantize_int4(packed, scales, torch.float32) - w).abs()
    step = scales.repeat_interleave(64, dim=1)
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("rows,cols,group,dtype", [(16, 256, 64, torch.bfloat16), (19, 96, 32, torch.float16),
                                                  (33, 384, 128, torch.float32), (5, 64, 64, torch.bfloat16)])
def test_int4_dequant_kernel_is_bit_exact_with_the_reference(rows, cols, group, dtype):
    """The one-pass Triton dequantization (interpreter on CPU) against the PyTorch ops: the same bits, with rows
    and byte columns that do not fill the kernel's tiles."""
    from onecard.kernels.int4_dequant import dequantize_int4_reference, dequantize_int4_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    packed, scales = quantize_int4(torch.randn(rows, cols), group, dtype)
    packed, scales = packed.to(dev), scales.to(dev)
    got, want = dequantize_int4_triton(packed, scales, dtype), dequantize_int4_reference(packed, scales, dtype)
    assert got.dtype == dtype
    if dtype == torch.bfloat16 and dev == "cpu":  # the interpreter casts fp32 to bf16 by truncation, CUDA rounds
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got, want)


def test_int4_linear_backward_gives_input_grad_without_saving_the_weight():
    lin = torch.nn.Linear(128, 8, bias=True)
    q = Int4Linear.from_linear(lin, 64, torch.float32)
    x = torch.randn(4, 128, requires_grad=True)
    y = q(x)
    w = q.dequantized_weight()
    torch.testing.assert_close(y, x @ w.t() + lin.bias, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ w, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_qlora_model_trains_only_the_adapter(random_checkpoint):
    from transformers import AutoModelForCausalLM

    from onecard.train.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(str(random_checkpoint("llama-3.1-8b")))
    n = quantize_model_int4(model, 64, torch.float32)
    assert n == 7 * model.config.num_hidden_layers and isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)
    model = add_lora(model, r=4, alpha=8, seed=0)
    ids = torch.randint(3, 100, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


def test_lora_targets_that_match_nothing_are_refused(random_checkpoint):
    from transformers import AutoModelForCausalLM

    from onecard.train.lora import resolve_targets

    model = AutoModelForCausalLM.from_pretrained(str(random_checkpoint("llama-3.1-8b")))
    assert resolve_targets(model, "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(BadInputError, match=r"query_key_value match no linear layer; this model has: q_proj"):
        resolve_targets(model, "q_proj,query_key_value")


def test_offloaded_checkpointing_matches_plain_backward(random_checkpoint):
    from transformers import AutoModelForCausalLM

    from onecard.train.checkpointing import enable_checkpointing

    ref = AutoModelForCausalLM.from_pretrained(str(random_checkpoint("llama-3.1-8b"))).train()
    ours = copy.deepcopy(ref)
    enable_checkpointing(ours, offload=True)
    ids = torch.randint(3, 100, (2, 16))
    grads = []
    for m in (ref, ours):
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kw,match", [
    ({"method": "dpo"}, "--method must be one of"),
    ({"seq_len": 0}, "--seq-len must be >= 1"),
    ({"max_steps": 0}, "--max-steps must be >= 1"),
    ({"lr": 3.0}, "--lr must be in"),
    ({"method": "full", "merge": True}, "--merge applies to LoRA"),
    ({"offload_checkpoints": True, "gradient_checkpointing": False}, "needs gradient checkpointing"),
    ({"method": "qlora", "precision": "fp8"}, "QLoRA base is int4"),
    ({"method": "qlora", "qlora_quant": "fp4"}, "--qlora-quant must be one of int4, nf4"),
    ({"qlora_quant": "nf4"}, "use it with --method qlora"),
])
def test_train_config_rejects_bad_values(kw, match):
    from onecard.train.trainer import TrainConfig

    with pytest.raises(BadInputError, match=match):
        TrainConfig(model="m", data="d", **kw)


def test_nf4_base_without_bitsandbytes_or_on_several_gpus_is_refused(monkeypatch):
    import importlib.util

    from onecard.errors import MissingExtraError, NotBuiltYetError
    from onecard.train import trainer
    from onecard.train.trainer import TrainConfig, check_distributed

    real = importlib.util.find_spec
    monkeypatch.setattr(trainer.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"--qlora-quant nf4 needs bitsandbytes.*--qlora-quant int4"):
        TrainConfig(model="m", data="d", method="qlora", qlora_quant="nf4")
    monkeypatch.setattr(trainer.importlib.util, "find_spec", real)
    pytest.importorskip("bitsandbytes")
    with pytest.raises(NotBuiltYetError, match="nf4 with several GPUs"):
        check_distributed(TrainConfig(model="m", data="d", method="qlora", qlora_quant="nf4"))


def test_nf4_qlora_base_learns_and_trains_only_the_adapter(random_checkpoint, tmp_path):
    """``--qlora-quant nf4``: bitsandbytes' NF4 base under onecard's fused kernels and checkpointing (CPU): only the
    adapter learns, the loss on a repeated batch falls, the summary counts the base's logical weights, and the
    planner is asked about an NF4 base."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from onecard.train.lora import trainable_summary
    from onecard.train.oom import RunShape
    from onecard.train.trainer import TrainConfig, load_model, prepare_model

    path = random_checkpoint("llama-3.1-8b")
    cfg = TrainConfig(model=path, data=tmp_path, method="qlora", qlora_quant="nf4", lora_r=4, seq_len=16,
                      device="cpu")
    model, _ = load_model(cfg, "cpu", "fp32")
    weights = {type(m.weight).__name__ for m in model.modules() if hasattr(m, "in_features")}
    assert weights == {"Params4bit", "Parameter"}  # the head stays dense
    model, summary = prepare_model(model, cfg, "fp32", "cpu")
    assert "SwiGLU" in summary
    dense = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(path)).parameters())
    trainable, total = trainable_summary(model)
    assert total == dense + trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert RunShape.of(cfg, "adamw_torch").qlora_quant == "nf4"


def test_seq_len_above_model_maximum_is_refused(random_checkpoint, tmp_path):
    from onecard.train.trainer import TrainConfig, load_model

    cfg = TrainConfig(model=random_checkpoint("llama-3.1-8b"), data=tmp_path, seq_len=10**7, device="cpu")
    with pytest.raises(BadInputError, match=r"above this model's maximum of \d+ positions"):
        load_model(cfg, "cpu", "fp32")


def test_precision_benchmark_runs_fresh_models_and_skips_what_cpu_cannot(random_checkpoint):
    from onecard.train.precision import benchmark_precision

    res = {r.mode: r for r in benchmark_precision(random_checkpoint("llama-3.1-8b"), ("fp32", "bf16", "fp16"),
                                                  seq_len=16, steps=1, warmup=1, device="cpu")}
    assert res["fp32"].tokens_per_second > 0 and res["bf16"].tokens_per_second > 0
    assert res["fp16"].skipped == "fp16 needs a CUDA GPU" and res["fp16"].tokens_per_second is None
    assert abs(res["bf16"].loss - res["fp32"].loss) < 0.1 * res["fp32"].loss


def test_fp8_training_is_refused_where_it_cannot_run_and_picks_its_linears():
    from onecard.errors import NotBuiltYetError
    from onecard.train.precision import fp8_linear_filter
    from onecard.train.trainer import TrainConfig, check_distributed, resolve_precision

    with pytest.raises(BadInputError, match="--precision fp8: fp8 training needs a CUDA GPU"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(NotBuiltYetError, match="fp8 with several GPUs"):
        check_distributed(TrainConfig(model="m", data="d", precision="fp8"))
    assert fp8_linear_filter(torch.nn.Linear(32, 64), "model.layers.0.mlp.up_proj")
    assert not fp8_linear_filter(torch.nn.Linear(32, 64), "lm_head")  # the head stays bf16
    assert not fp8_linear_filter(torch.nn.Linear(20, 64), "model.layers.0.mlp.up_proj")  # fp8 matmuls need /16
    assert not fp8_linear_filter(torch.nn.LayerNorm(32), "model.norm")


def test_fp8_bases_sit_under_the_lora_adapters(random_checkpoint, tmp_path):
    """The swap happens before PEFT wraps: LoRA's bases are onecard's frozen fp8 linears (no torchao needed), the
    head stays as it was; full fine-tuning's trained linears are torchao's float8 ones (the fp8 extra)."""
    from onecard.train.fp8_base import Fp8FrozenLinear
    from onecard.train.trainer import TrainConfig, load_model, prepare_model

    cfg = TrainConfig(model=random_checkpoint("llama-3.1-8b"), data=tmp_path, method="lora", precision="fp8",
                      device="cpu", fused=False, gradient_checkpointing=False)
    model, _ = load_model(cfg, "cpu", "fp8")
    model, summary = prepare_model(model, cfg, "fp8", "cpu")
    layer = model.base_model.model.model.layers[0]
    assert type(layer.self_attn.q_proj.base_layer) is Fp8FrozenLinear and "frozen fp8 base linears" in summary
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
    assert layer.self_attn.q_proj.base_layer.qweight.dtype == torch.float8_e4m3fn
    pytest.importorskip("torchao")
    cfg = TrainConfig(model=cfg.model, data=tmp_path, method="full", precision="fp8", device="cpu", fused=False,
                      gradient_checkpointing=False)
    model, _ = load_model(cfg, "cpu", "fp8")
    model, summary = prepare_model(model, cfg, "fp8", "cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Float8Linear"
    assert "float8 linears (torchao)" in summary


def test_fp8_frozen_linear_is_the_dense_layer_within_fp8_error():
    """Forward ``x W^T`` from the per-output-channel codes, input gradient ``g W`` from the per-input-channel
    codes of the transpose: each within e4m3's error of the dense layer, and exactly the products of those codes
    and row-wise scales."""
    from onecard.kernels.fp8_quant import quantize_rows_reference
    from onecard.train.fp8_base import Fp8FrozenLinear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    torch.nn.init.normal_(lin.weight, generator=g)
    torch.nn.init.normal_(lin.bias, generator=g)
    fp8 = Fp8FrozenLinear.from_linear(lin)
    assert fp8.qweight.shape == (48, 64) and fp8.qweight_t.shape == (64, 48) and not fp8.bias.requires_grad
    assert fp8.qweight.is_contiguous() and fp8.qweight_t.is_contiguous()  # cuBLASLt takes row- x column-major
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    y = fp8(x)
    assert y.shape == (3, 5, 48) and y.dtype == x.dtype
    dense = lin(x.detach())
    assert (y.detach() - dense).norm() < 0.05 * dense.norm()
    codes, scale = quantize_rows_reference(x.detach().reshape(-1, 64))
    exact = ((codes.float() * scale) @ (fp8.qweight.float() * fp8.weight_scale.t()).t()).bfloat16().float()
    torch.testing.assert_close(y.detach().reshape(-1, 48), exact + lin.bias.detach(), rtol=0, atol=1e-6)
    grad = torch.randn(3, 5, 48, generator=g)
    (gx,) = torch.autograd.grad(y, x, grad)
    dense_gx = grad @ lin.weight.detach()
    assert gx.shape == x.shape and (gx - dense_gx).norm() < 0.05 * dense_gx.norm()


def test_fp8_lora_trains_through_the_fused_checkpointed_path(random_checkpoint, tmp_path):
    """The frozen fp8 bases under onecard's whole LoRA path (fused kernels, checkpointing, the lean adapter forward):
    one step runs, every adapter's B gets a gradient, and the loss is bf16's within fp8's error."""
    from onecard.train.trainer import TrainConfig, load_model, prepare_model

    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = {}
    for precision in ("bf16", "fp8"):
        cfg = TrainConfig(model=random_checkpoint("llama-3.1-8b"), data=tmp_path, method="lora", precision=precision,
                          device="cpu", lora_r=8, seq_len=32)
        model, _ = load_model(cfg, "cpu", precision)
        model, summary = prepare_model(model, cfg, precision, "cpu")
        assert ("fp8 base linears" in summary) == (precision == "fp8")
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]  # A's are 0: B = 0
        assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        losses[precision] = loss.item()
    assert abs(losses["fp8"] - losses["bf16"]) < 0.05 * losses["bf16"], losses


def test_lora_over_torchao_float8_bases_adds_its_adapter_out_of_place(random_checkpoint):
    """A base whose output is a view made inside its own autograd Function (torchao's Float8Linear) may not be
    modified in place: the lean LoRA forward adds the adapter out of place there, and a step runs."""
    pytest.importorskip("torchao")
    from onecard.train.lora import add_lora
    from onecard.train.precision import use_fp8_linears_
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_checkpoint("llama-3.1-8b"), dtype=torch.bfloat16)
    assert use_fp8_linears_(model) > 0
    model.requires_grad_(False)
    model = add_lora(model, r=4, alpha=8, seed=0)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
