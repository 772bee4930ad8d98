"""The JSONL trace: one JSON object per line, written as things happen, read back for reports and replay.

Event kinds (every event has ``kind`` and ``ts``, Unix seconds):

* ``meta``   - once at the start: ``interval``, ``command``, ``host``, ``gpus`` (names), ``no_gpu`` (why, if none)
* ``sample`` - ``gpus`` (list of GPUSample dicts, may be empty), ``allocator`` (or null), ``proc``
  (pid / cpu_pct / rss_mib, or null), ``cost_s`` (time the sampler spent)
* ``record`` - job metrics from ``Monitor.record`` (tokens, latency, step_time, ttft, ...)
* ``guard``  - a thermal-guard action with its reason
* ``exit``   - the wrapped command's ``returncode``

Appending is line-at-a-time with a lock, so a wrapped command's own
``Monitor`` can add ``record`` lines to the same file (``ONECARD_MONITOR_TRACE``).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onecard.errors import BadInputError
from onecard.monitor.allocator import AllocatorStats
from onecard.monitor.nvml import GPUSample

KINDS = ("meta", "sample", "record", "guard", "exit")


@dataclass
class Sample:
    ts: float
    gpus: list[GPUSample] = field(default_factory=list)
    allocator: AllocatorStats | None = None
    proc: dict[str, Any] | None = None
    cost_s: float | None = None

    def to_event(self) -> dict[str, Any]:
        return {"kind": "sample", "ts": self.ts, "gpus": [g.to_dict() for g in self.gpus],
                "allocator": self.allocator.to_dict() if self.allocator else None,
                "proc": self.proc, "cost_s": self.cost_s}

    @classmethod
    def from_event(cls, e: dict[str, Any]) -> "Sample":
        return cls(ts=float(e["ts"]), gpus=[GPUSample.from_dict(g) for g in e.get("gpus") or []],
                   allocator=AllocatorStats.from_dict(e["allocator"]) if e.get("allocator") else None,
                   proc=e.get("proc"), cost_s=e.get("cost_s"))


@dataclass
class Trace:
    meta: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    guard: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def start(self) -> float:
        if "ts" in self.meta:
            return float(self.meta["ts"])
        stamps = [s.ts for s in self.samples] + [r["ts"] for r in self.records]
        return min(stamps) if stamps else 0.0

    @property
    def end(self) -> float:
        stamps = [s.ts for s in self.samples] + [r["ts"] for r in self.records] + [g["ts"] for g in self.guard]
        return max(stamps) if stamps else self.start

    def add(self, e: dict[str, Any]) -> None:
        kind = e.get("kind")
        if kind == "meta":
            self.meta = e
        elif kind == "sample":
            self.samples.append(Sample.from_event(e))
        elif kind == "record":
            self.records.append(e)
        elif kind == "guard":
            self.guard.append(e)
        elif kind == "exit":
            self.exit_code = e.get("returncode")


def load_trace(path: str | Path) -> Trace:
    """Read a JSONL trace; a bad line is an error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"trace {p} does not exist: write one with 'onecard monitor run --log {p} -- CMD'")
    trace = Trace()
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                if not isinstance(e, dict) or e.get("kind") not in KINDS or "ts" not in e:
                    raise ValueError(f"needs an object with kind in {KINDS} and ts")
                trace.add(e)
            except (ValueError, KeyError, TypeError) as err:
                raise BadInputError(f"{p}:{n} is not a onecard trace line ({err}); was it written by 'onecard monitor run'?") from None
    if not trace.samples and not trace.records:
        raise BadInputError(f"trace {p} has no samples or records: the monitored run ended before the first sample")
    return trace


class TraceWriter:
    """Thread-safe append of events, flushed per line so a crash loses at most one line."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise BadInputError(f"cannot write trace {self.path}: folder {self.path.parent} does not exist")
        if not append:
            self.path.write_text("")  # truncate, then append: a wrapped command appends to the same file
        self._f = self.path.open("a")  # O_APPEND: every line lands at the end, whoever writes it
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=_json_default, allow_nan=False)
        with self._lock:
            if not self._f.closed:
                self._f.write(line + "\n")
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} to a trace")


def check_number(key: str, value: Any) -> float | int:
    """Job metrics must be finite numbers; anything else is the caller's bug, said plainly."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(f"Monitor.record({key}={value!r}): metrics must be finite numbers")
    return value
