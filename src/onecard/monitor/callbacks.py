"""Hugging Face ``Trainer`` callback: step time, tokens and loss into a ``Monitor``; guard pauses between steps.

    mon = Monitor(log="train.jsonl", guard=ThermalGuard(target=pause := PauseBackoff(1.0)))
    trainer = Trainer(..., callbacks=[MonitorCallback(mon, pause=pause)])

Tokens per step come from ``state.num_input_tokens_seen`` when the Trainer
counts them (``include_num_input_tokens_seen=True``) or from
``tokens_per_step`` when the caller knows its packed batch size.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from onecard.errors import BadInputError
from onecard.monitor.guard import PauseBackoff
from onecard.monitor.monitor import Monitor


class MonitorCallback(TrainerCallback):
    def __init__(self, monitor: Monitor, tokens_per_step: int | None = None, pause: PauseBackoff | None = None,
                 manage: bool = True) -> None:
        if tokens_per_step is not None and tokens_per_step <= 0:
            raise BadInputError(f"tokens_per_step must be > 0, got {tokens_per_step}")
        self.mon, self.tokens_per_step, self.pause, self.manage = monitor, tokens_per_step, pause, manage
        self._t0: float | None = None
        self._seen = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.manage:
            self.mon.start()
        self._seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        metrics: dict[str, float] = {"step": state.global_step}
        if self._t0 is not None:
            metrics["step_time"] = time.perf_counter() - self._t0
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if seen > self._seen:
            metrics["tokens"], self._seen = seen - self._seen, seen
        elif self.tokens_per_step:
            metrics["tokens"] = self.tokens_per_step
        self.mon.record(**metrics)
        if self.pause is not None:
            self.pause.wait()  # the guard's back-off: cool down between optimizer steps

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        keep = {k: v for k, v in (logs or {}).items() if k in ("loss", "learning_rate", "grad_norm", "eval_loss")
                and isinstance(v, (int, float))}
        if keep:
            self.mon.record(step=state.global_step, **keep)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.manage:
            self.mon.stop()
