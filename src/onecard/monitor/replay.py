"""Replay a recorded trace through the live code path (sampler, guard, panel, report).

``ReplayReader`` stands in for ``NvmlReader``: each ``read()`` returns the next
recorded GPU sample and exposes the whole recorded sample as ``current``, so a
``Monitor(reader=ReplayReader(trace))`` runs the very same guard and trace
writer as a live run. ``synthetic_trace`` writes traces with chosen
temperature / throttle / throughput profiles for tests and docs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from onecard.errors import BadInputError
from onecard.monitor.guard import ThermalGuard
from onecard.monitor.nvml import GPUSample
from onecard.monitor.trace import Sample, Trace, load_trace


class ReplayReader:
    """Recorded GPU samples, one per ``read()``. ``realtime=True`` stamps them with the current time
    (for the live panel); otherwise ``current`` is the recorded sample (for guard/report replay)."""

    def __init__(self, trace: Trace | str | Path, loop: bool = False, realtime: bool = False) -> None:
        self.trace = trace if isinstance(trace, Trace) else load_trace(trace)
        self.samples = [s for s in self.trace.samples if s.gpus]
        if not self.samples:
            raise BadInputError("trace has no GPU samples to replay (it was recorded on a machine without a GPU)")
        self.loop, self.realtime = loop, realtime
        self.pos = 0
        self.current: Sample | None = None  # the recorded sample last read (None in realtime mode)

    @property
    def done(self) -> bool:
        return not self.loop and self.pos >= len(self.samples)

    def read(self) -> list[GPUSample]:
        if self.done:
            return []
        s = self.samples[self.pos % len(self.samples)]
        self.pos += 1
        self.current = None if self.realtime else s
        return s.gpus

    def close(self) -> None:
        pass


def replay_monitor(trace: Trace | str | Path, guard: ThermalGuard | None = None, log: str | Path | None = None):
    """Run every recorded GPU sample through a ``Monitor`` (guard + writer), synchronously; returns the Monitor."""
    from onecard.monitor.monitor import Monitor

    reader = ReplayReader(trace)
    mon = Monitor(reader=reader, guard=guard, log=log, allocator=False)
    mon.meta = {"kind": "meta", "ts": reader.samples[0].ts, "interval": reader.trace.meta.get("interval"),
                "command": f"replay of {reader.trace.meta.get('command')}", "gpus": [g.name for g in reader.samples[0].gpus]}
    mon._emit(mon.meta)
    while not reader.done:
        mon.sample_now()
    for r in reader.trace.records:
        mon.records.append(r)
        mon._emit(r)
    if reader.trace.exit_code is not None:
        mon.exit_code = reader.trace.exit_code
        mon._emit({"kind": "exit", "ts": reader.samples[-1].ts, "returncode": mon.exit_code})
    if mon.writer:
        mon.writer.close()
    return mon


def synthetic_trace(path: str | Path, seconds: float = 120.0, interval: float = 1.0, start: float = 1.7e9,
                    temp: Callable[[float], float] = lambda t: 70.0,
                    throttle: Callable[[float], int] = lambda t: 0,
                    util: Callable[[float], float] = lambda t: 95.0,
                    tokens_per_s: Callable[[float], float] | None = lambda t: 1000.0,
                    name: str = "NVIDIA GeForce RTX 4090", power_limit_w: float = 450.0,
                    exit_code: int | None = 0) -> Path:
    """Write a one-GPU trace whose temperature, throttle mask, utilisation and throughput follow the given
    functions of time (seconds from start). Power and clocks follow utilisation and throttling plausibly."""
    if seconds <= 0 or interval <= 0:
        raise BadInputError("synthetic_trace needs seconds > 0 and interval > 0")
    p = Path(path)
    lines = [{"kind": "meta", "ts": start, "interval": interval, "command": "synthetic", "host": "synthetic",
              "gpus": [name], "no_gpu": ""}]
    n = int(seconds / interval)
    for i in range(n + 1):
        t = i * interval
        mask, u = throttle(t), util(t)
        slowed = bool(mask & 0xEC)  # power cap / HW / thermal / brake bits
        g = GPUSample(index=0, name=name, uuid="GPU-synthetic-0", util_gpu=u, util_mem=u * 0.6,
                      mem_used_mib=18000.0, mem_total_mib=24564.0, temp_c=temp(t), mem_temp_c=None,
                      power_w=power_limit_w * (0.98 if slowed else 0.2 + 0.75 * u / 100), power_limit_w=power_limit_w,
                      sm_clock_mhz=2100.0 if slowed else 2700.0, mem_clock_mhz=10501.0, fan_pct=min(100.0, temp(t)),
                      throttle=mask, pcie_tx_kbs=1000.0, pcie_rx_kbs=2000.0,
                      processes=[{"pid": 4242, "used_mib": 17500.0}])
        lines.append({"kind": "sample", "ts": start + t, "gpus": [g.to_dict()], "allocator": None,
                      "proc": {"pid": 4242, "cpu_pct": 100.0, "rss_mib": 3000.0}, "cost_s": 0.002})
        if tokens_per_s is not None and i:
            tok = tokens_per_s(t) * interval
            lines.append({"kind": "record", "ts": start + t, "tokens": tok,
                          "step_time": interval, "latency": 0.02 * (1.3 if slowed else 1.0)})
    if exit_code is not None:
        lines.append({"kind": "exit", "ts": start + n * interval, "returncode": exit_code})
    p.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return p
