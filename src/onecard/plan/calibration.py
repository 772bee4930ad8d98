"""Efficiency factors the roofline needs, read from onecard's own measurements when they exist.

A roofline says what the card could do; what onecard reaches is a measured
fraction of it. Benchmarks write these keys into ``docs/results/*.json``:

- ``train_mfu``: training model-FLOP utilisation (dense bf16);
- ``cuda_context_gib``: memory the CUDA context takes outside torch's allocator.

When no file has a key, a stated default is used and the plan says so.

The planner reads these files from ``measurements.json`` beside this module, a copy of the ones it uses, so that
an install without this repository's ``docs/`` (``pip install`` of a wheel or a git URL) plans as a checkout
does. ``write_packaged()`` rewrites it from ``docs/results``; ``tests/test_plan_speed.py`` fails while it
differs.

bs=1 decode speed is not one factor: ``decode_calibration`` fits
``onecard.plan.decode_fit``'s step-time model (bandwidth efficiency per weight
format + per-layer + per-step latency) to every engine bs=1 measurement in
``docs/results`` (full-size and 8-layer runs together: the depths separate the
latencies from the efficiency). A caller's own efficiency
(``plan_inference(decode_efficiency=...)``) replaces the fitted one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from onecard.bench.results import RESULTS_DIR
from onecard.errors import BadInputError
from onecard.plan.decode_fit import (DecodeModel, batch_observations_from_results, fit_batch_factors, fit_decode_model,
                                     observations_from_results)

log = logging.getLogger(__name__)

# Defaults, each with its basis (used only when onecard has not measured the figure yet).
DEFAULTS = {
    "train_mfu": (0.35, "default 0.35 (HF Trainer + PEFT class MFU; not measured by onecard yet)"),
    "cuda_context_gib": (0.50, "default 0.50 GiB (CUDA 12 lazy-loading context; not measured by onecard yet)"),
}
MEASURED_KEYS = tuple(DEFAULTS)
# Without any decode measurement: gpt-fast-class bs=1 decode reaches about 70 % of the bandwidth roofline.
DEFAULT_DECODE_EFFICIENCY = 0.70
# Pinned host->device copies reach about 80% of the link's theoretical rate.
HOST_LINK_EFFICIENCY = 0.8
PACKAGED = Path(__file__).with_name("measurements.json")


@dataclass(frozen=True)
class Factor:
    value: float
    source: str


def load_results(results_dir: str | Path) -> dict[str, dict]:
    """{file name: parsed JSON object} for every readable ``*.json`` in ``results_dir``."""
    out = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("skipping unreadable result file %s", path)
            continue
        if isinstance(data, dict):
            out[path.name] = data
    return out


def _measured(data: dict, key: str) -> bool:
    value = data.get(key)
    return isinstance(value, (int, float)) and value > 0


def planner_results(results: dict[str, dict]) -> dict[str, dict]:
    """The files among ``results`` that the planner reads: those with a measured factor or a decode observation."""
    return {name: data for name, data in results.items()
            if any(_measured(data, key) for key in MEASURED_KEYS) or observations_from_results({name: data})
            or batch_observations_from_results({name: data})}


def measurements(results_dir: str | Path | None = None) -> dict[str, dict]:
    """{file name: JSON} the planner calibrates on: ``results_dir``'s files, else the copy packaged with onecard."""
    if results_dir is not None:
        return planner_results(load_results(results_dir))
    return json.loads(PACKAGED.read_text()) if PACKAGED.exists() else {}


def write_packaged(results_dir: str | Path = RESULTS_DIR) -> Path:
    """Refresh the packaged copy from ``results_dir`` (after committing new benchmark results)."""
    PACKAGED.write_text(json.dumps(measurements(results_dir), indent=1, sort_keys=True) + "\n")
    return PACKAGED


@lru_cache(maxsize=8)
def _scan(results_dir: str | None) -> dict[str, Factor]:
    found: dict[str, tuple[str, Factor]] = {}
    for name, data in measurements(results_dir).items():
        for key in MEASURED_KEYS:
            if _measured(data, key):
                date = str(data.get("date", ""))
                if key not in found or date > found[key][0]:  # newest measurement wins
                    found[key] = (date, Factor(float(data[key]),
                                               f"measured: {name} ({data.get('gpu', '?')}, {date or 'undated'})"))
    return {k: f for k, (_, f) in found.items()}


def factor(key: str, results_dir: str | Path | None = None) -> Factor:
    """The measured value of ``key`` (the packaged measurements, or ``results_dir``'s), else its stated default."""
    measured = _scan(str(results_dir) if results_dir else None)
    if key in measured:
        return measured[key]
    value, why = DEFAULTS[key]
    return Factor(value, why)


@dataclass(frozen=True)
class DecodeCalibration:
    """What ``speed.decode_tok_s`` needs for one weight format: the step-time model and this format's efficiency."""

    model: DecodeModel
    efficiency: float  # the format's linears (the model's own, or the caller's)
    source: str


@lru_cache(maxsize=8)
def decode_model(results_dir: str | None = None) -> DecodeModel | None:
    """The step-time model fitted to every bs=1 decode measurement (the packaged ones, or ``results_dir``'s; None:
    too few to fit), with the batch factors of every batched one."""
    results = measurements(results_dir)
    try:
        model = fit_decode_model(observations_from_results(results))
    except BadInputError as e:
        log.info("decode model not fitted (%s); using the stated default efficiency", e)
        return None
    return replace(model, batch_factors=fit_batch_factors(model, batch_observations_from_results(results)))


def decode_calibration(fmt: str, override: float | None = None, results_dir: str | Path | None = None) -> DecodeCalibration:
    """The fitted decode model for weights in ``fmt``; ``override`` replaces the format's efficiency (the 16-bit
    weights and the KV cache keep bf16's, the latencies stay fitted); with no measurements, the stated default
    efficiency and no latency terms."""
    model = decode_model(str(results_dir) if results_dir else None)
    if model is None:
        model = DecodeModel({"bf16": DEFAULT_DECODE_EFFICIENCY}, 0.0, 0.0, 0, ())
        source = f"default {DEFAULT_DECODE_EFFICIENCY:.2f} of the bandwidth roofline (no onecard decode measurements)"
    else:
        source = model.describe() + ("" if fmt in model.efficiency else f"; {fmt} not measured, read like bf16")
    if override is not None:
        model = replace(model, efficiency={**model.efficiency, fmt: float(override)})
        source = f"given efficiency; latencies {source}"
    return DecodeCalibration(model, model.efficiency_for(fmt), source)
