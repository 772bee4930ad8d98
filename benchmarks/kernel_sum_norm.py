"""The fused TP sum + residual add + RMSNorm kernel (``kernels.sum_norm``) vs the sum as its own all-reduce, 2 GPUs.

    PYTHONPATH=src python benchmarks/kernel_sum_norm.py    # 2 GPUs with P2P (2x H100/H200): ~1 min

What a TP=2 decode step does 80 times (Llama-2-13B: hidden 5120, bf16): a
row-parallel linear's partial rows summed over the ranks, added to the residual
and normalised. Three ways, each timed per rank 0 as a CUDA graph of 80
[o-proj-sized GEMV, sum] pairs (the GEMV is what the sum waits for in decode;
its own graph is timed too and subtracted) at --rows rows:

- fused: ``dist.tp.SumAddNorm``, one PDL-aware kernel (what the engine uses up to ``FUSED_MAX_ROWS`` rows);
- one-shot: PyTorch's symmetric-memory one-shot all-reduce (``dist.tp.SymmMemAllReduce``, what
  ``tp_all_reduce="one-shot"`` uses) then the add+norm kernel;
- NCCL: ``dist.all_reduce`` then the add+norm kernel;
- at 1 row also gemv-push, the engine's bs=1 path: the GEMV's epilogue pushes its partial into every rank's sum
  buffer (``SumAddNorm.push_targets``) and the fused kernel sums it from there, storing nothing itself.

Every way's output is checked against NCCL + add+norm first. Writes docs/results/kernel_sum_norm.json (+ PNG).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import publish, speedup_bars
from onecard.dist.launch import spawn

SUMS = 80  # a 13B decode step's row-parallel sums (40 layers x 2)
WAYS = ("fused", "one-shot", "nccl")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--rows", default="1,8,32", help="rows per sum (decode batch sizes), comma list")
    p.add_argument("--replays", type=int, default=15)
    p.add_argument("--out", default=None, help="result folder (default docs/results)")
    return p.parse_args()


def _graph_us_per_call(step, replays: int) -> float:
    """Median microseconds per ``step(i)`` over replays of a graph of ``SUMS`` calls, the ranks lined up before
    each replay."""
    import torch.distributed as dist

    for i in range(4):  # compile outside the capture
        step(i)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(SUMS):
            step(i)
    times = []
    for _ in range(replays + 1):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2] / SUMS * 1e6


def _worker(hidden: int, rows_list: list[int], replays: int, out: str) -> None:
    import torch.distributed as dist

    from onecard.dist.launch import init_distributed
    from onecard.dist.tp import SumAddNorm, SymmMemAllReduce
    from onecard.kernels.gemv import gemv
    from onecard.kernels.rmsnorm import add_rmsnorm_triton

    env, device = init_distributed("cuda")
    dtype, group = torch.bfloat16, dist.group.WORLD
    fused = SumAddNorm(group, torch.device(device), dtype, hidden, max_rows=max(rows_list))
    one_shot = SymmMemAllReduce(group, torch.device(device), dtype)
    g = torch.Generator(device=device).manual_seed(env.rank)
    w_o = torch.randn(hidden, hidden // 2, device=device, dtype=dtype, generator=g) * 0.02  # a TP=2 o-proj shard
    x_o = torch.randn(1, hidden // 2, device=device, dtype=dtype, generator=g)
    result: dict = {}

    def nccl_sum(x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    def ways_for(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> dict:
        """Each way: the spacer GEMV, then a sum of x (of the GEMV's own output for gemv-push, at 1 row)."""
        ways = {"fused": lambda i: (gemv(x_o, w_o), fused(x, residual, weight, 1e-5, i % 2))[1],
                "one-shot": lambda i: (gemv(x_o, w_o), add_rmsnorm_triton(one_shot(x), residual, weight, 1e-5))[1],
                "nccl": lambda i: (gemv(x_o, w_o), add_rmsnorm_triton(nccl_sum(x), residual, weight, 1e-5))[1]}
        if x.shape[0] == 1:
            def push(i: int):
                own, pushes = fused.push_targets(1, i % 2)
                return fused(gemv(x_o, w_o, out=own, copies=pushes), residual, weight, 1e-5, i % 2)
            ways["gemv-push"] = push
        return ways

    for rows in rows_list:
        x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=g)
        shared = torch.Generator(device=device).manual_seed(rows)  # the residual and weight agree across ranks
        residual = torch.randn(rows, hidden, device=device, dtype=dtype, generator=shared)
        weight = torch.rand(hidden, device=device, dtype=dtype, generator=shared) + 0.5
        ways = ways_for(x, residual, weight)
        y_ref = add_rmsnorm_triton(nccl_sum(x), residual, weight, 1e-5)[0]
        for way, fn in ways.items():
            ref = add_rmsnorm_triton(nccl_sum(gemv(x_o, w_o)), residual, weight, 1e-5)[0] if way == "gemv-push" \
                else y_ref
            err = (fn(0)[0].float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
            if err > 2e-2:  # bf16: one rounding step of the sum may differ from NCCL's order
                raise SystemExit(f"{way} at {rows} rows: max relative error {err:.2e} vs NCCL + add+norm")
        spacer = _graph_us_per_call(lambda i: gemv(x_o, w_o), replays)
        result[f"rows{rows}_gemv_spacer_us"] = spacer
        for way, fn in ways.items():
            result[f"rows{rows}_{way}_us_per_sum"] = _graph_us_per_call(fn, replays) - spacer
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    torch.cuda.synchronize()
    dist.barrier()


def main() -> None:
    a = parse()
    console = Console()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs with P2P, found {torch.cuda.device_count()}")
    from onecard.dist.tp import symm_mem_unavailable

    why = symm_mem_unavailable(torch.device("cuda", 0), 2)
    if why:
        raise SystemExit(f"symmetric memory unavailable: {why}")
    rows_list = [int(r) for r in a.rows.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = f"{tmp}/timed.json"
        spawn(_worker, 2, (a.hidden, rows_list, a.replays, scratch), timeout_s=300)
        with open(scratch) as f:
            timed = json.load(f)
    result: dict = {"world_size": 2, "hidden": a.hidden, "dtype": "bfloat16", "sums_per_graph": SUMS,
                    "timing": "rank 0, CUDA graph of 80 [o-proj GEMV, sum] minus a graph of 80 GEMVs", **timed}
    t = Table("rows", *(f"{w} us/sum" for w in WAYS), "fused vs one-shot", "fused vs NCCL",
              title=f"TP=2 sum + add + RMSNorm, hidden {a.hidden}, bf16 ({torch.cuda.get_device_name(0)})")
    for rows in rows_list:
        us = {w: timed[f"rows{rows}_{w}_us_per_sum"] for w in WAYS}
        result[f"rows{rows}_speedup_vs_one_shot"] = us["one-shot"] / us["fused"]
        result[f"rows{rows}_speedup_vs_nccl"] = us["nccl"] / us["fused"]
        t.add_row(str(rows), *(f"{us[w]:.2f}" for w in WAYS), f"{us['one-shot'] / us['fused']:.2f}x",
                  f"{us['nccl'] / us['fused']:.2f}x")
    if "rows1_gemv-push_us_per_sum" in timed:
        push = timed["rows1_gemv-push_us_per_sum"]
        result["rows1_gemv_push_speedup_vs_fused"] = timed["rows1_fused_us_per_sum"] / push
        t.add_row("1, gemv-push", f"{push:.2f}", "", "", f"{timed['rows1_one-shot_us_per_sum'] / push:.2f}x",
                  f"{timed['rows1_nccl_us_per_sum'] / push:.2f}x")
    result["elapsed_s"] = time.perf_counter() - t0
    console.print(t)
    fig = speedup_bars({"vs one-shot + add+norm": [result[f"rows{r}_speedup_vs_one_shot"] for r in rows_list],
                        "vs NCCL + add+norm": [result[f"rows{r}_speedup_vs_nccl"] for r in rows_list]},
                       [f"{r} rows" for r in rows_list], "speedup of the fused kernel (time per sum)",
                       f"TP=2 sum + add + RMSNorm, hidden {a.hidden} ({torch.cuda.get_device_name(0)})")
    publish("kernel_sum_norm", result, fig, a.out, console)


if __name__ == "__main__":
    main()
