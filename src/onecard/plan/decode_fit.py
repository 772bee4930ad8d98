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

A step of several sequences reads the same weights but runs other kernels
(cuBLAS GEMMs, the weight-only ``dot_t``, the dequantize path), whose time is
not the bytes' at the bs=1 efficiency. So each format's weight time is scaled by
a factor measured per batch size (``fit_batch_factors``, from
``batch_observations_from_results``), against the model above with the KV read
and the latencies taken out.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

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
    """Bytes one decode step reads, split by which kernels read them."""

    quantized: int  # decoder-layer linears in a quantized format (0 for bf16/fp32: they are counted as 16-bit)
    plain: int  # 16-bit weights (all of them for bf16), the LM head, norms and biases
    layers: int
    kv: int = 0  # the KV cache read, every sequence's


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
    return StepBytes(quant, plain, spec.args.num_layers, batch * context * kv_bytes_per_token)


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
    """Fitted constants; ``efficiency`` holds the formats the fit saw (others read like bf16).

    ``batch_factors``: per format, ``(batch, factor)`` pairs: how many times its bs=1 weight time a step of that many
    sequences spends on the weights (``fit_batch_factors``). A batch runs other kernels than bs=1 (cuBLAS GEMMs,
    ``dot_t``, dequantize + cuBLAS), so bytes alone predicted int4's 16-sequence step 67 % too fast.
    """

    efficiency: dict[str, float]
    per_layer_s: float
    per_step_s: float
    observations: int
    sources: tuple[str, ...]
    batch_factors: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)

    def efficiency_for(self, fmt: str) -> float:
        return self.efficiency.get(fmt, self.efficiency["bf16"])

    def batch_factor(self, fmt: str, batch: int) -> float:
        """The weight-time factor at ``batch`` sequences: linear between measured batches, the largest measured one's
        beyond it, 1 at bs=1 or with no batched measurement; a format not measured batched reads like bf16."""
        points = ((1, 1.0),) + self.batch_factors.get(fmt, self.batch_factors.get("bf16", ()))
        below = max((p for p in points if p[0] <= batch), key=lambda p: p[0])
        above = [p for p in points if p[0] > batch]
        if not above:
            return below[1]
        (b0, f0), (b1, f1) = below, min(above, key=lambda p: p[0])
        return f0 + (f1 - f0) * (batch - b0) / (b1 - b0)

    def step_seconds(self, b: StepBytes, bandwidth_gbs: float, fmt: str, batch: int = 1) -> float:
        bw = bandwidth_gbs * 1e9
        return self.memory_seconds(b, bw, fmt, batch) + b.layers * self.per_layer_s + self.per_step_s

    def weight_seconds(self, b: StepBytes, bandwidth_bytes_s: float, fmt: str) -> float:
        """Time a bs=1 step spends streaming the weights (the KV cache read apart)."""
        return b.quantized / (bandwidth_bytes_s * self.efficiency_for(fmt)) + \
            b.plain / (bandwidth_bytes_s * self.efficiency["bf16"])

    def memory_seconds(self, b: StepBytes, bandwidth_bytes_s: float, fmt: str, batch: int = 1) -> float:
        return self.weight_seconds(b, bandwidth_bytes_s, fmt) * self.batch_factor(fmt, batch) + \
            b.kv / (bandwidth_bytes_s * self.efficiency["bf16"])

    def describe(self) -> str:
        batched = sorted({b for pts in self.batch_factors.values() for b, _ in pts})
        return (f"fitted to {self.observations} measured bs=1 speeds ({', '.join(self.sources)}): "
                f"+{self.per_layer_s * 1e6:.0f} us per layer, +{self.per_step_s * 1e6:.0f} us per step"
                + (f"; batched steps measured at {batched[0]}-{batched[-1]} sequences "
                   f"({', '.join(sorted(self.batch_factors))})" if batched else ""))


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
        row[0] = (o.bytes.plain + o.bytes.kv) / bw
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


@dataclass(frozen=True)
class BatchObservation:
    """One measured decode step of ``batch`` sequences (``bytes`` at that batch, KV included)."""

    source: str
    bandwidth_gbs: float
    fmt: str
    batch: int
    bytes: StepBytes
    step_s: float


def fit_batch_factors(model: DecodeModel, observations: list[BatchObservation]) -> dict[str, tuple[tuple[int, float], ...]]:
    """Per format, ``(batch, factor)``: the measured step less the KV read and the fitted latencies, over the bs=1
    weight time the model gives the same run; the mean where several runs measured one batch."""
    found: dict[tuple[str, int], list[float]] = {}
    for o in observations:
        bw = o.bandwidth_gbs * 1e9
        rest = o.bytes.kv / (bw * model.efficiency["bf16"]) + o.bytes.layers * model.per_layer_s + model.per_step_s
        found.setdefault((o.fmt, o.batch), []).append((o.step_s - rest) / model.weight_seconds(o.bytes, bw, o.fmt))
    out: dict[str, tuple[tuple[int, float], ...]] = {}
    for fmt, batch in sorted(found):
        out[fmt] = out.get(fmt, ()) + ((batch, float(np.mean(found[fmt, batch]))),)
    return out


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


_BATCH_STEP = re.compile(r"^(?P<fmt>[a-z0-9]+)_bs(?P<batch>[0-9]+)_ms_per_step$")


def _quant_decode_context(data: dict) -> int:
    """Mean tokens of context over a ``quant_decode.py`` run's decode: its prompt and half the tokens decoded."""
    return int(data.get("prompt_len", 0)) + int(data.get("decode_tokens", 0)) // 2


def batch_observations_from_results(results: dict[str, dict]) -> list[BatchObservation]:
    """Engine decode steps of more than one sequence (``benchmarks/quant_decode.py``'s ``<format>_bs<N>_ms_per_step``,
    ``--more-batches``), on catalog cards and random benchmark checkpoints as ``observations_from_results``."""
    out: list[BatchObservation] = []
    for name, data in sorted(results.items()):
        if not isinstance(data, dict) or data.get("device", "cuda") != "cuda":
            continue
        steps = [(m["fmt"], int(m["batch"]), v) for k, v in data.items() if (m := _BATCH_STEP.match(k))
                 and m["fmt"] in FITTED_FORMATS and int(m["batch"]) > 1 and isinstance(v, (int, float)) and v > 0]
        card, folder = _card(str(data.get("gpu", ""))), _RANDOM_FOLDER.search(str(data.get("model", "")))
        if not steps or card is None or folder is None:
            continue
        spec = _spec(folder["arch"], folder["size"])
        ctx = _quant_decode_context(data)
        out += [BatchObservation(name, card.bandwidth_gbs, fmt, batch,
                                 step_bytes(spec, fmt, ctx, M.kv_bytes_per_token(spec), batch), ms / 1e3)
                for fmt, batch, ms in steps]
    return out


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
        ctx = _quant_decode_context(data)
        runs += [(f, data[f"{f}_bs1_tok_s"], ctx) for f in FITTED_FORMATS if data.get(f"{f}_bs1_tok_s")]
        if runs and m is None:
            log.info("decode fit: skipping %s (model %r is not a random benchmark checkpoint)", name, data.get("model"))
            continue
        for fmt, tok_s, ctx in runs:
            out.append(_observation(name, f"{name}:{fmt}", card, m["arch"], m["size"], None, fmt, ctx, tok_s))
    return out
