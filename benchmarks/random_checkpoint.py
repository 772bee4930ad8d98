"""Writing the random full-size benchmark checkpoints: HF's path vs the fast writer, same process, same config.

    PYTHONPATH=src python benchmarks/random_checkpoint.py           # H100/H200: ~3-5 min, writes docs/results/
    PYTHONPATH=src python benchmarks/random_checkpoint.py --smoke   # CPU, tiny llama, seconds, writes to a temp dir

HF's path (``make_random_checkpoint``: ``from_config`` under ``torch.device``
with ``_init_weights``, then ``save_pretrained``) and the fast writer
(``fast_random_checkpoint``: meta model for the names, tensors drawn on the
device and written shard by shard) both build --arch with --layers layers (the
full 13B took HF 434 s on an H200, too long to repeat here); then the fast
writer alone builds the whole model, as ``gpu_benchmark_checkpoint`` does.
Reports seconds, GB/s written and peak device memory (allocator) for each.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import publish
from onecard.testing.checkpoints import fast_random_checkpoint, make_random_checkpoint

GB = 1e9


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny llama on CPU, seconds; output to a temp dir")
    p.add_argument("--arch", default="llama-2-13b")
    p.add_argument("--layers", type=int, default=4, help="layers for the HF-vs-fast comparison")
    p.add_argument("--scratch", default=None, help="folder for the checkpoints (default: a temp dir, removed after)")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def timed(name: str, build, path: Path, device: str) -> dict:
    """Run ``build(path)``; seconds, bytes written and the device's peak allocated memory."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    build(path)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    size = folder_bytes(path)
    peak = torch.cuda.max_memory_allocated() / GB if device == "cuda" else None
    shutil.rmtree(path)
    return {"name": name, "seconds": dt, "gb": size / GB, "gb_per_s": size / GB / dt, "peak_device_gb": peak}


def main() -> None:
    a = parse()
    console = Console()
    device = "cpu" if a.smoke else "cuda"
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke on CPU")
    arch, size = ("llama-2-7b", "tiny") if a.smoke else (a.arch, "full")
    dtype = "float32" if a.smoke else "bfloat16"
    cut = {"num_hidden_layers": a.layers}
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix="onecard-ckpt-"))
    rows = [
        timed(f"hf {a.layers} layers", lambda p: make_random_checkpoint(arch, size, p, dtype=dtype, device=device,
                                                                       overrides=cut), scratch / "hf", device),
        timed(f"fast {a.layers} layers", lambda p: fast_random_checkpoint(arch, size, p, dtype=dtype, device=device,
                                                                         overrides=cut), scratch / "fast", device),
        timed("fast all layers", lambda p: fast_random_checkpoint(arch, size, p, dtype=dtype, device=device),
              scratch / "full", device),
    ]
    if a.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    t = Table(title=f"random {arch} ({size}, {dtype}) checkpoint on {device}")
    for c in ("path", "s", "GB", "GB/s", "peak device GB"):
        t.add_column(c)
    for r in rows:
        peak = "-" if r["peak_device_gb"] is None else f"{r['peak_device_gb']:.2f}"
        t.add_row(r["name"], f"{r['seconds']:.1f}", f"{r['gb']:.2f}", f"{r['gb_per_s']:.2f}", peak)
    console.print(t)
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    console.print(f"fast writer: {speedup:.1f}x HF's path on {a.layers} layers")
    data = {"arch": arch, "size": size, "dtype": dtype, "device": device, "layers_compared": a.layers,
            "rows": rows, "fast_speedup_vs_hf": speedup}

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh([r["name"] for r in rows], [r["seconds"] for r in rows])
    ax.set_xlabel("seconds to write the folder")
    ax.set_title(f"random {arch} checkpoint ({device})")
    publish("random_checkpoint", data, fig, a.out or (tempfile.mkdtemp(prefix="onecard-bench-") if a.smoke else None),
            console)


if __name__ == "__main__":
    main()
