"""Trainer callbacks (the out-of-memory guard is ``oom.py``).

- ``RichProgressCallback``: one rich progress bar with loss, lr, eval perplexity and peak memory
  (the Trainer's tqdm bars are turned off so the terminal shows one thing).
- ``LossHistoryCallback``: keeps (step, loss) and (step, eval_loss, eval_perplexity) for reports and tests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback



def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def eval_perplexity(eval_loss: float) -> float:
    return math.exp(min(eval_loss, 50.0))


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over optimizer steps."""

    def __init__(self, console=None) -> None:
        self.console = console
        self.bar = None
        self.task = None
        self.last = ""

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"), console=self.console, transient=False)
        self.bar.start()
        self.task = self.bar.add_task("", total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.bar or not logs:
            return
        parts = []
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "eval_perplexity" in logs:
            parts.append(f"eval ppl {logs['eval_perplexity']:.2f}")
            self.bar.console.print(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}, "
                                   f"perplexity {logs['eval_perplexity']:.2f}")
        if torch.cuda.is_available():
            parts.append(f"peak {peak_gib():.1f} GiB")
        if parts:
            self.last = ", ".join(parts)
            self.bar.update(self.task, description=self.last)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """End the live display; also called when training stops with an error (no on_train_end then)."""
        if self.bar:
            self.bar.stop()
            self.bar = None


@dataclass
class LossHistoryCallback(TrainerCallback):
    """Every logged training loss and evaluation, by optimizer step."""

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float, float]] = field(default_factory=list)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.train.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval.append((state.global_step, float(logs["eval_loss"]),
                              float(logs.get("eval_perplexity", eval_perplexity(logs["eval_loss"])))))


def last_checkpoint(out_dir: Path) -> Path | None:
    """Newest ``checkpoint-N`` folder in ``out_dir`` (HF Trainer's layout), if any."""
    if not out_dir.is_dir():
        return None
    ckpts = [p for p in out_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1])) if ckpts else None
