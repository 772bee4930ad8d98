"""Decode attention over an fp8 KV cache per layer: the CUDA-core walk (MHA) vs tile dots, and vs a bf16 cache.

    PYTHONPATH=src python benchmarks/kernel_decode_attention_quant.py          # H100: < 1 min
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/kernel_decode_attention_quant.py --smoke   # CPU interpreter

Why: an fp8 cache halves the bytes a decode step reads, yet the engine's offline run got slower with it (0.76x,
docs/results/engine_kv_fp8.json before this kernel): the tile-dot walk dequantized each tile into shared memory for
``tl.dot`` and read 1.2-1.5 TB/s on an H200. With one query row per KV head (MHA: Llama-2) the dots are 1/16
useful anyway, so ``_attend_row`` walks on CUDA cores in one warp. Rows: Llama-2-7B heads (32/32, d128; the new
walk) and Llama-3-8B heads (32/8; tile dots either way, for contrast), batch x context from bs=1 decode to the
offline benchmark's steady state (240 sequences of ~406 tokens) in a 4096-token block table. Each path runs through
``paged_decode_attention_split`` (q given) and ``paged_decode_attention_fused`` (the engine's: RoPE + store +
attention + merge), outputs are checked against the tile-dot walk first, then timed inside a CUDA graph with L2
flushed. ``GB/s`` counts the K/V bytes (and fp8 scales) the step must read; ``roofline`` divides it by the measured
copy bandwidth. Writes docs/results/kernel_decode_attention_quant.json (+ PNG).
"""

from __future__ import annotations

import argparse

import torch
from kernel_decode_attention import FP8, decode_case
from rich.console import Console
from rich.table import Table

from onecard.bench.engine_bench import measure_copy_bandwidth
from onecard.bench.results import gpu_name, publish
from onecard.bench.timing import kernel_timer
from onecard.kernels.paged_attention import (
    paged_decode_attention_fused,
    paged_decode_attention_split,
)

ARCHS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}
SHAPES = ((1, 1024), (1, 4096), (8, 2048), (32, 2048), (240, 406))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes; output to a temp dir")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


def timed_paths(c: dict, Hq: int, Hkv: int, D: int, fp8: bool) -> dict:
    """name -> fn for one case: split (q given) and fused, on the default walk, and on tile dots when that differs."""
    scale = D ** -0.5
    q = c["qkv"][:, :Hq * D].view(-1, Hq, D).contiguous()
    quant = (c["ks"], c["vs"]) if fp8 else (None, None)

    def split(**kw):
        return lambda: paged_decode_attention_split(q, c["kc"], c["vc"], c["bt"], c["ctx"], scale, *quant, **kw)

    def fused(**kw):
        return lambda: paged_decode_attention_fused(c["qkv"], c["pos"], c["cs"], c["kc"], c["vc"], c["slots"],
                                                    c["bt"], c["ctx"], Hq, Hkv, D, scale, *quant, **kw)

    fns = {"split": split()}
    if fp8 and Hq == Hkv:
        fns["split_tiles"] = split(cuda_cores=False)
    if q.is_cuda or not fp8:  # the fused fp8 store is CUDA-only
        fns["fused"] = fused()
        if "split_tiles" in fns:
            fns["fused_tiles"] = fused(cuda_cores=False)
    return fns


