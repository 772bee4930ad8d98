"""FSDP2 on CPU (gloo, 2 processes): same losses as one process on the same global batch (full, LoRA, and QLoRA with
its int4 base sharded too); DCP checkpoints saved by 2 processes load in 1 with identical weights."""

from __future__ import annotations

import pytest
import torch

from onecard.dist.launch import spawn
from onecard.errors import BadInputError, ModelFolderError
from onecard.testing import make_random_checkpoint

STEPS, ROWS, SEQ, LR = 3, 4, 32, 1e-3
METHODS = ("full", "lora", "qlora")
QLORA_GROUP = 32


def _model(folder: str, method: str):
    from transformers import AutoModelForCausalLM

    from onecard.train.checkpointing import enable_checkpointing
    from onecard.train.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    enable_checkpointing(model)  # onecard's (non-reentrant) activation checkpointing composes with FSDP2
    if method == "qlora":  # int4 base (fp32 compute on CPU), as `onecard train --method qlora` builds it
        from onecard.train.qlora import quantize_model_int4

        quantize_model_int4(model, QLORA_GROUP, torch.float32)
    if method in ("lora", "qlora"):
        model.requires_grad_(False)
        model = add_lora(model, r=4, alpha=8, seed=0)
    return model.train()


def _data(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (STEPS, ROWS, SEQ), generator=torch.Generator().manual_seed(1))


def _losses(model, data: torch.Tensor) -> tuple[list[float], torch.optim.Optimizer]:
    from onecard.dist.fsdp import rank_rows, train_step

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return [train_step(model, opt, rank_rows(batch)) for batch in data], opt


def _fsdp_worker(folder: str, out_dir: str) -> None:
    from onecard.dist.fsdp import full_state_dict, save_sharded, shard_for_training_
    from onecard.dist.launch import init_distributed

    env, _ = init_distributed("cpu")
    result = {}
    for method in METHODS:
        model = shard_for_training_(_model(folder, method), mixed_precision=False)
        losses, opt = _losses(model, _data(model.config.vocab_size if method == "full" else
                                           model.get_base_model().config.vocab_size))
        save_sharded(f"{out_dir}/{method}-dcp", model, opt)
        full = full_state_dict(model)
        result[method] = {"losses": losses, "state": full}
        if method == "qlora":  # what this rank holds of the first int4 linear (a DTensor shard, not a buffer)
            from onecard.train.qlora import Int4Linear

            q = next(m for m in model.modules() if isinstance(m, Int4Linear))
            result[method]["int4_local"] = (type(q.qweight).__name__, tuple(q.qweight.to_local().shape),
                                            tuple(q.scales.to_local().shape), q.out_features)
    if env.rank == 0:
        torch.save(result, f"{out_dir}/result.pt")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    folder = str(make_random_checkpoint("llama-3.1-8b", "tiny", overrides={"num_key_value_heads": 2}))
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_fsdp_worker, 2, (folder, str(out)), timeout_s=300)
    return folder, out, torch.load(out / "result.pt")


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_losses_match_one_process(method, fsdp_run):
    folder, _out, result = fsdp_run
    torch.manual_seed(0)
    model = _model(folder, method)
    ref, _ = _losses(model, _data(2048))
    got = result[method]["losses"]
    assert len(got) == STEPS and ref[0] > 5  # random init on a 2048-token vocab: loss near ln(2048) = 7.6
    assert ref[-1] < ref[0], "three AdamW steps on the same data distribution should lower the loss"
    for a, b in zip(got, ref):
        assert abs(a - b) < 1e-4 * abs(b), (got, ref)
    # Weights: AdamW divides by sqrt(v), so an element whose gradient is ~0 moves by up to lr per step with a
    # sign set by rounding noise (the sharded sum adds in another order). Bound those by the steps' reach and
    # require nearly every element to agree to 1e-5.
    state = model.state_dict()
    for name, t in result[method]["state"].items():
        if t.dtype != state[name].dtype:  # a QLoRA base's codes travel as float bits under FSDP2
            t = t.view(state[name].dtype)
        diff = (t.float() - state[name].float()).abs()
        assert diff.max().item() <= 2 * LR * STEPS, (name, diff.max().item())
        assert (diff > 1e-5).float().mean().item() < 0.01, (name, (diff > 1e-5).float().mean().item())


def test_qlora_int4_base_is_sharded(fsdp_run):
    kind, qweight, scales, out_features = fsdp_run[2]["qlora"]["int4_local"]
    assert kind == "DTensor"
    assert qweight[0] == scales[0] == out_features // 2  # rank 0's half of the output rows: codes and their scales


@pytest.mark.parametrize("method", METHODS)
def test_dcp_saved_by_two_loads_in_one(method, fsdp_run):
    from onecard.dist.fsdp import load_sharded

    folder, out, result = fsdp_run
    model = _model(folder, method)
    full = result[method]["state"]
    assert any(not torch.equal(t, model.state_dict()[n]) for n, t in full.items())  # trained != fresh
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    load_sharded(out / f"{method}-dcp", model, opt)
    state = model.state_dict()
    assert set(full) <= set(state)
    for name, t in full.items():  # bitwise: a QLoRA base's codes are float bits, some of them NaN patterns
        assert torch.equal(t.view(torch.uint8), state[name].view(torch.uint8)), name
    assert opt.state and all(s["step"].item() == STEPS for s in opt.state.values())


def test_trainer_fsdp_kwargs_build_training_arguments(tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from onecard.dist.fsdp import decoder_layers, trainer_fsdp_kwargs

    model = AutoModelForCausalLM.from_pretrained(str(make_random_checkpoint("qwen2-7b", "tiny")))
    assert len(decoder_layers(model)) == model.config.num_hidden_layers
    kw = trainer_fsdp_kwargs(model, gradient_checkpointing=True)
    assert kw["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)
    assert args.fsdp_config["version"] == 2 and args.fsdp_config["state_dict_type"] == "SHARDED_STATE_DICT"


def test_errors(tmp_path):
    from torch import nn

    from onecard.dist.fsdp import (
        decoder_layers,
        load_sharded,
        rank_rows,
        shard_for_training_,
    )

    with pytest.raises(ModelFolderError, match="not a sharded"):
        load_sharded(tmp_path, nn.Linear(2, 2))
    with pytest.raises(BadInputError, match="process group"):
        shard_for_training_(nn.Linear(2, 2), mixed_precision=False)
    assert rank_rows(torch.zeros(3, 2)).shape == (3, 2)  # one process: the whole batch
    with pytest.raises(BadInputError, match="decoder layers"):
        decoder_layers(nn.Linear(2, 2))
