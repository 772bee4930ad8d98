"""Zeroed int32 counters for kernels that finish a reduction in one launch.

Why: a split reduction (split-K matmul, flash-decoding) normally needs a second kernel to merge its partials, and
in a captured decode step each extra launch costs about as much as the work it does. Instead every program stores
its partial, bumps its unit's counter (acquire-release), and the program that sees the last count merges and sets
the counter back to zero. So the counters must start at zero once, which is this module's job, and every launch
leaves them at zero again; launches on one stream run one after another, so one buffer per (owner, device) serves
them all.
"""

from __future__ import annotations

import torch

MAX_COUNTERS = 1 << 16
_buffers: dict[tuple[str, torch.device], torch.Tensor] = {}


def zeroed_counters(device: torch.device, units: int, owner: str) -> torch.Tensor:
    """The per-(owner, device) counters, at least ``units`` of them, all zero between launches.

    Allocated on first use, which must not be inside a CUDA-graph capture (the engine and the benchmarks run every
    shape once before capturing)."""
    if units > MAX_COUNTERS:
        raise ValueError(f"{owner}: {units} reduction units exceed the {MAX_COUNTERS} counters")
    key = (owner, torch.device(device))
    if key not in _buffers:
        if key[1].type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner}'s reduction counters are allocated on the first call, which cannot be inside "
                               "a CUDA-graph capture: run the model once before capturing")
        _buffers[key] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _buffers[key]