def main() -> None:
    a = parse()
    console = Console()
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if a.smoke:
        import tempfile

        archs, shapes, width, block = {"tiny-mha": (4, 4, 16), "tiny-gqa": (4, 2, 16)}, ((1, 37), (3, 150)), 256, 8
        out_dir = a.out or tempfile.mkdtemp(prefix="kernel_decode_attention_quant_")
    else:
        archs, shapes, width, block = ARCHS, SHAPES, 4096, 16
        out_dir = a.out
    time_us = kernel_timer(device)
    bw = measure_copy_bandwidth(torch.device(device))
    rows = []
    for arch, (Hq, Hkv, D) in archs.items():
        for B, ctx in shapes:
            row = {"arch": arch, "batch": B, "context": ctx}
            for fmt in (None, FP8):
                cache = "fp8" if fmt == FP8 else "bf16"
                c = decode_case(B, ctx, width, Hq, Hkv, D, block, fmt, device)
                fns = timed_paths(c, Hq, Hkv, D, fmt == FP8)
                for walk in ("split", "fused"):
                    if f"{walk}_tiles" in fns:
                        err = (fns[walk]().float() - fns[f"{walk}_tiles"]().float()).abs().max().item()
                        if err > 2e-2:
                            raise SystemExit(f"{arch} B={B} ctx={ctx}: the CUDA-core {walk} differs by {err}")
                        row[f"{cache}_{walk}_max_abs_diff_vs_tiles"] = err
                elem = 1 if fmt == FP8 else c["kc"].element_size()
                nbytes = 2 * B * ctx * Hkv * (D * elem + (2 if fmt == FP8 else 0))
                for name, fn in fns.items():
                    us = time_us(fn)
                    row[f"{cache}_{name}_us"] = us
                    row[f"{cache}_{name}_gbs"] = nbytes / us / 1e3
                    row[f"{cache}_{name}_roofline_fraction"] = nbytes / us / 1e3 / bw
            if "fp8_split_tiles_us" in row:
                row["fp8_cuda_cores_speedup_vs_tiles"] = row["fp8_split_tiles_us"] / row["fp8_split_us"]
            if "fp8_fused_tiles_us" in row:
                row["fp8_fused_cuda_cores_speedup_vs_tiles"] = row["fp8_fused_tiles_us"] / row["fp8_fused_us"]
            if "fp8_fused_us" in row:
                row["fp8_fused_speedup_vs_bf16"] = row["bf16_fused_us"] / row["fp8_fused_us"]
            rows.append(row)
    result = {"gpu": gpu_name() if device == "cuda" else "cpu (interpreter)", "device": device, "block_size": block,
              "table_tokens": width, "measured_copy_bandwidth_gbs": bw, "rows": rows}
    for r in rows:  # flat headline keys: the offline steady state and bs=1
        for key in ("fp8_cuda_cores_speedup_vs_tiles", "fp8_fused_cuda_cores_speedup_vs_tiles",
                    "fp8_fused_speedup_vs_bf16", "fp8_split_roofline_fraction", "bf16_split_roofline_fraction"):
            if key in r:
                result[f"{r['arch']}_b{r['batch']}_ctx{r['context']}_{key}"] = r[key]

    t = Table("arch", "B", "context", "bf16 µs", "fp8 tiles µs", "fp8 µs", "fp8 GB/s", "roofline", "vs tiles",
              "fused fp8/bf16", title=f"decode attention per layer, fp8 cache ({result['gpu']}, copy {bw:.0f} GB/s)")
    def cell(r: dict, key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(r[key]) if key in r else "-"

    for r in rows:
        t.add_row(r["arch"], str(r["batch"]), str(r["context"]), cell(r, "bf16_split_us"),
                  cell(r, "fp8_split_tiles_us"), cell(r, "fp8_split_us"), cell(r, "fp8_split_gbs", "{:.0f}"),
                  cell(r, "fp8_split_roofline_fraction", "{:.0%}"), cell(r, "fp8_cuda_cores_speedup_vs_tiles", "{:.2f}x"),
                  cell(r, "fp8_fused_speedup_vs_bf16", "{:.2f}x"))
    console.print(t)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        pts = [r for r in rows if r["arch"] == arch]
        labels = [f"B={r['batch']}\n{r['context']}" for r in pts]
        x = range(len(pts))
        series = (("bf16_split_gbs", "bf16 cache", "tab:blue"), ("fp8_split_tiles_gbs", "fp8, tile dots", "tab:orange"),
                  ("fp8_split_gbs", "fp8, default walk", "tab:green"))
        for i, (key, label, color) in enumerate(series):
            if any(key in r for r in pts):
                ax.bar([xi + 0.27 * (i - 1) for xi in x], [r.get(key, 0) for r in pts], width=0.27, label=label,
                       color=color)
        ax.axhline(bw, color="gray", lw=0.8, ls="--", label="copy bandwidth")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("K/V GB/s read")
        ax.set_title(arch)
        ax.legend(fontsize=7)
    fig.suptitle(f"decode attention over the KV cache ({result['gpu']})")
    publish("kernel_decode_attention_quant", result, fig, out_dir, console)


if __name__ == "__main__":
    main()
