"""A decode step's attention per layer: three launches (RoPE + KV store, flash-decoding, merge) vs one fused launch.

    PYTHONPATH=src python benchmarks/kernel_decode_attention.py            # H100: < 1 min
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/kernel_decode_attention.py --smoke   # CPU interpreter
    PYTHONPATH=src python benchmarks/kernel_decode_attention.py --sweep   # H100: ~3 min, sets FUSED_LAUNCH

Both paths start from the fused q|k|v output of the QKV projection and end with the attention output, as in the
engine's captured decode step: ``three`` = ``rope_store_kv_triton`` + ``paged_decode_attention_split`` (its split
and combine kernels); ``fused`` = ``paged_decode_attention_fused``. Shapes: Llama-2-7B heads (32 q / 32 kv, d128)
and Llama-3-8B heads (32 / 8), batch 1, 8 and 64, contexts 256 to 4096 tokens in a 4096-token block table (what a
graph captured for max_model_len=4096 runs), bf16 and fp8 caches. Outputs of the two are compared first. Timed
inside a CUDA graph with L2 flushed (``graph_time_us``); ``speedup`` = three / fused.
Writes docs/results/kernel_decode_attention.json (+ PNG).

--sweep times the fused kernel at batch 1 and 8 (bf16) over forced partitions (tokens per program: fewer
programs and merges vs longer serial walks) and launch options, against the three-launch path, and prints the best
per shape: what ``FUSED_LAUNCH`` in ``kernels/paged_attention.py`` is set from, and whether the planned partitions
(``split_plan``) suit the fused kernel. Writes kernel_decode_attention_sweep.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import gpu_name, publish
from onecard.bench.timing import kernel_timer
from onecard.kernels.paged_attention import (
    SPLIT_TILE,
    paged_decode_attention_fused,
    paged_decode_attention_split,
    rope_store_kv_triton,
    split_plan,
)

FP8 = torch.float8_e4m3fn
ARCHS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes; output to a temp dir")
    p.add_argument("--sweep", action="store_true", help="time forced partitions and launch options (CUDA)")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


def decode_case(B: int, ctx: int, width: int, Hq: int, Hkv: int, D: int, block: int, fmt: torch.dtype,
                device: str) -> dict:
    """A scattered paged cache with every sequence at ``ctx`` tokens (its last slot the new token's), the step's
    q|k|v rows, positions, slots and a RoPE table."""
    g = torch.Generator(device=device).manual_seed(B * 7 + ctx)
    per_seq, cols = -(-ctx // block), -(-width // block)
    num_blocks = B * per_seq + 1  # the last block is the padding target, like the engine's scratch block
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's bf16 dots are wrong
    kc = torch.randn(num_blocks, block, Hkv, D, device=device, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block, Hkv, D, device=device, generator=g).to(dtype)
    ks = vs = None
    if fmt == FP8:
        ks, vs = ((torch.rand(num_blocks, block, Hkv, device=device, generator=g) * 0.02 + 0.01).half()
                  for _ in range(2))
        kc, vc = (kc * 32).to(FP8), (vc * 32).to(FP8)
    perm = torch.randperm(num_blocks - 1, device=device, generator=g)[:B * per_seq].view(B, per_seq)
    bt = torch.full((B, cols), num_blocks - 1, dtype=torch.int32, device=device)
    bt[:, :per_seq] = perm.int()
    pos = torch.full((B,), ctx - 1, dtype=torch.long, device=device)
    slots = perm[:, (ctx - 1) // block].long() * block + (ctx - 1) % block
    freqs = torch.outer(torch.arange(width, device=device).float(),
                        1.0 / 10000 ** (torch.arange(0, D, 2, device=device).float() / D))
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, device=device, generator=g).to(dtype)
    return {"qkv": qkv, "pos": pos, "cs": torch.cat([freqs.cos(), freqs.sin()], -1), "kc": kc, "vc": vc, "ks": ks,
            "vs": vs, "slots": slots, "bt": bt, "ctx": torch.full((B,), ctx, dtype=torch.int32, device=device)}


def paths(c: dict, Hq: int, Hkv: int, D: int) -> dict:
    scale = D ** -0.5

    def three() -> torch.Tensor:
        q = rope_store_kv_triton(c["qkv"], c["pos"], c["cs"], c["kc"], c["vc"], c["slots"], Hq, Hkv, D, c["ks"],
                                 c["vs"])
        return paged_decode_attention_split(q, c["kc"], c["vc"], c["bt"], c["ctx"], scale, c["ks"], c["vs"])

    def fused(**options) -> torch.Tensor:
        return paged_decode_attention_fused(c["qkv"], c["pos"], c["cs"], c["kc"], c["vc"], c["slots"], c["bt"],
                                            c["ctx"], Hq, Hkv, D, scale, c["ks"], c["vs"], **options)

    return {"three": three, "fused": fused}


SWEEP_PARTITIONS = (0, 64, 256, 512)  # 0: split_plan's
SWEEP_LAUNCH = ((4, 3), (4, 2), (2, 2), (2, 1), (8, 2))


def sweep(console, out_dir: str | None) -> None:
    """Every (partition, num_warps, num_stages) of the fused kernel per shape, vs three launches; the best."""
    time_us = kernel_timer("cuda")
    rows = []
    for arch, (Hq, Hkv, D) in ARCHS.items():
        for B in (1, 8):
            for ctx in (128, 256, 512, 1024, 2048, 4096):
                c = decode_case(B, ctx, 4096, Hq, Hkv, D, 16, None, "cuda")
                fns = paths(c, Hq, Hkv, D)
                want = fns["three"]().float()
                row = {"arch": arch, "batch": B, "context": ctx, "three_us": time_us(fns["three"]), "fused": {}}
                for part in SWEEP_PARTITIONS:
                    for warps, stages in SWEEP_LAUNCH:
                        options = {"partition": part or None, "launch": {"num_warps": warps, "num_stages": stages}}
                        err = (fns["fused"](**options).float() - want).abs().max().item()
                        if err > 2e-2:
                            raise SystemExit(f"{arch} B={B} ctx={ctx} {options}: fused differs by {err}")
                        row["fused"][f"p{part}_w{warps}_s{stages}"] = time_us(lambda o=options, f=fns["fused"]: f(**o))
                best = min(row["fused"], key=row["fused"].get)
                row.update(best=best, best_us=row["fused"][best], best_speedup=row["three_us"] / row["fused"][best])
                rows.append(row)
                console.print(f"{arch} B={B} ctx={ctx}: three {row['three_us']:.1f} us, best fused {best} "
                              f"{row['best_us']:.1f} us ({row['best_speedup']:.2f}x)")
    # the launch options best summed over all shapes at the planned partitions (what the engine runs)
    launch = min((f"w{w}_s{s}" for w, s in SWEEP_LAUNCH), key=lambda lk: sum(r["fused"][f"p0_{lk}"] for r in rows))
    warps, stages = (int(x[1:]) for x in launch.split("_"))
    t = Table("arch", "B", "context", "three µs", *[f"p{p or ' plan'}" for p in SWEEP_PARTITIONS], "best",
              title=f"fused decode attention, µs per layer at {launch} ({gpu_name()})")
    for r in rows:
        t.add_row(r["arch"], str(r["batch"]), str(r["context"]), f"{r['three_us']:.1f}",
                  *[f"{r['fused'][f'p{p}_{launch}']:.1f}" for p in SWEEP_PARTITIONS], r["best"])
    console.print(t)
    console.print(f"set FUSED_LAUNCH = {{'num_warps': {warps}, 'num_stages': {stages}}}")
    from onecard.bench.results import write_result

    path = write_result("kernel_decode_attention_sweep", {
        "gpu": gpu_name(), "rows": rows, "best_num_warps": warps, "best_num_stages": stages,
        "three_us_total": sum(r["three_us"] for r in rows),
        "planned_fused_us_total": sum(r["fused"][f"p0_{launch}"] for r in rows)}, out_dir)
    console.print(f"wrote {path}")


def main() -> None:
    a = parse()
    console = Console()
    if a.sweep:
        sweep(console, a.out)
        return
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if a.smoke:
        import tempfile

        archs, block, batches, contexts, width, fmts = {"tiny": (4, 2, 16)}, 8, (1, 2), (37, 150), 256, (None,)
        out_dir = a.out or tempfile.mkdtemp(prefix="kernel_decode_attention_")
    else:
        archs, block, batches, contexts, width, fmts = ARCHS, 16, (1, 8, 64), (256, 1024, 4096), 4096, (None, FP8)
        out_dir = a.out
    time_us = kernel_timer(device)
    t_start = time.perf_counter()
    rows = []
    for arch, (Hq, Hkv, D) in archs.items():
        for fmt in fmts:
            for B in batches:
                for ctx in contexts:
                    c = decode_case(B, ctx, width, Hq, Hkv, D, block, fmt, device)
                    fns = paths(c, Hq, Hkv, D)
                    err = (fns["three"]().float() - fns["fused"]().float()).abs().max().item()
                    if err > 2e-2:
                        raise SystemExit(f"{arch} B={B} ctx={ctx} {fmt}: fused differs from three launches by {err}")
                    us = {name: time_us(fn) for name, fn in fns.items()}
                    part, splits = split_plan(B, Hkv, c["bt"].shape[1] * block, max(SPLIT_TILE, block))
                    rows.append({"arch": arch, "cache": "fp8" if fmt == FP8 else "bf16", "batch": B, "context": ctx,
                                 "table_tokens": width, "three_us": us["three"], "fused_us": us["fused"],
                                 "speedup": us["three"] / us["fused"], "saved_us": us["three"] - us["fused"],
                                 "max_abs_diff": err, "splits": splits, "partition": part})
    result = {"gpu": gpu_name() if device == "cuda" else "cpu (interpreter)", "device": device, "block_size": block,
              "rows": rows, "elapsed_s": time.perf_counter() - t_start}
    one = [r for r in rows if r["batch"] == 1 and r["cache"] == "bf16" and r["context"] == min(contexts)]
    for r in one:
        result[f"{r['arch']}_bs1_ctx{r['context']}_speedup"] = r["speedup"]
        result[f"{r['arch']}_bs1_ctx{r['context']}_saved_us_per_layer"] = r["saved_us"]

    t = Table("arch", "cache", "B", "context", "three µs", "fused µs", "speed-up", "saved µs", "plan",
              title=f"decode attention per layer: three launches vs one ({device})")
    for r in rows:
        t.add_row(r["arch"], r["cache"], str(r["batch"]), str(r["context"]), f"{r['three_us']:.1f}",
                  f"{r['fused_us']:.1f}", f"{r['speedup']:.2f}x", f"{r['saved_us']:.1f}",
                  f"{r['splits']}x{r['partition']}")
    console.print(t)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for B, color in zip(batches, ("tab:blue", "tab:orange", "tab:green")):
            for cache, style in (("bf16", "-"), ("fp8", "--")):
                pts = [r for r in rows if r["arch"] == arch and r["batch"] == B and r["cache"] == cache]
                if pts:
                    ax.plot([r["context"] for r in pts], [r["speedup"] for r in pts], style, marker="o", color=color,
                            label=f"B={B} {cache}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("three launches / fused (time)")
        ax.set_title(arch)
        ax.legend(fontsize=7)
    fig.suptitle(f"decode attention: one launch vs three ({result['gpu']})")
    publish("kernel_decode_attention", result, fig, out_dir, console)


if __name__ == "__main__":
    main()
