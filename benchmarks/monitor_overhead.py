"""Sampler overhead: a training-like loop with the monitor off vs on, in one process, blocks interleaved.

    PYTHONPATH=src python benchmarks/monitor_overhead.py                  # GPU: ~2 min, writes docs/results/
    PYTHONPATH=src python benchmarks/monitor_overhead.py --smoke          # CPU, seconds, writes to a temp dir
    PYTHONPATH=src onecard monitor run --log run.jsonl --report docs/results/monitor_run -- \\
        python benchmarks/monitor_overhead.py                             # also the 2-minute monitored run

Arms: ``off``, ``on`` at the default 1 s interval, and ``on`` at 0.1 s (a
stress setting). Blocks run off/on/on/off/... for ``--rounds`` so drift
(clocks, temperature) hits every arm alike; overhead = median step time of an
arm / median of ``off`` - 1. The target is < 1 % at the default interval.
Under ``onecard monitor run`` the loop also records step_time and tokens to
the wrapped trace, so the report shows throughput beside the GPU samples.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import save_figure, write_result
from onecard.models import arch_config, scale_config
from onecard.monitor.monitor import TRACE_ENV, Monitor
from onecard.monitor.nvml import open_nvml
from onecard.testing.checkpoints import build_random_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few seconds; output to a temp dir")
    p.add_argument("--arch", default="llama-2-7b", help="built-in architecture whose full-width config is used")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (full hidden size): ~1.1B params for llama-2-7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=4, help="off/on block rounds")
    p.add_argument("--seconds", type=float, default=110.0, help="wall-time budget for the measured blocks")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    a = p.parse_args()
    if a.layers < 1 or a.batch < 1 or a.seq < 2 or a.rounds < 1 or a.seconds <= 0:
        p.error("--layers, --batch, --rounds must be >= 1, --seq >= 2, --seconds > 0")
    return a


def main() -> None:
    a = parse()
    console = Console()
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    if a.smoke:
        cfg = scale_config(arch_config(a.arch), "tiny")
        a.batch, a.seq, a.rounds, a.seconds = 1, 32, 1, 1.0
        dtype = "float32"
    else:
        if device == "cpu":
            raise SystemExit("no CUDA GPU: run with --smoke on CPU")
        cfg = arch_config(a.arch) | {"num_hidden_layers": a.layers}
        dtype = "bfloat16"
    model = build_random_model(cfg, dtype=dtype, device=device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, cfg["vocab_size"], (a.batch, a.seq), device=device)
    tokens = a.batch * a.seq
    # records for an enclosing 'onecard monitor run' (a child Monitor: no NVML of its own)
    outer = Monitor() if os.environ.get(TRACE_ENV) else None
    if outer:
        outer.start()

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # synchronises with the GPU
        dt = time.perf_counter() - t0
        if outer:
            outer.record(tokens=tokens, step_time=dt, loss=loss.item())
        return dt

    warm = 1 if a.smoke else 3
    for _ in range(warm):  # warm-up: allocator, cuBLAS heuristics, optimizer state
        step()
    probe = statistics.median(step() for _ in range(warm))
    arms = {"off": None, "on_1s": 1.0, "on_100ms": 0.1}
    steps_per_block = max(2 if a.smoke else 5, int(a.seconds / (probe * len(arms) * a.rounds)))
    console.print(f"[dim]{a.arch} x{cfg['num_hidden_layers']} layers, {n_params / 1e6:.0f}M params, {dtype} on {device}; "
                  f"step ~{probe * 1e3:.1f} ms; {a.rounds} rounds x {len(arms)} arms x {steps_per_block} steps[/]")
    times: dict[str, list[float]] = {k: [] for k in arms}
    costs: dict[str, list[float]] = {k: [] for k in arms if arms[k]}
    order = list(arms)
    for r in range(a.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            interval = arms[name]
            mon = Monitor(interval=interval, attach=False, log=None) if interval else None
            if mon:
                mon.start()
            times[name] += [step() for _ in range(steps_per_block)]
            if mon:
                mon.stop()
                costs[name] += [s.cost_s for s in mon.samples if s.cost_s is not None]
    if outer:
        outer.stop()
    reader, _ = open_nvml()  # did the "on" arms really read NVML here?
    gpu_sampled = reader is not None
    if reader:
        reader.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: statistics.quantiles(v, n=10, method="inclusive") for k, v in times.items()}
    data = {
        "model": f"{a.arch} ({cfg['num_hidden_layers']} layers)", "params_m": round(n_params / 1e6, 1), "dtype": dtype,
        "device": device, "batch": a.batch, "seq": a.seq, "rounds": a.rounds, "steps_per_block": steps_per_block,
        "nvml_sampled": gpu_sampled,
        "step_ms_off_median": med["off"] * 1e3,
        "step_ms_off_noise_pct": 100 * (q["off"][-1] - q["off"][0]) / med["off"],
        "tokens_per_s_off": tokens / med["off"],
    }
    for name, interval in arms.items():
        if not interval:
            continue
        tag = name.removeprefix("on_")
        data[f"step_ms_on_{tag}_median"] = med[name] * 1e3
        data[f"overhead_pct_at_{tag}"] = 100 * (med[name] / med["off"] - 1)
        data[f"sampler_cost_ms_mean_at_{tag}"] = 1e3 * statistics.fmean(costs[name]) if costs[name] else None
        data[f"sampler_busy_fraction_at_{tag}"] = (statistics.fmean(costs[name]) / interval) if costs[name] else None
    data["meets_1pct_target_at_1s"] = data["overhead_pct_at_1s"] < 1.0

    table = Table("arm", "median step ms", "p10-p90 ms", "overhead %", "sampler ms/sample", title="monitor overhead")
    for name in arms:
        tag = name.removeprefix("on_")
        table.add_row(name, f"{med[name] * 1e3:.2f}", f"{q[name][0] * 1e3:.2f}-{q[name][-1] * 1e3:.2f}",
                      "-" if name == "off" else f"{data[f'overhead_pct_at_{tag}']:+.2f}",
                      "-" if name == "off" or data[f"sampler_cost_ms_mean_at_{tag}"] is None
                      else f"{data[f'sampler_cost_ms_mean_at_{tag}']:.2f}")
    console.print(table)
    if not gpu_sampled:
        console.print("[yellow]no NVML here: 'on' arms sampled only the process and allocator[/]")

    out = a.out or (tempfile.mkdtemp(prefix="onecard-bench-") if a.smoke else None)
    path = write_result("monitor_overhead", data, out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([[t * 1e3 for t in times[k]] for k in arms], showfliers=False)
    ax.set_xticks(range(1, len(arms) + 1), [f"{k}\n{data.get('overhead_pct_at_' + k.removeprefix('on_'), 0):+.2f}%"
                                            if k != "off" else k for k in arms])
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"monitor sampler overhead - {data['model']}, {device}")
    png = save_figure(fig, "monitor_overhead", out)
    console.print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
