"""A CUDA OOM mid-training: re-planned options for the card used, and the last checkpoint left intact.

The OOM is injected (a callback or a patched step raising ``torch.cuda.OutOfMemoryError``), the card is a
hand-built ``CardMemory`` and the measured peak is set through ``oom.measured_peak_bytes``: no GPU needed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from onecard.errors import DoesNotFitError
from onecard.plan import CardMemory
from onecard.plan.card_memory import GIB
from onecard.plan.spec import resolve_model
from onecard.train import oom
from onecard.train.oom import RunShape, corrected_card, oom_advice, oom_guard, plan_shape, requested_bytes

OOM_TEXT = "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 23.99 GiB"


def _shape(**kw) -> RunShape:
    base = dict(method="lora", seq_len=2048, batch_size=4, grad_accum=1, gradient_checkpointing=True,
                offload_checkpoints=False, optimizer="adamw_torch", fused=True, lora_r=16, lora_targets="all-linear",
                qlora_group_size=64)
    return RunShape(**{**base, **kw})


def _need_between(model, card: CardMemory, smaller: RunShape, failed: RunShape) -> tuple[int, object]:
    """A measured need for ``failed`` whose shortfall leaves ``smaller`` fitting and ``failed`` not (the plan's own
    numbers: no hard-coded figures)."""
    p_small, p_failed = plan_shape(model, card, smaller), plan_shape(model, card, failed)
    usable = p_failed.usable_gib * GIB
    missed = (usable - p_small.total_gib * GIB + usable - p_failed.total_gib * GIB) / 2
    return int(p_failed.total_gib * GIB + missed), p_failed


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_requested_bytes_come_from_torch_message():
    assert requested_bytes(OOM_TEXT) == int(1.5 * GIB)
    assert requested_bytes("Tried to allocate 20.00 MiB") == 20 * 2**20
    assert requested_bytes("CUDA error: out of memory") == 0


def test_replanned_options_fit_the_corrected_card_and_the_failed_run_does_not():
    card = CardMemory(total_bytes=40 * GIB, free_bytes=39 * GIB, name="fake 40 GiB card")
    failed = _shape(batch_size=4)
    need, plan = _need_between("llama-3-8b", card, _shape(batch_size=2, grad_accum=2), failed)
    options, missed = oom.oom_options(resolve_model("llama-3-8b"), card, failed, plan, need)
    fixed = corrected_card(card, missed)
    with pytest.raises(DoesNotFitError):
        plan_shape("llama-3-8b", fixed, failed)
    assert options[0].startswith("--batch-size 2 --grad-accum 2 (needs ")  # the largest that fits, same rows/step
    for option in options:  # every option is what the planner says fits, at the GiB it names
        flags = dict(re.findall(r"--([a-z-]+) (\w+)", option.split(" (needs")[0]))
        shape = _shape(batch_size=int(flags.get("batch-size", 4)), grad_accum=int(flags.get("grad-accum", 1)),
                       seq_len=int(flags.get("seq-len", 2048)), method=flags.get("method", "lora"),
                       optimizer=flags.get("optimizer", "adamw_torch"),
                       offload_checkpoints="--offload-checkpoints" in option)
        got = plan_shape("llama-3-8b", fixed, shape)
        assert f"(needs {got.total_gib:.1f} GiB" in option, option
    assert any(o.startswith("--method qlora") for o in options) and any(o.startswith("--seq-len ") for o in options)


def test_offloaded_checkpoints_are_planned_as_cpu_memory():
    card = CardMemory(total_bytes=80 * GIB, free_bytes=79 * GIB)
    on_gpu = plan_shape("llama-3.1-8b", card, _shape(method="qlora", batch_size=1, seq_len=32768))
    offloaded = plan_shape("llama-3.1-8b", card, _shape(method="qlora", batch_size=1, seq_len=32768,
                                                       offload_checkpoints=True))
    spec = resolve_model("llama-3.1-8b").args
    moved = (spec.num_layers - 1) * 32768 * spec.hidden_size * 2  # every layer input but the one in flight
    assert (on_gpu.activations_gib - offloaded.activations_gib) * GIB == pytest.approx(moved, rel=1e-6)


def test_without_a_card_the_heuristic_answers():
    shape = _shape(batch_size=4, grad_accum=2)
    assert oom_advice("llama-3-8b", None, shape, None, 0, 0) == "try --batch-size 2 --grad-accum 4 (same tokens per step)"
    assert oom.suggest_smaller(1, 1, 2048, offload=True, method="qlora") == "--seq-len 1024"


def test_guard_sets_aside_a_save_the_oom_cut_short(tmp_path):
    for n in (5, 10):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / oom.TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoint-15").mkdir()  # the save the OOM interrupted: no trainer_state.json
    with pytest.raises(DoesNotFitError) as err:
        with oom_guard(tmp_path, lambda peak, asked: "try less", step=lambda: 14):
            raise torch.cuda.OutOfMemoryError(OOM_TEXT)
    msg = str(err.value)
    assert "after step 14" in msg and "+ 1.50 GiB asked" in msg and "try less" in msg and "\n" not in msg
    assert "checkpoint-10 is intact" in msg and "set aside as incomplete-checkpoint-15" in msg
    assert not (tmp_path / "checkpoint-15").exists() and (tmp_path / "incomplete-checkpoint-15").is_dir()


def test_oom_line_says_when_the_users_allocator_config_keeps_expandable_segments_off(tmp_path, monkeypatch):
    def message() -> str:
        with pytest.raises(DoesNotFitError) as err:
            with oom_guard(tmp_path, lambda peak, asked: "try less"):
                raise torch.cuda.OutOfMemoryError(OOM_TEXT)
        return str(err.value)

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128 leaves expandable segments off" in message()
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting" in message()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert "expandable" not in message()


# ------------------------------------------------------------------ end to end on the tiny model (CPU, bf16)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from onecard.testing import local_corpus

    f = tmp_path_factory.mktemp("oom-data") / "notes.txt"
    f.write_text("\n\n".join(t[:3000] for t in local_corpus().train[:8]))
    return f


def _tiny_card(tiny_path, shape: RunShape) -> CardMemory:
    """A card where ``shape`` fits with room to spare: 4x its planned need."""
    big = plan_shape(tiny_path, CardMemory(64 * GIB, 64 * GIB), shape)
    total = int(4 * big.total_gib * GIB)
    return CardMemory(total, total, name="fake small card")


class OomAtStep(TrainerCallback):
    """Raises a CUDA OOM as optimizer step ``step`` begins; remembers each checkpoint's file hashes as saved."""

    def __init__(self, step: int) -> None:
        self.step, self.saved = step, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise torch.cuda.OutOfMemoryError(OOM_TEXT)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.saved[folder.name] = _hashes(folder)


