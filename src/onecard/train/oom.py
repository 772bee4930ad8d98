"""A CUDA out-of-memory error mid-training: what the run really needed, what fits instead, and the intact checkpoint.

The preflight (``onecard.plan.preflight.training_preflight``) let the run start
because the planner predicted it fits; an OOM means the planner under-counted
this run on this card. The guard measures what the run asked for (the
allocator's reserved peak plus the allocation that failed), carries the
planner's shortfall over to every candidate setting as a fixed margin, and
keeps the ``onecard train`` options that the planner then says fit. The margin
errs safe: each candidate needs less memory than the failed run, and the
part the planner missed (activations, allocator fragmentation) shrinks with it.

The heuristic order (``suggest_smaller``) is the answer only when the planner
cannot model the run: no card (CPU), fp32 training, or a model it cannot read.

The failed step never touches disk, so the newest complete checkpoint is
intact. A save cut short by the OOM (a ``checkpoint-N`` without HF Trainer's
``trainer_state.json``, written last) is renamed ``incomplete-checkpoint-N``,
so ``--resume`` and HF's own checkpoint rotation never pick it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from onecard.errors import DoesNotFitError, OnecardError
from onecard.monitor.allocator import expandable_segments_on, user_alloc_conf
from onecard.plan.card_memory import GIB, CardMemory
from onecard.train.callbacks import last_checkpoint

TRAINER_STATE = "trainer_state.json"  # HF Trainer writes it after the weights, optimizer, scheduler and RNG states
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def measured_peak_bytes() -> int:
    """The caching allocator's reserved peak: what the card actually had to hold for this process."""
    return torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0


def requested_bytes(message: str) -> int:
    """The allocation that failed, from torch's message ("Tried to allocate 2.00 GiB"); 0 when it is not named."""
    m = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


def suggest_smaller(batch_size: int, grad_accum: int, seq_len: int, offload: bool, method: str) -> str:
    """The first setting, in order of least change to the run, that needs less memory (no planner: no promise)."""
    if batch_size > 1:
        return f"--batch-size {batch_size // 2} --grad-accum {grad_accum * 2} (same tokens per step)"
    if not offload:
        return "--offload-checkpoints (keeps layer checkpoints in CPU memory)"
    if method == "full":
        return "--method lora"
    if method == "lora":
        return "--method qlora (int4 base weights)"
    return f"--seq-len {max(seq_len // 2, 128)}"


@dataclass(frozen=True)
class RunShape:
    """The settings of one training run that the planner reads (``TrainConfig``'s, optimizer as the trainer resolved it)."""

    method: str
    seq_len: int
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    offload_checkpoints: bool
    optimizer: str
    fused: bool
    lora_r: int
    lora_targets: str
    qlora_group_size: int
    qlora_quant: str = "int4"

    @classmethod
    def of(cls, cfg, optimizer: str) -> "RunShape":
        return cls(cfg.method, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.gradient_checkpointing,
                   cfg.offload_checkpoints, optimizer, cfg.fused, cfg.lora_r, cfg.lora_targets, cfg.qlora_group_size,
                   cfg.qlora_quant)


def plan_shape(model, card: CardMemory, shape: RunShape):
    """The planner's ``TrainingPlan`` for ``shape`` on ``card``; raises ``DoesNotFitError`` when it does not fit."""
    from onecard.plan.preflight import training_preflight

    return training_preflight(model, card, method=shape.method, seq_len=shape.seq_len, batch_size=shape.batch_size,
                              grad_accum=shape.grad_accum, gradient_checkpointing=shape.gradient_checkpointing,
                              optimizer=shape.optimizer, fused_ce=shape.fused, lora_rank=shape.lora_r,
                              lora_targets=shape.lora_targets, qlora_group_size=shape.qlora_group_size,
                              qlora_quant=shape.qlora_quant, offload_checkpoints=shape.offload_checkpoints)


def corrected_card(card: CardMemory, missed_bytes: int) -> CardMemory:
    """``card`` with ``missed_bytes`` already taken by this process, so every plan on it keeps that margin."""
    return replace(card, free_bytes=max(card.free_bytes - missed_bytes, 0), reserved_bytes=card.reserved_bytes + missed_bytes)


