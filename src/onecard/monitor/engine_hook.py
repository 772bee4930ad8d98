"""Engine metrics into a ``Monitor`` and the guard's engine back-off, without changing the engine.

    mon = Monitor(log="serve.jsonl", guard=ThermalGuard(target=engine_backoff(engine)))
    unwatch = watch_engine(mon, engine)   # every engine.step() now records its numbers

Per step: ``tokens`` (generated this step), ``step_time``, ``batch_size``
(sequences run), ``kv_use`` (0..1 of KV blocks) and, for a decode step,
``itl`` (inter-token latency = the step time every running sequence waited).
Per finished request: ``ttft`` and ``latency`` (arrival to last token).
Works with anything shaped like ``onecard.engine.LLMEngine``: ``step()``,
``stats()``, ``scheduler.max_num_seqs``, outputs with ``finished`` and ``metrics``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from onecard.monitor.guard import HalveSetting
from onecard.monitor.monitor import Monitor


def watch_engine(mon: Monitor, engine: Any) -> Callable[[], None]:
    """Wrap ``engine.step`` to record per-step and per-request metrics; returns a function that unwraps it."""
    orig = engine.step
    seen = [int(engine.stats().get("num_generated_tokens", 0))]

    def step(*args: Any, **kwargs: Any) -> Any:
        t0, wall0 = time.perf_counter(), time.time()
        outs = orig(*args, **kwargs)
        dt = time.perf_counter() - t0
        st = engine.stats()
        gen = int(st.get("num_generated_tokens", seen[0]))
        tokens, seen[0] = gen - seen[0], gen
        if tokens:
            m: dict[str, float] = {"tokens": tokens, "step_time": dt, "batch_size": tokens}
            if st.get("kv_usage") is not None:
                m["kv_use"] = st["kv_usage"]
            # a step that produced exactly one token per request advanced already-started sequences: decode
            if outs and all((o.metrics.get("first_token_time") or wall0) < wall0 for o in outs):
                m["itl"] = dt
            mon.record(**m)
        for o in outs:
            met = getattr(o, "metrics", {}) or {}
            if o.finished and met.get("arrival_time") and met.get("first_token_time") and met.get("finished_time"):
                mon.record(ttft=met["first_token_time"] - met["arrival_time"],
                           latency=met["finished_time"] - met["arrival_time"])
        return outs

    engine.step = step

    def unwatch() -> None:
        engine.step = orig

    return unwatch


def engine_backoff(engine: Any) -> HalveSetting:
    """The guard's back-off for the engine: halve ``max_num_seqs`` per level (fewer sequences = less power), restore later."""
    sched = engine.scheduler
    return HalveSetting("max_num_seqs", lambda: sched.max_num_seqs, lambda v: setattr(sched, "max_num_seqs", v))
