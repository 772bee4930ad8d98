"""``Monitor``: the background sampler plus the job's own metrics, in one trace.

    with Monitor(interval=1.0, log="run.jsonl") as mon:
        for step in ...:
            ...
            mon.record(tokens=n, step_time=dt)
    print(mon.summary())

A daemon thread reads NVML (all GPUs, or ``gpus=[...]``), this process's
torch allocator and its CPU/RSS every ``interval`` seconds, feeds each sample
to an optional ``ThermalGuard`` and appends everything to the JSONL trace.
``record`` is cheap (a dict and a line write) and safe from any thread.

Inside ``onecard monitor run -- CMD``, the wrapped command's own
``Monitor()`` finds ``ONECARD_MONITOR_TRACE`` in its environment and appends
its records and allocator samples to the parent's trace, leaving NVML to the
parent, so GPU samples and job metrics land on one time line.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from onecard.errors import BadInputError
from onecard.monitor.allocator import allocator_stats
from onecard.monitor.guard import ThermalGuard
from onecard.monitor.host import ProcessStats
from onecard.monitor.nvml import GPUSample, open_nvml
from onecard.monitor.trace import Sample, Trace, TraceWriter, check_number

log = logging.getLogger(__name__)
TRACE_ENV = "ONECARD_MONITOR_TRACE"


class GPUReader(Protocol):
    """Anything that returns the GPUs' current state: ``NvmlReader``, ``ReplayReader``, a test fake."""

    def read(self) -> list[GPUSample]: ...
    def close(self) -> None: ...


class Monitor:
    def __init__(self, interval: float = 1.0, log: str | Path | None = None, gpus: list[int] | None = None,
                 reader: GPUReader | None = None, guard: ThermalGuard | None = None, allocator: bool = True,
                 pid: int | None = None, pcie: bool = True, history: int = 3600, command: str | None = None,
                 attach: bool = True) -> None:
        if not interval > 0:
            raise BadInputError(f"monitor interval must be > 0 seconds, got {interval}")
        self.interval, self.guard, self.allocator = interval, guard, allocator
        child_log = os.environ.get(TRACE_ENV) if attach and log is None and reader is None else None
        self.child = child_log is not None  # inside 'onecard monitor run': the parent samples the GPUs
        self.no_gpu = ""
        if reader is not None:
            self.reader: GPUReader | None = reader
        elif self.child:
            self.reader = None
            self.no_gpu = "sampled by the parent 'onecard monitor run'"
        else:
            self.reader, self.no_gpu = open_nvml(gpus, pcie=pcie)
        self.proc = ProcessStats(pid)
        self.command = command
        self.samples: deque[Sample] = deque(maxlen=history)
        self.records: deque[dict[str, Any]] = deque(maxlen=max(history, 100_000))
        self.guard_events: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.exit_code: int | None = None
        path = child_log or log
        self.writer = TraceWriter(path, append=self.child) if path else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> "Monitor":
        if self._thread is not None:
            return self
        if self._stop.is_set():
            raise BadInputError("this Monitor has been stopped; create a new Monitor for another run")
        first = self.reader.read() if self.reader else []
        self.meta = {"kind": "meta", "ts": time.time(), "interval": self.interval, "host": socket.gethostname(),
                     "pid": os.getpid(), "command": self.command, "gpus": [g.name for g in first],
                     "no_gpu": self.no_gpu if not first else "", "child": self.child}
        if not self.child:  # the parent's meta line describes the run; a child only adds lines
            self._emit(self.meta)
        self._thread = threading.Thread(target=self._loop, name="onecard-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, exit_code: int | None = None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample_now()  # the last state, so short runs still have an end point
        if exit_code is not None:
            self.exit_code = exit_code
            self._emit({"kind": "exit", "ts": time.time(), "returncode": exit_code})
        if self.reader:
            self.reader.close()
        if self.writer:
            self.writer.close()

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- sampling ----------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self.sample_now()
            except Exception:  # a sampler must not kill the job; the error is logged, sampling continues
                log.exception("monitor sample failed")
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - t0)))

    def sample_now(self) -> Sample | None:
        """Take one sample (the thread calls this; tests and replay may too); None when a child has nothing to add."""
        t0 = time.perf_counter()
        gpus = self.reader.read() if self.reader else []
        recorded = getattr(self.reader, "current", None)  # replay: keep the recorded process/allocator state
        if recorded is not None:
            s = Sample(ts=recorded.ts, gpus=gpus, allocator=recorded.allocator, proc=recorded.proc, cost_s=recorded.cost_s)
        else:
            alloc = allocator_stats() if self.allocator else None
            if self.child and alloc is None:
                return None  # the parent already samples GPUs and this process; nothing to add
            s = Sample(ts=time.time(), gpus=gpus, allocator=alloc,
                       proc=None if self.child else self.proc.read(), cost_s=time.perf_counter() - t0)
        with self._lock:
            self.samples.append(s)
        self._emit(s.to_event())
        if self.guard is not None and gpus:
            for a in self.guard.observe(s.ts, gpus):
                e = {"kind": "guard", "ts": a.t, **{k: v for k, v in a.to_dict().items() if k != "t"}}
                self.guard_events.append(e)
                self._emit(e)
        return s

    def _emit(self, event: dict[str, Any]) -> None:
        if self.writer:
            self.writer.write(event)

    # -- job metrics -------------------------------------------------------------------------------------------------
    def record(self, **metrics: Any) -> None:
        """Job metrics at this moment, e.g. ``tokens=`` (generated/processed since the last record),
        ``latency=`` / ``ttft=`` / ``itl=`` (seconds), ``step_time=`` (s), ``batch_size=``, ``kv_use=`` (0..1), ``loss=``."""
        if not metrics:
            raise BadInputError("Monitor.record() needs at least one metric, e.g. record(tokens=128, step_time=0.2)")
        e = {"kind": "record", "ts": time.time(), **{k: check_number(k, v) for k, v in metrics.items()}}
        with self._lock:
            self.records.append(e)
        self._emit(e)

    # -- results -----------------------------------------------------------------------------------------------------
    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def trace(self) -> Trace:
        with self._lock:
            return Trace(meta=dict(self.meta), samples=list(self.samples), records=list(self.records),
                         guard=list(self.guard_events), exit_code=self.exit_code)

    def summary(self) -> dict[str, Any]:
        from onecard.monitor.report import summarize

        return summarize(self.trace())
