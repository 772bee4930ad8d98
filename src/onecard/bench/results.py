"""Benchmark result files: flat JSON with the run's facts, beside a PNG.

Every benchmark writes ``<out_dir>/<name>.json`` through ``write_result`` so
each file carries gpu, torch, date and the exact command that produced it.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[3] / "docs" / "results"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"


def run_facts() -> dict:
    """gpu, torch, date and the exact command line of this process."""
    import torch

    return {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
    }


def write_result(name: str, data: dict, out_dir: str | Path | None = None) -> Path:
    """Write ``data`` + run facts to ``<out_dir or docs/results>/<name>.json``; returns the path."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**run_facts(), **data}, indent=2, default=str) + "\n")
    return path


def save_figure(fig, name: str, out_dir: str | Path | None = None) -> Path:
    """Save a matplotlib figure as ``<name>.png`` beside its JSON."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def speedup_bars(series: dict[str, list[float]], groups: list[str], ylabel: str, title: str):
    """Grouped bars of speedups (one bar per series in each group, value on top, a line at 1.0): the kernel
    benchmarks' figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, vals, width, label=label)
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="#888", lw=0.8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return fig


def publish(name: str, data: dict, fig, out_dir: str | Path | None, console) -> None:
    """``write_result`` + ``save_figure`` and one line saying where they went (every benchmark's last step)."""
    console.print(f"wrote {write_result(name, data, out_dir)} and {save_figure(fig, name, out_dir)}")


def free_memory() -> None:
    """Hand the allocator's unused cached blocks back (after a garbage collection): between a benchmark's engines,
    and before a preflight measures what the card has free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def memory_capped(device, gib: float | None):
    """Within: this process may use at most ``gib`` of ``device``'s memory (how a 24 GiB card is stood in for on a
    bigger one); the cap is lifted on the way out. Nothing happens on a CPU or without a cap."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not gib:
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * (1 << 30) / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def cap_process_memory(gib: float) -> None:
    """Cap this process's CUDA memory at ``gib`` (how a 24 GiB card is stood in for on a bigger one)."""
    import torch

    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * (1 << 30) / torch.cuda.mem_get_info()[1]))
