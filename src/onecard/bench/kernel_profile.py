"""Where a run's device time goes: torch.profiler's kernels (or CPU ops), summed per name and per kind.

The profiling benchmarks (``benchmarks/quant_decode_profile.py``, ``benchmarks/train_vs_hf.py --part profile``)
read their breakdowns and bounds from these, so that a claim such as "matmuls and attention already take X ms of
a step" is a committed measurement, not a one-off trace.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MatmulCall:
    """One matmul op as the profiler saw it: its name, its operands' shapes and the device (or CPU) µs it launched."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    us: float


MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm"})
# the same ops as a ``by_kind`` pattern (whole names), so that a kind of them sums what ``matmul_calls`` lists
MATMUL_OPS_PATTERN = "|".join(f"^{re.escape(op)}$" for op in sorted(MATMUL_OPS))


def profile_events(fn: Callable[[], object], record_shapes: bool = False):
    """``fn()`` under torch.profiler (CUDA kernels too where CUDA runs), synchronized; returns the events."""
    cuda = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts, record_shapes=record_shapes) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.events()


def _on_device(events) -> bool:
    return any(e.device_type == torch.autograd.DeviceType.CUDA for e in events)


def time_per_name(events) -> Counter:
    """µs per kernel name (CUDA kernels' device time), or per CPU op's self time where no kernel ran (the CPU
    smoke runs): self time, so that nested ops are not counted twice."""
    out: Counter = Counter()
    if _on_device(events):
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out[e.name] += e.device_time_total
    else:
        for e in events:
            out[e.name] += e.self_cpu_time_total
    return out


def matmul_calls(events) -> list[MatmulCall]:
    """Every matmul op (``MATMUL_OPS``) with its operand shapes (needs ``record_shapes``) and the time of the
    kernels it launched itself (CPU self time where no kernel ran)."""
    device = _on_device(events)
    calls = []
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or e.name not in MATMUL_OPS:
            continue
        shapes = tuple(tuple(s) for s in (e.input_shapes or ()) if s)
        calls.append(MatmulCall(e.name, shapes, e.self_device_time_total if device else e.self_cpu_time_total))
    return calls


def by_kind(per_name: dict[str, float], kinds: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Sum ``per_name`` into kinds: each name goes to the first kind whose regex it matches (case-insensitive);
    names matching none go to ``"other"``. Every kind is present, zero where nothing matched."""
    kinds = [(k, re.compile(p, re.I)) for k, p in kinds]
    out = dict.fromkeys(kind_names(kinds), 0.0)
    for name, us in per_name.items():
        out[next((k for k, rx in kinds if rx.search(name)), "other")] += us
    return out


def kind_names(kinds: Iterable[tuple[str, object]]) -> tuple[str, ...]:
    """The keys ``by_kind`` returns for ``kinds``, in its order: each kind, then ``"other"``."""
    return (*(k for k, _ in kinds), "other")


def minus(a: Counter, b: Counter, scale: float = 1.0) -> dict[str, float]:
    """``(a - b) * scale`` per name, keeping names only ``a`` has: a long run minus a short one, per step."""
    return {name: (us - b.get(name, 0.0)) * scale for name, us in a.items()}
