"""Efficiency factors the roofline needs, read from onecard's own measurements when they exist.

A roofline says what the card could do; what onecard reaches is a measured
fraction of it. Benchmarks write these keys into ``docs/results/*.json``:

- ``decode_roofline_fraction``: engine bs=1 decode, achieved bytes/s over peak bandwidth;
- ``train_mfu``: training model-FLOP utilisation (dense bf16);
- ``cuda_context_gib``: memory the CUDA context takes outside torch's allocator.

When no file has a key, a stated default is used and the plan says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from onecard.bench.results import RESULTS_DIR

log = logging.getLogger(__name__)

# Defaults, each with its basis (used only when onecard has not measured the figure yet).
DEFAULTS = {
    "decode_roofline_fraction": (0.70, "default 0.70 (gpt-fast-class bs=1 decode; not measured by onecard yet)"),
    "train_mfu": (0.35, "default 0.35 (HF Trainer + PEFT class MFU; not measured by onecard yet)"),
    "cuda_context_gib": (0.50, "default 0.50 GiB (CUDA 12 lazy-loading context; not measured by onecard yet)"),
}
# Pinned host->device copies reach about 80% of the link's theoretical rate.
HOST_LINK_EFFICIENCY = 0.8


@dataclass(frozen=True)
class Factor:
    value: float
    source: str


@lru_cache(maxsize=8)
def _scan(results_dir: str) -> dict[str, Factor]:
    found: dict[str, tuple[str, Factor]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("skipping unreadable result file %s", path)
            continue
        if not isinstance(data, dict):
            continue
        for key in DEFAULTS:
            value = data.get(key)
            if isinstance(value, (int, float)) and value > 0:
                date = str(data.get("date", ""))
                if key not in found or date > found[key][0]:  # newest measurement wins
                    found[key] = (date, Factor(float(value), f"measured: {path.name} ({data.get('gpu', '?')}, {date or 'undated'})"))
    return {k: f for k, (_, f) in found.items()}


def factor(key: str, results_dir: str | Path | None = None) -> Factor:
    """The measured value of ``key`` from docs/results, else its stated default."""
    measured = _scan(str(results_dir or RESULTS_DIR))
    if key in measured:
        return measured[key]
    value, why = DEFAULTS[key]
    return Factor(value, why)
