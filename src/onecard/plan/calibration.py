"""Efficiency factors the roofline needs, read from onecard's own measurements when they exist.

A roofline says what the card could do; what onecard reaches is a measured
fraction of it. Benchmarks write these keys into ``docs/results/*.json``:

- ``decode_roofline_fraction_<format>`` (``_bf16``, ``_int8``, ``_int4``): engine bs=1 decode with weights in
  that format, achieved bytes/s over peak bandwidth (int4 kernels reach a different fraction than bf16 GEMV);
- ``decode_roofline_fraction``: the same over all formats (used for a format not measured on its own);
- ``train_mfu``: training model-FLOP utilisation (dense bf16);
- ``cuda_context_gib``: memory the CUDA context takes outside torch's allocator.

When no file has a key, a stated default is used and the plan says so; a
caller's own value (``plan_inference(decode_efficiency=...)``) overrides both.
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
DECODE_FORMATS = ("fp32", "bf16", "int8", "int4")
MEASURED_KEYS = tuple(DEFAULTS) + tuple(f"decode_roofline_fraction_{f}" for f in DECODE_FORMATS)
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
        for key in MEASURED_KEYS:
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


def decode_efficiency(fmt: str, override: float | None = None, results_dir: str | Path | None = None) -> Factor:
    """bs=1 decode fraction of the roofline for weights in ``fmt``: the caller's value, else measured for that
    format, else measured over all formats, else the stated default."""
    if override is not None:
        return Factor(float(override), "given")
    measured = _scan(str(results_dir or RESULTS_DIR))
    key = f"decode_roofline_fraction_{fmt}"
    if key in measured:
        return measured[key]
    general = factor("decode_roofline_fraction", results_dir)
    if general.source.startswith("measured"):
        return Factor(general.value, f"{general.source}; all formats, {fmt} not measured on its own")
    return general
