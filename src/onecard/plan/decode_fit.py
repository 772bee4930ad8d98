"""bs=1 decode step time as physics plus three fitted constants, fitted to onecard's own measurements.

One decode step reads every weight once (and the KV cache written so far), and
launches the same chain of kernels per layer whatever the model's width. So

    step_s = quantized_linear_bytes / (bandwidth x efficiency[fmt])
           + (16-bit bytes + KV bytes) / (bandwidth x efficiency[bf16])
           + layers x per_layer_s + per_step_s

``efficiency`` is the fraction of the card's bandwidth a format's kernels
stream at (bf16 GEMV; int8/int4 dequantizing kernels), ``per_layer_s`` the
fixed latency of one layer's kernels (launch gaps, small norms/RoPE/attention
kernels, GEMV tails) and ``per_step_s`` what a step costs besides the layers
(scheduling, sampling, the graph replay's own overhead). A pure bandwidth
model puts all of that into the efficiency, which then depends on the depth
of the model it was measured on (8-layer models looked 40 % efficient, 32-layer
ones 70 %). The step time is linear in (1/efficiency, per_layer_s, per_step_s), so
the constants are a least-squares fit over measured runs of different depths,
widths, formats and cards (``fit_decode_model``); ``observations_from_results``
reads those runs from the benchmark JSONs in ``docs/results``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from onecard.errors import BadInputError
from onecard.plan import memory as M
from onecard.plan.spec import ModelSpec

log = logging.getLogger(__name__)

# Weight formats whose decoder-layer linears have their own efficiency; everything else reads like bf16.
FITTED_FORMATS = ("bf16", "int8", "int4")
# Physical bounds of the fit: no kernel streams faster than the card's bandwidth; latencies are not negative.
MAX_EFFICIENCY = 1.0
# Folder name of a benchmark model made by onecard.testing.make_random_checkpoint: random-<arch>-<size>-<dtype>-...
# ``random-`` (random_checkpoint) or ``random-fast-`` (fast_random_checkpoint, drawn on the GPU) folders.
_RANDOM_FOLDER = re.compile(r"random-(?:fast-)?(?P<arch>[a-z0-9.\-]+?)-(?P<size>full|small|tiny)-(?:bfloat16|float16|float32)-")


@dataclass(frozen=True)
class StepBytes:
    """Bytes one bs=1 decode step reads, split by which kernels read them."""

    quantized: int  # decoder-layer linears in a quantized format (0 for bf16/fp32: they are counted as 16-bit)
    plain: int  # 16-bit weights (all of them for bf16), the LM head, norms, biases, and the KV cache read
    layers: int


def step_bytes(spec: ModelSpec, fmt: str, context: int, kv_bytes_per_token: int, batch: int = 1) -> StepBytes:
    """What a decode step of ``batch`` sequences at ``context`` tokens reads: every weight once (one embedding row,
    no vision tower), plus each sequence's KV cache."""
    skip = {"vision tower", "projector"} | (set() if spec.args.tie_word_embeddings else {"embed_tokens"})
    linears = {name for name, _, _ in spec.linear_shapes()}
    quant = plain = 0
    for name, nbytes, count in M.weight_tensors(spec, fmt):
        if name in skip:
            continue
        if fmt in FITTED_FORMATS[1:] and name.split(".")[0] in linears:
            quant += nbytes * count
        else:
            plain += nbytes * count
    return StepBytes(quant, plain + batch * context * kv_bytes_per_token, spec.args.num_layers)


@dataclass(frozen=True)
class DecodeObservation:
    """One measured bs=1 decode speed, reduced to what the step-time model needs."""

    source: str  # result file
    group: str  # the run it belongs to (repeats of one run share it; leave-one-out leaves a whole group out)
    card: str  # catalog key
    bandwidth_gbs: float
    fmt: str
    bytes: StepBytes
    tok_s: float