def _tiny_cfg(tiny_model, data_file, out, **kw):
    from onecard.train.trainer import TrainConfig

    base = dict(model=tiny_model.path, data=data_file, out=out, seq_len=32, batch_size=4, max_steps=6, save_steps=1,
                eval_steps=0, logging_steps=1, lora_r=4, precision="bf16", device="cpu", gradient_checkpointing=False,
                progress=False, val_fraction=0.0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.timeout(600)
def test_api_oom_replans_for_the_card_and_keeps_the_checkpoint(tiny_model, data_file, tmp_path, monkeypatch):
    from onecard.train.trainer import train

    cfg = _tiny_cfg(tiny_model, data_file, tmp_path / "run")
    failed = RunShape.of(cfg, "adamw_torch")
    card = _tiny_card(tiny_model.path, failed)
    need, _ = _need_between(tiny_model.path, card, RunShape.of(_tiny_cfg(tiny_model, data_file, tmp_path, batch_size=2,
                                                                         grad_accum=2), "adamw_torch"), failed)
    monkeypatch.setattr(oom, "measured_peak_bytes", lambda: need - card.outside_bytes - int(1.5 * GIB))
    hook = OomAtStep(3)
    with pytest.raises(DoesNotFitError) as err:
        train(cfg, extra_callbacks=[hook], card_memory=card)
    msg = str(err.value)
    assert msg.startswith("out of GPU memory after step 3: peak ") and "on fake small card" in msg
    assert "the planner predicted" in msg and "--batch-size 2 --grad-accum 2 (needs" in msg
    assert f"{cfg.out / 'checkpoint-3'} is intact" in msg and "set aside" not in msg
    assert _hashes(cfg.out / "checkpoint-3") == hook.saved["checkpoint-3"]  # byte for byte as saved
    assert not (cfg.out / "checkpoint-4").exists()


@pytest.mark.timeout(600)
def test_oom_during_a_save_leaves_the_previous_checkpoint_to_resume(tiny_model, data_file, tmp_path, monkeypatch):
    from transformers import Trainer

    from onecard.train.trainer import train

    save_rng = Trainer._save_rng_state

    def failing_save(self, output_dir):
        if self.state.global_step == 2:
            raise torch.cuda.OutOfMemoryError(OOM_TEXT)
        return save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", failing_save)
    cfg = _tiny_cfg(tiny_model, data_file, tmp_path / "run", max_steps=3)
    hook = OomAtStep(-1)
    with pytest.raises(DoesNotFitError) as err:
        train(cfg, extra_callbacks=[hook])  # no card: the heuristic answers
    msg = str(err.value)
    assert "try --batch-size 2 --grad-accum 2" in msg and "checkpoint-1 is intact" in msg
    assert "set aside as incomplete-checkpoint-2" in msg
    assert _hashes(cfg.out / "checkpoint-1") == hook.saved["checkpoint-1"]
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng)
    done = train(_tiny_cfg(tiny_model, data_file, cfg.out, max_steps=3, resume=True))
    assert done.steps == 3 and (cfg.out / "checkpoint-3" / oom.TRAINER_STATE).exists()