def _flags(shape: RunShape) -> str:
    """``shape`` as the ``onecard train`` options that differ from the defaults that matter here."""
    parts = [f"--method {shape.method}", f"--batch-size {shape.batch_size}", f"--grad-accum {shape.grad_accum}",
             f"--seq-len {shape.seq_len}"]
    if shape.offload_checkpoints:
        parts.append("--offload-checkpoints")
    if shape.optimizer != "adamw_torch":
        parts.append(f"--optimizer {shape.optimizer}")
    return " ".join(parts)


def _candidates(shape: RunShape) -> list[list[tuple[str, RunShape, str]]]:
    """Groups of alternatives, in order of least change to the run; the first that fits in each group is offered."""
    rows = shape.batch_size * shape.grad_accum
    groups = [[(f"--batch-size {b} --grad-accum {rows // b}", replace(shape, batch_size=b, grad_accum=rows // b),
                "same rows per step") for b in range(shape.batch_size - 1, 0, -1) if rows % b == 0]]
    if not shape.gradient_checkpointing:
        groups.append([("--gradient-checkpointing", replace(shape, gradient_checkpointing=True), "")])
    if not shape.fused:
        groups.append([("--fused", replace(shape, fused=True), "")])
    if shape.optimizer == "adamw_torch":
        hint = "" if importlib.util.find_spec("bitsandbytes") else "pip install bitsandbytes"
        groups.append([("--optimizer adamw_8bit", replace(shape, optimizer="adamw_8bit"), hint)])
    if not shape.offload_checkpoints:
        on = "" if shape.gradient_checkpointing else "--gradient-checkpointing "
        groups.append([(f"{on}--offload-checkpoints", replace(shape, gradient_checkpointing=True,
                                                                offload_checkpoints=True), "")])
    methods = {"full": ("lora", "qlora"), "lora": ("qlora",), "qlora": ()}[shape.method]
    groups.append([(f"--method {m}", replace(shape, method=m), "") for m in methods])
    return groups


def _fits(model, card: CardMemory, shape: RunShape):
    """The plan for ``shape`` when it fits ``card``, else None."""
    try:
        return plan_shape(model, card, shape)
    except DoesNotFitError:
        return None


def _longest_seq(model, card: CardMemory, shape: RunShape, multiple: int = 64):
    """(longest ``--seq-len`` below ``shape.seq_len``, a multiple of ``multiple``, that fits at its batch size, its
    plan); (0, None) if none does."""
    lo, hi, best = 0, (shape.seq_len - 1) // multiple, None
    while lo < hi:  # more tokens never need less memory
        mid = (lo + hi + 1) // 2
        plan = _fits(model, card, replace(shape, seq_len=mid * multiple))
        if plan is not None:
            lo, best = mid, plan
        else:
            hi = mid - 1
    return lo * multiple, best


def oom_options(model, card: CardMemory, shape: RunShape, plan, need_bytes: int) -> tuple[list[str], int]:
    """The ``onecard train`` options that fit ``card`` once the planner's shortfall on this run is carried over.

    ``plan``: the planner's ``TrainingPlan`` for ``shape`` on ``card`` (the
    preflight's); ``need_bytes``: what the run was measured to want (CUDA
    context and other processes + reserved peak + the allocation that failed).
    Returns the options, each with the GiB the planner gives it, and the margin.
    """
    # the margin makes the failed run itself not fit, even when the measured need looks like it would
    missed = max(int(max(need_bytes, plan.usable_gib * GIB + 1) - plan.total_gib * GIB), 0)
    card = corrected_card(card, missed)
    out: list[str] = []

    def offer(label: str, plan, note: str = "") -> None:
        out.append(f"{label} (needs {plan.total_gib:.1f} GiB{'; ' + note if note else ''})")

    for group in _candidates(shape):
        for label, s, note in group:
            plan = _fits(model, card, s)
            if plan is not None:
                offer(label, plan, note)
                break
    seq, plan = _longest_seq(model, card, shape)
    if seq >= 128:
        offer(f"--seq-len {seq}", plan, "shorter rows")
    if not out:  # no single change is enough: every saving at once
        rows = shape.batch_size * shape.grad_accum
        least = replace(shape, method="qlora", batch_size=1, grad_accum=rows, gradient_checkpointing=True,
                        offload_checkpoints=True, fused=True)
        seq, plan = _longest_seq(model, card, replace(least, seq_len=shape.seq_len + 1))
        if seq >= 128:
            offer(f"all together: {_flags(replace(least, seq_len=seq))}", plan)
        else:
            out.append("none on this card: even QLoRA at batch 1 with offloaded checkpoints does not fit")
    return out, missed


def oom_advice(model, card: CardMemory | None, shape: RunShape, plan, peak_bytes: int, asked_bytes: int) -> str:
    """One clause for the OOM line: the planner's options (``plan`` is the preflight's), or the heuristic's."""
    fallback = "try " + suggest_smaller(shape.batch_size, shape.grad_accum, shape.seq_len, shape.offload_checkpoints,
                                        shape.method)
    if card is None or plan is None:
        return fallback
    from onecard.plan.spec import resolve_model

    need = card.outside_bytes + peak_bytes + asked_bytes
    try:
        options, missed = oom_options(resolve_model(model), card, shape, plan, need)
    except OnecardError:  # a model or setting the planner cannot read
        return fallback
    return (f"the planner predicted {plan.total_gib:.1f} GiB for this run and missed {missed / GIB:.1f} GiB; with "
            f"that margin kept, these fit: {'; '.join(options)}")


def set_aside_incomplete(out_dir: Path) -> Path | None:
    """Rename a newest ``checkpoint-N`` that a failed save left without ``trainer_state.json``; return its new path."""
    newest = last_checkpoint(out_dir)
    if newest is None or (newest / TRAINER_STATE).exists():
        return None
    target = out_dir / f"incomplete-{newest.name}"
    n = 1
    while target.exists():
        n += 1
        target = out_dir / f"incomplete-{newest.name}.{n}"
    newest.rename(target)
    return target


def checkpoint_note(out_dir: Path) -> str:
    """Which checkpoint ``--resume`` will continue from, after setting aside a save the OOM cut short."""
    moved = set_aside_incomplete(out_dir)
    ckpt = last_checkpoint(out_dir)
    note = f"last checkpoint {ckpt} is intact (continue with --resume)" if ckpt else "no checkpoint was saved yet"
    return note + (f"; the save the OOM cut short is set aside as {moved.name}" if moved else "")


@contextlib.contextmanager
def oom_guard(out_dir: Path, advise: Callable[[int, int], str], card: CardMemory | None = None,
              step: Callable[[], int | None] = lambda: None):
    """Re-raise a CUDA OOM as one ``DoesNotFitError`` line: the peak, the card, what fits, the intact checkpoint.

    ``advise(peak_bytes, asked_bytes)`` gives the options clause (``oom_advice``
    bound to the run); ``card`` is the card the preflight planned against;
    ``step()`` the optimizer steps completed (HF's ``state.global_step``).
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        peak, asked = measured_peak_bytes(), requested_bytes(str(err))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if card is not None:
            where = f"{card.name} ({card.total_bytes / GIB:.1f} GiB)"
        elif torch.cuda.is_available():
            where = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB)"
        else:
            where = "the GPU"
        at = step()
        raise DoesNotFitError(
            f"out of GPU memory{f' after step {at}' if at is not None else ''}: peak {peak / GIB:.1f} GiB reserved "
            f"+ {asked / GIB:.2f} GiB asked on {where}; {advise(peak, asked)}{allocator_note()}; "
            f"{checkpoint_note(out_dir)}") from None


def allocator_note() -> str:
    """A clause for the OOM line when expandable segments are off (the user's own allocator config, or the Python
    API, which leaves the allocator alone; ``onecard train`` turns them on otherwise): split segments strand free
    memory, and a long context hits the cap with it free."""
    if expandable_segments_on():
        return ""
    given = user_alloc_conf()
    if given:
        return (f"; {given} leaves expandable segments off, so free memory can sit stranded in split segments: "
                "add expandable_segments:True to it")
    return ("; expandable segments are off, so free memory can sit stranded in split segments: set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting (onecard train does)")