@dataclass(frozen=True)
class DecodeModel:
    """Fitted constants; ``efficiency`` holds the formats the fit saw (others read like bf16)."""

    efficiency: dict[str, float]
    per_layer_s: float
    per_step_s: float
    observations: int
    sources: tuple[str, ...]

    def efficiency_for(self, fmt: str) -> float:
        return self.efficiency.get(fmt, self.efficiency["bf16"])

    def step_seconds(self, b: StepBytes, bandwidth_gbs: float, fmt: str) -> float:
        bw = bandwidth_gbs * 1e9
        return self.memory_seconds(b, bw, fmt) + b.layers * self.per_layer_s + self.per_step_s

    def memory_seconds(self, b: StepBytes, bandwidth_bytes_s: float, fmt: str) -> float:
        return b.quantized / (bandwidth_bytes_s * self.efficiency_for(fmt)) + \
            b.plain / (bandwidth_bytes_s * self.efficiency["bf16"])

    def describe(self) -> str:
        return (f"fitted to {self.observations} measured bs=1 speeds ({', '.join(self.sources)}): "
                f"+{self.per_layer_s * 1e6:.0f} us per layer, +{self.per_step_s * 1e6:.0f} us per step")


def lower_bounded_lstsq(a: np.ndarray, b: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= lower, by active set: solve, pin the variable furthest below its bound
    to the bound, solve for the rest, until none is below. (5 unknowns here; exact for this problem size.)"""
    x = lower.astype(float).copy()
    free = np.ones(a.shape[1], dtype=bool)
    while free.any():
        sol, *_ = np.linalg.lstsq(a[:, free], b - a[:, ~free] @ x[~free], rcond=None)
        below = sol - lower[free]
        if (below >= -1e-12).all():
            x[free] = sol
            return x
        worst = np.flatnonzero(free)[int(np.argmin(below))]
        free[worst] = False
        x[worst] = lower[worst]
    return x


def fit_decode_model(observations: list[DecodeObservation]) -> DecodeModel:
    """Least-squares fit of (1/efficiency per format, per_layer_s, per_step_s) to measured step times, each row
    weighted by 1/its time (relative error), with efficiency <= 1 and latencies >= 0.

    Needs bf16 observations (the 16-bit bytes of every format read at bf16's rate) and at least two model depths
    to separate per-layer from per-step cost; a format without observations is left out (it reads like bf16).
    """
    formats = [f for f in FITTED_FORMATS if any(o.fmt == f for o in observations)]
    if "bf16" not in formats:
        raise BadInputError("fitting the decode model needs bf16 decode measurements; run benchmarks/plan_accuracy.py")
    if len({o.bytes.layers for o in observations}) < 2:
        raise BadInputError("fitting the decode model needs runs of at least two model depths (e.g. 8 and 32 layers)")
    rows, times = [], []
    for o in observations:
        bw = o.bandwidth_gbs * 1e9
        row = [0.0] * (len(formats) + 2)
        row[0] = o.bytes.plain / bw
        if o.fmt in formats[1:]:
            row[formats.index(o.fmt)] = o.bytes.quantized / bw
        row[-2], row[-1] = o.bytes.layers, 1.0
        rows.append(row)
        times.append(1.0 / o.tok_s)
    t = np.array(times)
    a = np.array(rows) / t[:, None]
    lower = np.array([1.0 / MAX_EFFICIENCY] * len(formats) + [0.0, 0.0])
    x = lower_bounded_lstsq(a, np.ones(len(t)), lower)
    return DecodeModel(efficiency={f: float(1.0 / x[i]) for i, f in enumerate(formats)}, per_layer_s=float(x[-2]),
                       per_step_s=float(x[-1]), observations=len(observations),
                       sources=tuple(sorted({o.source for o in observations})))


def leave_one_out(observations: list[DecodeObservation]) -> list[tuple[DecodeObservation, float]]:
    """(observation, predicted tok/s) with the model fitted without the observation's whole group."""
    out = []
    for g in sorted({o.group for o in observations}):
        rest = [o for o in observations if o.group != g]
        model = fit_decode_model(rest)
        out += [(o, 1.0 / model.step_seconds(o.bytes, o.bandwidth_gbs, o.fmt)) for o in observations if o.group == g]
    return out


def _spec(arch: str, size: str = "full", layers: int | None = None) -> ModelSpec:
    from onecard.models import arch_config, scale_config
    from onecard.plan.spec import spec_from_config

    cfg = scale_config(arch_config(arch), size)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    cfg.pop("_onecard_source", None)
    return spec_from_config(cfg, arch)


def _card(name: str):
    from onecard.hardware import find_gpu

    try:
        return find_gpu(name)
    except BadInputError:
        return None


def _observation(source: str, group: str, card, arch: str, size: str, layers: int | None, fmt: str, context: int,
                 tok_s: float) -> DecodeObservation:
    spec = _spec(arch, size, layers)
    b = step_bytes(spec, fmt, context, M.kv_bytes_per_token(spec))
    return DecodeObservation(source, group, card.key, card.bandwidth_gbs, fmt, b, float(tok_s))


def observations_from_results(results: dict[str, dict]) -> list[DecodeObservation]:
    """Engine bs=1 decode measurements in benchmark result files ({file name: parsed JSON}).

    Reads ``benchmarks/plan_accuracy.py`` rows (``measured_decode_tok_s`` per architecture x layers x format),
    ``benchmarks/engine_vs_hf.py`` (``engine_bs1_tok_s``) and ``benchmarks/quant_decode.py``
    (``<format>_bs1_tok_s``); the last two name their model by its random-checkpoint folder. Runs on a card
    outside the catalog, or on a model this cannot rebuild, are skipped (logged).
    """
    out: list[DecodeObservation] = []
    for name, data in sorted(results.items()):
        if not isinstance(data, dict) or data.get("device", "cuda") != "cuda":
            continue
        card = _card(str(data.get("gpu", "")))
        if card is None:
            if any(k.endswith("bs1_tok_s") for k in data) or "configs" in data:
                log.info("decode fit: skipping %s (card %r not in the catalog)", name, data.get("gpu"))
            continue
        for r in data.get("configs") or []:
            if isinstance(r, dict) and r.get("measured_decode_tok_s") and r.get("weight_format") in FITTED_FORMATS:
                # Rows written before decode_context was recorded leave the KV read out (< 1 % of an 8-layer step).
                out.append(_observation(name, f"{name}:{r['arch']}:{r['layers']}:{r['weight_format']}", card, r["arch"],
                                        "full", int(r["layers"]), r["weight_format"], int(r.get("decode_context", 0)),
                                        r["measured_decode_tok_s"]))
        m = _RANDOM_FOLDER.search(str(data.get("model", "")))
        runs: list[tuple[str, float, int]] = []
        if data.get("engine_bs1_tok_s") and data.get("config_dtype") == "bfloat16":
            ctx = int(data.get("config_decode_prompt_len", 0)) + int(data.get("config_decode_tokens", 0)) // 2
            runs.append(("bf16", data["engine_bs1_tok_s"], ctx))
        ctx = int(data.get("prompt_len", 0)) + int(data.get("decode_tokens", 0)) // 2
        runs += [(f, data[f"{f}_bs1_tok_s"], ctx) for f in FITTED_FORMATS if data.get(f"{f}_bs1_tok_s")]
        if runs and m is None:
            log.info("decode fit: skipping %s (model %r is not a random benchmark checkpoint)", name, data.get("model"))
            continue
        for fmt, tok_s, ctx in runs:
            out.append(_observation(name, f"{name}:{fmt}", card, m["arch"], m["size"], None, fmt, ctx, tok_s))
    return out
