"""Thermal guard: slow the job down while the GPU is hot or throttling, restore it when cool.

A state machine with hysteresis, fed one GPU sample at a time (live from the
sampler or replayed from a trace - the same code path):

* **hot** = temperature >= ``hot_c`` or a slowdown reason from ``reasons``
  (thermal / HW slowdown / power brake) is set on a watched GPU;
* **cool** = every watched GPU at or below ``cool_c`` with none of those reasons;
* in between (``cool_c`` < T < ``hot_c``) neither timer runs: the gap is the
  hysteresis band that stops the guard flapping.

Hot for ``hot_for_s`` -> back off one level (up to ``max_level``; escalating
needs another full ``hot_for_s``). Cool for ``cool_for_s`` -> restore to level
0. Each action calls the job's back-off target (engine: lower
``max_num_seqs``; trainer: pause between steps) and is logged with its reason.

The power-limit path is a separate, opt-in ``PowerLimiter``: by default it only
says what it *would* do. It writes through a ``PowerWriter`` object, so tests
use a fake writer and never touch a real card.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

from onecard.errors import BadInputError
from onecard.monitor.nvml import THROTTLE_REASONS, GPUSample, decode_throttle

log = logging.getLogger(__name__)

DEFAULT_REASONS = frozenset({"sw_thermal", "hw_thermal", "hw_slowdown", "hw_power_brake"})


@dataclass
class GuardPolicy:
    """When to back off and when to restore.

    ``sw_power_cap`` is not a default trigger: under full load a card sits at
    its power limit by design, and backing off then only loses throughput.
    Add it to ``reasons`` to treat a power-capped card as one to slow down.
    """

    hot_c: float = 83.0
    cool_c: float = 75.0
    hot_for_s: float = 10.0
    cool_for_s: float = 30.0
    max_level: int = 3
    reasons: frozenset[str] = DEFAULT_REASONS
    gpus: tuple[int, ...] | None = None   # watched GPU indices; None = all sampled

    def __post_init__(self) -> None:
        self.reasons = frozenset(self.reasons)
        if not self.cool_c < self.hot_c:
            raise BadInputError(f"guard needs cool_c < hot_c for hysteresis, got cool_c={self.cool_c}, hot_c={self.hot_c}")
        if self.hot_for_s < 0 or self.cool_for_s < 0:
            raise BadInputError("guard hot_for_s and cool_for_s must be >= 0 seconds")
        if self.max_level < 1:
            raise BadInputError(f"guard max_level must be >= 1, got {self.max_level}")
        unknown = self.reasons - THROTTLE_REASONS.keys()
        if unknown:
            raise BadInputError(f"unknown throttle reason(s) {sorted(unknown)}; known: {sorted(THROTTLE_REASONS)}")


@dataclass
class GuardAction:
    t: float
    action: str          # back_off | restore | power_limit | power_limit_dry_run | power_restore | power_restore_dry_run
    level: int
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backoff(Protocol):
    """What a job exposes to the guard."""

    def back_off(self, level: int, reason: str) -> str: ...   # returns what it did, for the log
    def restore(self, reason: str) -> str: ...


class HalveSetting:
    """Back-off for an integer knob (engine ``max_num_seqs``, trainer micro-batch): halve per level, restore the original."""

    def __init__(self, name: str, get: Callable[[], int], set: Callable[[int], None], minimum: int = 1) -> None:
        self.name, self.get, self.set, self.minimum = name, get, set, minimum
        self.original: int | None = None

    def back_off(self, level: int, reason: str) -> str:
        if self.original is None:
            self.original = int(self.get())
        new = max(self.minimum, self.original >> level)
        self.set(new)
        return f"{self.name} {self.original} -> {new}"

    def restore(self, reason: str) -> str:
        if self.original is None:
            return f"{self.name} unchanged"
        self.set(self.original)
        msg = f"{self.name} -> {self.original}"
        self.original = None
        return msg


class PauseBackoff:
    """Back-off for loops that cannot change their batch: sleep ``pause_s * level`` between steps."""

    def __init__(self, pause_s: float = 0.5) -> None:
        if pause_s <= 0:
            raise BadInputError(f"pause_s must be > 0, got {pause_s}")
        self.pause_s = pause_s
        self.current = 0.0

    def back_off(self, level: int, reason: str) -> str:
        self.current = self.pause_s * level
        return f"pause {self.current:.2f} s between steps"

    def restore(self, reason: str) -> str:
        self.current = 0.0
        return "no pause between steps"

    def wait(self) -> None:
        """Call between steps; sleeps only while backed off."""
        if self.current:
            time.sleep(self.current)


class DutyCyclePause:
    """Back-off for a command we cannot change (``onecard monitor run --guard-pause``): pause the process
    with SIGSTOP for ``pause_s * level`` of every ``period_s`` second, resume with SIGCONT.

    The GPU finishes the work already queued and then idles during the pause,
    so average power and heat drop. Only the given process is paused, not its
    children (use it on the process that drives the GPU). ``close()`` always
    resumes it.
    """

    def __init__(self, pid: int, period_s: float = 1.0, pause_s: float = 0.2, max_fraction: float = 0.75) -> None:
        if not 0 < pause_s < period_s or not 0 < max_fraction < 1:
            raise BadInputError(f"duty-cycle pause needs 0 < pause_s < period_s and 0 < max_fraction < 1, "
                                f"got pause_s={pause_s}, period_s={period_s}, max_fraction={max_fraction}")
        self.pid, self.period_s, self.pause_s, self.max_fraction = pid, period_s, pause_s, max_fraction
        self.paused_s = 0.0  # current pause per period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        import signal

        while not self._stop.is_set() and self.paused_s > 0:
            try:
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(self.paused_s)
            finally:
                try:
                    os.kill(self.pid, signal.SIGCONT)
                except ProcessLookupError:
                    return
            self._stop.wait(self.period_s - self.paused_s)

    def back_off(self, level: int, reason: str) -> str:
        self.paused_s = min(self.pause_s * level, self.max_fraction * self.period_s)
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="onecard-guard-pause", daemon=True)
            self._thread.start()
        return f"pid {self.pid} paused {self.paused_s:.2f} s of every {self.period_s:.1f} s"

    def restore(self, reason: str) -> str:
        self.close()
        return f"pid {self.pid} runs freely"

    def close(self) -> None:
        self.paused_s = 0.0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class PowerWriter(Protocol):
    def limit_w(self, index: int) -> float: ...
    def constraints_w(self, index: int) -> tuple[float, float]: ...
    def permitted(self, index: int) -> tuple[bool, str]: ...
    def set_limit_w(self, index: int, watts: float) -> None: ...


class NvmlPowerWriter:
    """The only code in onecard that can change a GPU setting; used only behind ``PowerLimiter(apply=True)``."""

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        nvml.nvmlInit()

    def _h(self, index: int) -> Any:
        return self.nvml.nvmlDeviceGetHandleByIndex(index)

    def limit_w(self, index: int) -> float:
        return self.nvml.nvmlDeviceGetPowerManagementLimit(self._h(index)) / 1000.0

    def constraints_w(self, index: int) -> tuple[float, float]:
        lo, hi = self.nvml.nvmlDeviceGetPowerManagementLimitConstraints(self._h(index))
        return lo / 1000.0, hi / 1000.0

    def permitted(self, index: int) -> tuple[bool, str]:
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            return False, "changing the power limit needs root (NVML NO_PERMISSION otherwise)"
        return True, ""

    def set_limit_w(self, index: int, watts: float) -> None:
        self.nvml.nvmlDeviceSetPowerManagementLimit(self._h(index), int(round(watts * 1000)))


class PowerLimiter:
    """Lower the power limit per back-off level (``fraction ** level`` of the original, floored), restore on cool.

    ``apply=False`` (the default) logs the change it would make and changes
    nothing; ``apply=True`` still refuses when the writer says it is not
    permitted (not root, a container, a shared machine).
    """

    def __init__(self, writer: PowerWriter, apply: bool = False, fraction: float = 0.9, min_fraction: float = 0.7) -> None:
        if not 0 < min_fraction <= fraction < 1:
            raise BadInputError(f"power limiter needs 0 < min_fraction <= fraction < 1, got {min_fraction}, {fraction}")
        self.writer, self.apply, self.fraction, self.min_fraction = writer, apply, fraction, min_fraction
        self.original: dict[int, float] = {}

    def _set(self, t: float, index: int, target: float, level: int, reason: str, kind: str) -> GuardAction:
        now = self.writer.limit_w(index)
        change = f"GPU{index} power limit {now:.0f} W -> {target:.0f} W"
        if not self.apply:
            return GuardAction(t, f"{kind}_dry_run", level, reason,
                               f"would set {change} (dry run: pass --allow-power-limit to apply)")
        ok, why = self.writer.permitted(index)
        if not ok:
            return GuardAction(t, f"{kind}_dry_run", level, reason, f"would set {change}, but not permitted: {why}")
        self.writer.set_limit_w(index, target)
        return GuardAction(t, kind, level, reason, f"set {change}")

    def lower(self, t: float, index: int, level: int, reason: str) -> GuardAction:
        orig = self.original.setdefault(index, self.writer.limit_w(index))
        lo, _ = self.writer.constraints_w(index)
        target = max(lo, orig * max(self.min_fraction, self.fraction ** level))
        return self._set(t, index, target, level, reason, "power_limit")

    def restore(self, t: float, reason: str) -> list[GuardAction]:
        out = [self._set(t, i, w, 0, reason, "power_restore") for i, w in self.original.items()]
        self.original.clear()
        return out


@dataclass
class ThermalGuard:
    """Feed it samples with ``observe``; it returns (and logs) the actions it took."""

    policy: GuardPolicy = field(default_factory=GuardPolicy)
    target: Backoff | None = None
    power: PowerLimiter | None = None
    level: int = 0
    hot_since: float | None = None
    cool_since: float | None = None
    actions: list[GuardAction] = field(default_factory=list)

    def _watched(self, gpus: list[GPUSample]) -> list[GPUSample]:
        return [g for g in gpus if self.policy.gpus is None or g.index in self.policy.gpus]

    def _why_hot(self, gpus: list[GPUSample]) -> tuple[list[int], str]:
        idx, why = [], []
        for g in gpus:
            parts = []
            if g.temp_c is not None and g.temp_c >= self.policy.hot_c:
                parts.append(f"{g.temp_c:.0f}°C >= {self.policy.hot_c:.0f}°C")
            parts += [THROTTLE_REASONS[r][1] for r in decode_throttle(g.throttle) if r in self.policy.reasons]
            if parts:
                idx.append(g.index)
                why.append(f"GPU{g.index} " + ", ".join(parts))
        return idx, "; ".join(why)

    def _cool(self, gpus: list[GPUSample]) -> bool:
        return all((g.temp_c is None or g.temp_c <= self.policy.cool_c)
                   and not set(decode_throttle(g.throttle)) & self.policy.reasons for g in gpus)

    def _act(self, a: GuardAction) -> GuardAction:
        log.warning("thermal guard: %s (level %d): %s%s", a.action, a.level, a.reason, f" -> {a.detail}" if a.detail else "")
        self.actions.append(a)
        return a

    def observe(self, t: float, gpus: list[GPUSample]) -> list[GuardAction]:
        watched = self._watched(gpus)
        if not watched:
            return []
        hot_idx, why = self._why_hot(watched)
        out: list[GuardAction] = []
        p = self.policy
        if hot_idx:
            self.cool_since = None
            self.hot_since = t if self.hot_since is None else self.hot_since
            if t - self.hot_since >= p.hot_for_s and self.level < p.max_level:
                self.level += 1
                reason = f"{why} for {t - self.hot_since:.0f} s"
                did = self.target.back_off(self.level, reason) if self.target else "no back-off target attached"
                out.append(self._act(GuardAction(t, "back_off", self.level, reason, did)))
                if self.power:
                    out += [self._act(self.power.lower(t, i, self.level, reason)) for i in hot_idx]
                self.hot_since = t  # escalating needs another full hot period
        elif self._cool(watched):
            self.hot_since = None
            if self.level:
                self.cool_since = t if self.cool_since is None else self.cool_since
                if t - self.cool_since >= p.cool_for_s:
                    temps = ", ".join(f"GPU{g.index} {g.temp_c:.0f}°C" for g in watched if g.temp_c is not None)
                    reason = f"cool ({temps or 'no temperature'} <= {p.cool_c:.0f}°C, no slowdown) for {t - self.cool_since:.0f} s"
                    self.level = 0
                    did = self.target.restore(reason) if self.target else "no back-off target attached"
                    out.append(self._act(GuardAction(t, "restore", 0, reason, did)))
                    if self.power:
                        out += [self._act(a) for a in self.power.restore(t, reason)]
                    self.cool_since = None
        else:  # hysteresis band: neither hot nor cool, both timers restart
            self.hot_since = self.cool_since = None
        return out
