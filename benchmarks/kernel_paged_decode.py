"""Paged decode attention: the per-query-head kernel vs the flash-decoding split kernel vs SDPA, one process.

    PYTHONPATH=src python benchmarks/kernel_paged_decode.py            # H100: ~1-2 min
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/kernel_paged_decode.py --smoke    # CPU (Triton interpreter), tiny, < 1 min

Shapes: Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128), one layer, 16-token cache blocks
scattered in random order; batch 1 and 8, every sequence at the full context (1k, 8k, 32k, 128k); bf16 and fp8
(per-token-per-head fp16 scales) caches. One extra row per batch/dtype: a 1k context in a 128k-wide block table,
which is what a CUDA graph captured for max_model_len=128k runs on a short prompt (the split kernel's partitions
are planned from the table width, so the ones past the context exit at once: this row measures that cost).

Methods: ``old`` = ``paged_decode_attention_triton`` (one program per (sequence, query head), the whole context
serially); ``split`` = ``paged_decode_attention_split`` (the engine's path); ``sdpa`` =
``scaled_dot_product_attention`` over K/V already gathered into contiguous bf16 (the GROUP query heads of a KV
head as GROUP query rows: no mask is needed at decode), i.e. what a non-paged flash kernel does. The gather is
not timed; for fp8 SDPA reads the dequantized bf16 copy, twice the bytes. Outputs are checked against SDPA.

``split@P`` rows force a P-token partition: the sweep to set ``SPLIT_MIN_PARTITION`` / ``SPLIT_MAX_PARTITION`` /
``SPLIT_TARGET_PROGRAMS`` in ``kernels/paged_attention.py`` from (pick, per row, the fastest; check the planned
``split`` row is close to it). Reported: microseconds (``graph_time_us``: inside a CUDA graph, L2 flushed), achieved GB/s (the cache bytes each
method must read: K, V and scales for the attended tokens / time) and that as % of the card's catalog bandwidth.
Writes docs/results/kernel_paged_decode.json (+ PNG).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from onecard.bench.results import publish
from onecard.bench.timing import kernel_timer
from onecard.kernels.paged_attention import (
    SPLIT_TILE,
    gather_kv,
    paged_decode_attention_split,
    paged_decode_attention_triton,
    split_plan,
)

FP8 = torch.float8_e4m3fn


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes; output to a temp dir")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()



def paged_case(B: int, ctx: int, width_tokens: int, Hq: int, Hkv: int, D: int, block: int, fmt: torch.dtype,
               device: str) -> dict:
    """A random paged cache with each sequence's blocks scattered, plus the same K/V gathered for SDPA."""
    g = torch.Generator(device=device).manual_seed(B * 131 + ctx)
    per_seq = -(-ctx // block)
    width = -(-width_tokens // block)
    num_blocks = B * per_seq + 1  # the last block is the padding target, like the engine's scratch block
    kc = torch.randn(num_blocks, block, Hkv, D, device=device, generator=g, dtype=torch.bfloat16)
    vc = torch.randn(num_blocks, block, Hkv, D, device=device, generator=g, dtype=torch.bfloat16)
    ks = vs = None
    if fmt == FP8:
        ks = (torch.rand(num_blocks, block, Hkv, device=device, generator=g) * 0.02 + 0.01).half()
        vs = (torch.rand(num_blocks, block, Hkv, device=device, generator=g) * 0.02 + 0.01).half()
        kc, vc = (kc * 32).to(FP8), (vc * 32).to(FP8)
    perm = torch.randperm(num_blocks - 1, device=device, generator=g)[:B * per_seq].view(B, per_seq)
    bt = torch.full((B, width), num_blocks - 1, dtype=torch.int32, device=device)
    bt[:, :per_seq] = perm.int()
    ctx_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(B, Hq, D, device=device, generator=g, dtype=torch.bfloat16)

    def gathered(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        x = gather_kv(cache, scale, perm.long(), torch.bfloat16)  # [B, per_seq, block, Hkv, D]
        return x.reshape(B, per_seq * block, Hkv, D)[:, :ctx].transpose(1, 2).contiguous()

    bytes_read = B * ctx * Hkv * (2 * D * kc.element_size() + (2 * 2 if fmt == FP8 else 0))
    return {"q": q, "kc": kc, "vc": vc, "ks": ks, "vs": vs, "bt": bt, "ctx": ctx_lens,
            "k": gathered(kc, ks), "v": gathered(vc, vs), "bytes": bytes_read}


def methods(c: dict, scale: float, partitions: tuple[int, ...]) -> dict[str, Callable[[], torch.Tensor]]:
    """old, split (the planned partition), sdpa, and split@P for each forced partition P (the tuning sweep)."""
    B, Hq, D = c["q"].shape
    Hkv = c["k"].shape[1]
    qg = c["q"].view(B, Hkv, Hq // Hkv, D)
    args = (c["q"], c["kc"], c["vc"], c["bt"], c["ctx"], scale, c["ks"], c["vs"])
    fns = {
        "old": lambda: paged_decode_attention_triton(*args),
        "split": lambda: paged_decode_attention_split(*args),
        "sdpa": lambda: F.scaled_dot_product_attention(qg, c["k"], c["v"], scale=scale).reshape(B, Hq, D),
    }
    for p in partitions:
        fns[f"split@{p}"] = lambda p=p: paged_decode_attention_split(*args, partition=p)
    return fns


def main() -> None:
    a = parse()
    console = Console()
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if a.smoke:
        import tempfile

        Hq, Hkv, D, block = 4, 2, 16, 8
        batches, contexts, long_width, partitions = (1, 2), (64, 200), 512, (64,)
        out_dir = a.out or tempfile.mkdtemp(prefix="kernel_paged_decode_")
    else:
        Hq, Hkv, D, block = 32, 8, 128, 16
        batches, contexts, long_width, partitions = (1, 8), (1024, 8192, 32768, 131072), 131072, (128, 256, 512, 1024)
        out_dir = a.out
    bw = None
    if device == "cuda":
        from onecard.engine.offload import card_bandwidth_gbs

        bw = card_bandwidth_gbs(torch.device(device))
    time_us = kernel_timer(device)
    scale = D ** -0.5
    t_start = time.perf_counter()
    rows = []
    for fmt in (torch.bfloat16, FP8):
        for B in batches:
            for ctx, width in [(n, n) for n in contexts] + [(contexts[0], long_width)]:
                c = paged_case(B, ctx, width, Hq, Hkv, D, block, fmt, device)
                fns = methods(c, scale, partitions)
                want = fns["sdpa"]().float()
                partition = split_plan(B, Hkv, c["bt"].shape[1] * block, max(SPLIT_TILE, block))[0]
                for name, fn in fns.items():
                    err = (fn().float() - want).abs().max().item()
                    if err > 5e-2:
                        raise SystemExit(f"{name} B={B} ctx={ctx} {fmt}: max abs error {err:.3g} vs SDPA")
                    us = time_us(fn)
                    nbytes = c["bytes"] * (2 if name == "sdpa" and fmt == FP8 else 1)
                    gbs = nbytes / us / 1e3
                    part = int(name[6:]) if name.startswith("split@") else partition if name == "split" else None
                    rows.append({"cache": "fp8" if fmt == FP8 else "bf16", "batch": B, "context": ctx,
                                 "table_tokens": width, "method": name, "us": us, "gbs": gbs,
                                 "pct_bandwidth": 100 * gbs / bw if bw else None, "max_abs_err": err,
                                 "partition": part, "splits": -(-width // part) if part else None})
                del c, fns
                if device == "cuda":
                    torch.cuda.empty_cache()
    result = {"device": device, "card_bandwidth_gbs": bw, "heads": [Hq, Hkv, D], "block_size": block, "rows": rows,
              "elapsed_s": time.perf_counter() - t_start}
    for r in rows:
        if r["method"].startswith("split"):
            old = next(o for o in rows if o["method"] == "old" and all(o[k] == r[k] for k in
                                                                       ("cache", "batch", "context", "table_tokens")))
            r["speedup_vs_old"] = old["us"] / r["us"]

    t = Table("cache", "B", "context", "table", "method", "us", "GB/s", "% card BW", "split plan", "vs old",
              title=f"paged decode attention, one layer, {Hq}q/{Hkv}kv heads d{D} ({device})")
    for r in rows:
        t.add_row(r["cache"], str(r["batch"]), str(r["context"]), str(r["table_tokens"]), r["method"],
                  f"{r['us']:.1f}", f"{r['gbs']:.0f}", f"{r['pct_bandwidth']:.0f}%" if bw else "-",
                  f"{r['splits']}x{r['partition']}" if r["splits"] else "",
                  f"{r['speedup_vs_old']:.2f}x" if "speedup_vs_old" in r else "")
    console.print(t)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        for cache, style in (("bf16", "-"), ("fp8", "--")):
            for name, color in (("old", "tab:red"), ("split", "tab:blue"), ("sdpa", "tab:gray")):
                pts = [r for r in rows if r["batch"] == B and r["cache"] == cache and r["method"] == name
                       and r["table_tokens"] == r["context"]]
                ax.plot([r["context"] for r in pts], [r["us"] for r in pts], style, marker="o", color=color,
                        label=f"{name} ({cache})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("us per layer")
        ax.set_title(f"batch {B}")
        ax.legend(fontsize=7)
    fig.suptitle(f"paged decode attention ({device})")
    publish("kernel_paged_decode", result, fig, out_dir, console)


if __name__ == "__main__":
    main()
