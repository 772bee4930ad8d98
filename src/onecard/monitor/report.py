"""Summary JSON and a PNG of a monitored run, from a ``Trace`` (live or loaded from JSONL).

The JSON is flat (``gpu0_temp_max_c``, ``tokens_per_s``, ``alloc_fragmentation_max``...)
so results files and dashboards can read it without knowing the trace format.
The PNG stacks utilisation, memory, temperature, power, throughput and latency
on one time axis, with clock-slowdown periods shaded and guard actions marked.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from onecard.monitor.allocator import memory_advice
from onecard.monitor.nvml import THROTTLE_REASONS, decode_throttle, slowdown_reasons
from onecard.monitor.trace import Trace, load_trace

_TIMING_KEYS = ("latency", "step_time", "ttft", "itl")


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _vals(samples, i: int, attr: str) -> list[float]:
    return [getattr(g, attr) for s in samples for g in s.gpus if g.index == i and getattr(g, attr) is not None]


def _dt(trace: Trace, samples: list, k: int) -> float:
    """Seconds GPU sample k stands for: up to the next one, capped at 2 intervals (a gap is not throttling)."""
    cap = 2 * float(trace.meta.get("interval") or 1.0)
    return min(cap, samples[k + 1].ts - samples[k].ts) if k + 1 < len(samples) else 0.0


def summarize(trace: Trace) -> dict[str, Any]:
    m = trace.meta
    gpu_samples = [s for s in trace.samples if s.gpus]
    indices = sorted({g.index for s in gpu_samples for g in s.gpus})
    out: dict[str, Any] = {
        "command": m.get("command"), "exit_code": trace.exit_code,
        "duration_s": round(trace.end - trace.start, 3), "interval_s": m.get("interval"),
        "samples": len(trace.samples), "gpu_count": len(indices),
        "gpu_names": sorted({g.name for s in gpu_samples for g in s.gpus}),
    }
    if not indices:
        out["no_gpu"] = m.get("no_gpu") or "no GPU samples in this trace"
    for i in indices:
        p = f"gpu{i}_"
        util, temp, power = _vals(gpu_samples, i, "util_gpu"), _vals(gpu_samples, i, "temp_c"), _vals(gpu_samples, i, "power_w")
        mem, total = _vals(gpu_samples, i, "mem_used_mib"), _vals(gpu_samples, i, "mem_total_mib")
        clk, lim, mtemp = _vals(gpu_samples, i, "sm_clock_mhz"), _vals(gpu_samples, i, "power_limit_w"), _vals(gpu_samples, i, "mem_temp_c")
        out.update({
            p + "util_mean_pct": _mean(util), p + "util_p95_pct": _pct(util, 0.95),
            p + "mem_used_peak_gib": max(mem) / 1024 if mem else None,
            p + "mem_total_gib": total[-1] / 1024 if total else None,
            p + "temp_mean_c": _mean(temp), p + "temp_max_c": max(temp) if temp else None,
            p + "mem_temp_max_c": max(mtemp) if mtemp else None,
            p + "power_mean_w": _mean(power), p + "power_max_w": max(power) if power else None,
            p + "power_limit_w": lim[-1] if lim else None,
            p + "sm_clock_mean_mhz": _mean(clk), p + "sm_clock_min_mhz": min(clk) if clk else None,
        })
        secs: dict[str, float] = defaultdict(float)
        slowed = 0.0
        for k, s in enumerate(gpu_samples):
            g = next((g for g in s.gpus if g.index == i), None)
            if g is None:
                continue
            dt = _dt(trace, gpu_samples, k)
            for r in decode_throttle(g.throttle):
                secs[r] += dt
            slowed += dt if slowdown_reasons(g.throttle) else 0.0
        for r, v in sorted(secs.items()):
            out[p + f"throttle_s_{r}"] = round(v, 3)
        span = gpu_samples[-1].ts - gpu_samples[0].ts
        out[p + "slowdown_fraction"] = round(slowed / span, 4) if span > 0 else 0.0
    procs = [s.proc for s in trace.samples if s.proc]
    cpu = [p["cpu_pct"] for p in procs if p.get("cpu_pct") is not None]
    rss = [p["rss_mib"] for p in procs if p.get("rss_mib") is not None]
    out.update({"proc_cpu_mean_pct": _mean(cpu), "proc_rss_peak_mib": max(rss) if rss else None})
    allocs = [s.allocator for s in trace.samples if s.allocator]
    if allocs:
        last = allocs[-1]
        out.update({
            "alloc_peak_allocated_gib": max(a.peak_allocated for a in allocs) / 2**30,
            "alloc_peak_reserved_gib": max(a.peak_reserved for a in allocs) / 2**30,
            "alloc_fragmentation_max": max(a.fragmentation for a in allocs),
            "alloc_fragmentation_last": last.fragmentation,
            "alloc_inactive_split_gib_max": max(a.inactive_split for a in allocs) / 2**30,
            "alloc_num_alloc_retries": last.num_alloc_retries, "alloc_num_ooms": last.num_ooms,
            "memory_advice": memory_advice(max(allocs, key=lambda a: a.fragmentation)),
        })
    costs = [s.cost_s for s in trace.samples if s.cost_s is not None]
    if costs:
        iv = float(m.get("interval") or 1.0)
        out.update({"sampler_cost_mean_ms": 1e3 * _mean(costs), "sampler_cost_p95_ms": 1e3 * _pct(costs, 0.95),
                    "sampler_busy_fraction": _mean(costs) / iv})
    recs = trace.records
    out["records"] = len(recs)
    tok_recs = [r for r in recs if "tokens" in r]
    if tok_recs:
        toks = [r["tokens"] for r in tok_recs]
        out["tokens_total"] = sum(toks)
        window = tok_recs[-1]["ts"] - tok_recs[0]["ts"]
        # the first record's tokens were produced before it: the rate is over the window after it
        out["tokens_per_s"] = (sum(toks) - toks[0]) / window if window > 0 else None
    keys = sorted({k for r in recs for k in r if k not in ("kind", "ts", "tokens")})
    for k in keys:
        xs = [float(r[k]) for r in recs if k in r]
        out[f"{k}_mean"] = _mean(xs)
        out[f"{k}_p50"] = _pct(xs, 0.5)
        out[f"{k}_p95"] = _pct(xs, 0.95)
    out["guard_back_offs"] = sum(1 for g in trace.guard if g.get("action") == "back_off")
    out["guard_restores"] = sum(1 for g in trace.guard if g.get("action") == "restore")
    out["guard_log"] = [f"t={g['ts'] - trace.start:.0f}s {g.get('action')} (level {g.get('level')}): {g.get('reason')}"
                        + (f" -> {g['detail']}" if g.get("detail") else "") for g in trace.guard]
    return out


def _shade(ax, trace: Trace, t0: float) -> None:
    """Shade spans where any GPU had a slowdown reason: thermal/HW red, power orange."""
    spans: list[tuple[float, float, str]] = []
    gs = [s for s in trace.samples if s.gpus]
    for k, s in enumerate(gs):
        kinds = {THROTTLE_REASONS[r][2] for g in s.gpus for r in slowdown_reasons(g.throttle)}
        if kinds:
            color = "tab:red" if kinds & {"thermal", "hw"} else "tab:orange"
            spans.append((s.ts - t0, s.ts - t0 + max(_dt(trace, gs, k), 1e-3), color))
    for a, b, c in spans:
        ax.axvspan(a, b, color=c, alpha=0.15, lw=0)
    for g in trace.guard:
        ax.axvline(g["ts"] - t0, color="tab:purple" if g.get("action") == "back_off" else "tab:green", lw=0.8, ls="--")


def plot(trace: Trace, path: str | Path, title: str | None = None) -> Path:
    """Six panels over time (seconds since start) into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = trace.start
    gs = [s for s in trace.samples if s.gpus]
    indices = sorted({g.index for s in gs for g in s.gpus})
    fig, axes = plt.subplots(6, 1, figsize=(11, 14), sharex=True)
    ax_u, ax_m, ax_t, ax_p, ax_x, ax_l = axes

    def series(i: int, attr: str) -> tuple[list[float], list[float]]:
        pts = [(s.ts - t0, getattr(g, attr)) for s in gs for g in s.gpus if g.index == i and getattr(g, attr) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    for i in indices:
        ax_u.plot(*series(i, "util_gpu"), label=f"GPU{i} SM %")
        ax_u.plot(*series(i, "util_mem"), label=f"GPU{i} mem %", ls=":")
        x, y = series(i, "mem_used_mib")
        ax_m.plot(x, [v / 1024 for v in y], label=f"GPU{i} used (NVML)")
        ax_t.plot(*series(i, "temp_c"), label=f"GPU{i} °C")
        if any(series(i, "mem_temp_c")[1]):
            ax_t.plot(*series(i, "mem_temp_c"), label=f"GPU{i} memory °C", ls=":")
        ax_p.plot(*series(i, "power_w"), label=f"GPU{i} W")
        ax_p.plot(*series(i, "power_limit_w"), label=f"GPU{i} limit", ls="--", color="grey")
    procs = [(s.ts - t0, s.proc) for s in trace.samples if s.proc]
    cpu = [(t, p["cpu_pct"]) for t, p in procs if p.get("cpu_pct") is not None]
    if cpu:
        ax_u.plot([c[0] for c in cpu], [c[1] for c in cpu], label="process CPU % (100 = 1 core)", color="grey", alpha=0.7)
    allocs = [(s.ts - t0, s.allocator) for s in trace.samples if s.allocator]
    if allocs:
        ax_m.plot([a[0] for a in allocs], [a[1].allocated / 2**30 for a in allocs], label="torch allocated")
        ax_m.plot([a[0] for a in allocs], [a[1].reserved / 2**30 for a in allocs], label="torch reserved", ls="--")
    rss = [(t, p["rss_mib"] / 1024) for t, p in procs if p.get("rss_mib") is not None]
    if rss and not indices:
        ax_m.plot([r[0] for r in rss], [r[1] for r in rss], label="process RSS (host)", color="grey")
    if not indices:
        why = trace.meta.get("no_gpu") or "no GPU samples"
        for ax in (ax_t, ax_p):
            ax.text(0.5, 0.5, f"no GPU: {why}", ha="center", va="center", transform=ax.transAxes, color="grey")
    # throughput: tokens per time bin
    recs = trace.records
    toks = [(r["ts"] - t0, r["tokens"]) for r in recs if "tokens" in r]
    if toks:
        span = max(t for t, _ in toks) or 1.0
        iv = float(trace.meta.get("interval") or 1.0)
        gaps = sorted(b[0] - a[0] for a, b in zip(toks, toks[1:]))
        gap = gaps[len(gaps) // 2] if gaps else 0.0
        # whole sampling intervals (no aliasing), at least the typical gap between records (no empty-bin comb)
        width = iv * max(1, math.ceil(max(span / 60, gap) / iv))
        bins: dict[int, float] = defaultdict(float)
        for t, n in toks:
            bins[int(t // width)] += n
        ks = list(range(min(bins), max(bins) + 1))  # empty bins are real zeros
        ax_x.plot([(k + 0.5) * width for k in ks], [bins[k] / width for k in ks], label="tokens/s", color="tab:blue")
    else:
        ax_x.text(0.5, 0.5, "no token records (Monitor.record(tokens=...))", ha="center", va="center",
                  transform=ax_x.transAxes, color="grey")
    timing = [k for k in _TIMING_KEYS if any(k in r for r in recs)]
    for k in timing:
        pts = [(r["ts"] - t0, r[k] * 1e3) for r in recs if k in r]
        ax_l.plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=2, label=f"{k} (ms)")
    if timing:
        vals = [r[k] for r in recs for k in timing if k in r and r[k] > 0]
        if vals and max(vals) / min(vals) > 20:
            ax_l.set_yscale("log")  # per-token latency and step time differ by orders of magnitude
    else:
        ax_l.text(0.5, 0.5, "no latency / step_time records", ha="center", va="center", transform=ax_l.transAxes, color="grey")
    for ax, label in zip(axes, ("utilisation %", "memory GiB", "temperature °C", "power W", "throughput", "latency ms")):
        ax.set_ylabel(label)
        _shade(ax, trace, t0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
    ax_l.set_xlabel("seconds since start (shaded: clock slowdown - red thermal/HW, orange power; dashed: guard actions)")
    names = ", ".join(sorted({g.name for s in gs for g in s.gpus})) or "no GPU"
    fig.suptitle(title or f"onecard monitor: {names} - {trace.meta.get('command') or ''}"[:120])
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def write_report(trace: Trace | str | Path, out_dir: str | Path, name: str = "monitor") -> tuple[Path, Path]:
    """``<out_dir>/<name>.json`` (summary) and ``<out_dir>/<name>.png``; returns both paths."""
    from onecard.errors import require_extra

    require_extra("matplotlib", "monitor")
    t = trace if isinstance(trace, Trace) else load_trace(trace)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(t)
    jpath = out / f"{name}.json"
    jpath.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return jpath, plot(t, out / f"{name}.png")