@pytest.mark.timeout(600)
def test_cli_oom_is_one_line_with_replanned_options(tiny_model, data_file, tmp_path, monkeypatch):
    from transformers import Trainer
    from typer.testing import CliRunner

    from onecard.cli import app
    from onecard.plan import card_memory

    failed = RunShape.of(_tiny_cfg(tiny_model, data_file, tmp_path), "adamw_torch")
    card = _tiny_card(tiny_model.path, failed)
    need, _ = _need_between(tiny_model.path, card, RunShape.of(_tiny_cfg(tiny_model, data_file, tmp_path, batch_size=2,
                                                                         grad_accum=2), "adamw_torch"), failed)
    monkeypatch.setattr(card_memory, "live_card_memory", lambda device=None: card)
    monkeypatch.setattr(oom, "measured_peak_bytes", lambda: need - card.outside_bytes - int(1.5 * GIB))
    step = Trainer.training_step

    def oom_at_two(self, *a, **k):
        if self.state.global_step == 2:
            raise torch.cuda.OutOfMemoryError(OOM_TEXT)
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", oom_at_two)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", str(tiny_model.path), "--data", str(data_file), "--out", str(out),
                                 "--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--save-steps", "1",
                                 "--eval-steps", "0", "--lora-r", "4", "--precision", "bf16", "--device", "cpu",
                                 "--no-gradient-checkpointing", "--val-fraction", "0"])
    assert isinstance(r.exception, DoesNotFitError), r.output
    msg = str(r.exception)
    assert msg.startswith("out of GPU memory after step 2") and "--batch-size 2 --grad-accum 2 (needs" in msg
    assert "checkpoint-2 is intact" in msg and (out / "checkpoint-2" / oom.TRAINER_STATE).exists()
