"""Dense decode GEMV (``onecard.kernels.gemv``) vs cuBLAS ``F.linear``, per Llama linear and per layer, one process.

    PYTHONPATH=src python benchmarks/kernel_gemv.py           # H100: ~1 min, the configs in gemv.CONFIGS
    PYTHONPATH=src python benchmarks/kernel_gemv.py --sweep   # H100: ~4 min, tries the block grid per M and prints
                                                              #   a CONFIGS table to paste into gemv.py
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/kernel_gemv.py --smoke   # CPU interpreter, tiny shapes

Shapes: the linears of a Llama-2-7B, Llama-3-8B and Llama-2-13B layer (and a
13B rank's shard under tensor parallelism 2) as the engine fuses them (qkv, o,
gate_up, down) and each model's LM head (the sweep scores every arch's layer); M = the rows in
``CONFIGS`` (1, 2, 4 with --sweep), bf16. Two timings, both inside CUDA graphs as the engine replays them:

- per linear, L2 flushed before each call (``graph_time_us``);
- a chain of ``--chain-layers`` distinct layers' four linears back to back
  (several GB of weights, so nothing stays in L2 and no flush is needed): the
  time per layer a bs=1 decode step spends in matmuls, as % of the bandwidth
  roofline (bytes / measured device-copy bandwidth);
- the gate/up linear at M = 1 with ``silu(gate) * up`` in its epilogue (``gated=True``, what the engine's MLP
  runs) against the GEMV then the ``silu_mul`` kernel, the same chain of distinct weights.

Every case is checked against ``F.linear`` first. Writes
docs/results/kernel_gemv.json (+ PNG).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from onecard.bench.results import publish, speedup_bars
from onecard.bench.timing import graph_time_us, kernel_timer
from onecard.kernels.gemv import (
    CONFIGS,
    K_MULTIPLE,
    UNEVEN_K_CONFIGS,
    GemvConfig,
    gemv,
    pick_config,
)
from onecard.kernels.swiglu import silu_mul_triton

ARCHS = {  # N x K of nn.Linear weights (out, in)
    "llama-2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
                   "lm_head": (32000, 4096)},
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                   "lm_head": (128256, 4096)},
    "llama-2-13b": {"qkv": (15360, 5120), "o": (5120, 5120), "gate_up": (27648, 5120), "down": (5120, 13824),
                    "lm_head": (32000, 5120)},
    "llama-2-13b-tp2": {"qkv": (7680, 5120), "o": (5120, 2560), "gate_up": (13824, 5120), "down": (5120, 6912),
                        "lm_head": (32000, 5120)},  # one rank's shard under tensor parallelism 2
}
SWEEP_CHAIN = 8  # the sweep times each linear as this many distinct weights of its shape back to back
LAYER = ("qkv", "o", "gate_up", "down")
SWEEP_MS = (1, 2, 4)  # the sweep tries these; a plain run measures the M in CONFIGS


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes; output to a temp dir")
    p.add_argument("--sweep", action="store_true", help="try the block grid per M; print the best as CONFIGS")
    p.add_argument("--sweep-m", default=",".join(map(str, SWEEP_MS)), help="the M the sweep tries (comma list)")
    p.add_argument("--chain-layers", type=int, default=8, help="distinct layers in the back-to-back chain timing")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


def candidates(M: int, smoke: bool) -> list[GemvConfig]:
    bm = 1 << (M - 1).bit_length()
    if smoke:
        return [GemvConfig(bm, 4, 64), GemvConfig(bm, 8, 32, 2)]
    ns, ks, warps = ((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (1, 2, 4, 8)) if M == 1 else \
        ((2, 4, 8), (256, 512, 1024), (4, 8))
    return [GemvConfig(bm, n, k, w) for n in ns for k in ks for w in warps if n * k * bm <= 16384 * w]


def short(c: GemvConfig | None) -> str:
    return "cuBLAS" if c is None else \
        f"m{c.block_m} n{c.block_n} k{c.block_k} warps{c.num_warps}{f' prefetch{c.prefetch}' if c.prefetch else ''}"


def main() -> None:
    a = parse()
    console = Console()
    if a.smoke:
        device, dtype, chain = "cpu", torch.float32, 2
        archs = {"tiny": {"qkv": (96, 64), "o": (64, 64), "gate_up": (256, 64), "down": (64, 128), "lm_head": (512, 64)}}
        out_dir = a.out or tempfile.mkdtemp(prefix="kernel_gemv_")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --smoke on CPU")
        device, dtype, archs, chain, out_dir = "cuda", torch.bfloat16, ARCHS, a.chain_layers, a.out
    bench = kernel_timer(device)
    ms = tuple(int(m) for m in a.sweep_m.split(",")) if a.sweep else tuple(CONFIGS)
    t_start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {(arch, s): torch.randn(*nk, device=device, dtype=dtype, generator=gen) * 0.02
               for arch, shapes in archs.items() for s, nk in shapes.items()}
    xs = {(M, K): torch.randn(M, K, device=device, dtype=dtype, generator=gen)
          for M in ms for K in {k for shapes in archs.values() for _, k in shapes.values()}}

    def fn_for(arch: str, s: str, M: int, config: GemvConfig | None):
        w = weights[arch, s]
        x = xs[M, w.shape[1]]
        if config is None:
            return lambda: F.linear(x, w)
        out = gemv(x, w, config=config)
        ref = F.linear(x.float(), w.float())
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if err > 1e-2:
            raise SystemExit(f"gemv {arch} {s} M={M} {config}: relative error {err:.2e} vs F.linear")
        return lambda: gemv(x, w, config=config)

    best: dict[int, GemvConfig] = {}  # swept: K a multiple of K_MULTIPLE
    best_uneven: dict[int, GemvConfig] = {}  # swept: other K
    sweep_scores: dict = {}
    # distinct weights back to back need no L2 flush between calls: a small one keeps the graph's memsets cheap
    chain_bench = (lambda fn: graph_time_us(fn, calls=4, flush_mib=1)) if device == "cuda" else bench
    if a.sweep:
        # scored as decode streams them: distinct weights back to back (a flushed single call adds a ramp-up the
        # engine's chain of PDL launches hides), summed over every arch's layer, the TP shard included; shapes
        # whose K is a multiple of K_MULTIPLE and the others are scored apart (CONFIGS and UNEVEN_K_CONFIGS)
        copies = {(arch, s): [w] + [torch.randn_like(w) for _ in range(SWEEP_CHAIN - 1)]
                  for (arch, s), w in weights.items() if s in LAYER}
        for M in ms:
            scored = []
            for c in candidates(M, a.smoke):
                us = {key: chain_bench(lambda ws=ws, M=M, c=c: [gemv(xs[M, w.shape[1]], w, config=c) for w in ws])
                      / SWEEP_CHAIN for key, ws in copies.items()}
                even = sum(v for (arch, s), v in us.items() if archs[arch][s][1] % K_MULTIPLE == 0)
                uneven = sum(us.values()) - even
                scored.append((even, uneven, c))
                sweep_scores[f"sweep_m{M}_{short(c).replace(' ', '_')}_even_k_us"] = even
                sweep_scores[f"sweep_m{M}_{short(c).replace(' ', '_')}_uneven_k_us"] = uneven
            even_us, _, best[M] = min(scored, key=lambda t: t[0])
            uneven_us, best_uneven[M] = min((t[1], t[2]) for t in scored)
            console.print(f"M={M}: {len(scored)} configs, best {short(best[M])} ({even_us:.1f} us, the linears with "
                          f"K a multiple of {K_MULTIPLE}), {short(best_uneven[M])} ({uneven_us:.1f} us, the others), "
                          f"{time.perf_counter() - t_start:.0f} s so far")
        copies.clear()

    def pick(M: int, K: int) -> GemvConfig:
        return pick_config(M, K, {**CONFIGS, **best}, {**UNEVEN_K_CONFIGS, **best_uneven})

    from onecard.bench.engine_bench import measure_copy_bandwidth

    bw = measure_copy_bandwidth(torch.device(device)) if device == "cuda" else None
    result: dict = {"device": device, "dtype": str(dtype).removeprefix("torch."), "sweep": a.sweep, **sweep_scores,
                    "measured_copy_bandwidth_gbs": bw, "chain_layers": chain,
                    "shapes_n_x_k": {arch: {s: list(nk) for s, nk in sh.items()} for arch, sh in archs.items()}}
    rows = []
    for M in ms:
        result[f"gemv_m{M}_config"] = short(pick(M, K_MULTIPLE))
        result[f"gemv_m{M}_uneven_k_config"] = short(pick(M, K_MULTIPLE + 1))
        for arch, shapes in archs.items():
            for s, (N, K) in shapes.items():
                ours, theirs = bench(fn_for(arch, s, M, pick(M, K))), bench(fn_for(arch, s, M, None))
                nbytes = N * K * weights[arch, s].element_size()
                key = f"{arch}_{s}_m{M}"
                result.update({f"{key}_gemv_us": ours, f"{key}_cublas_us": theirs, f"{key}_speedup_vs_cublas": theirs / ours,
                               f"{key}_gemv_gbs": nbytes / ours / 1e3, f"{key}_cublas_gbs": nbytes / theirs / 1e3})
                rows.append((arch, s, f"{N}x{K}", M, ours, theirs, nbytes / ours / 1e3, nbytes / theirs / 1e3))

    def chain_us(arch: str, M: int, ours: bool) -> float:
        """Per layer, ``chain`` distinct layers back to back (no flush: they do not fit in L2)."""
        layers = [{s: torch.randn(*archs[arch][s], device=device, dtype=dtype, generator=gen) * 0.02 for s in LAYER}
                  for _ in range(chain)]
        x = {k: xs[M, k] for k in {archs[arch][s][1] for s in LAYER}}

        def run() -> None:
            for layer in layers:
                for s in LAYER:
                    w = layer[s]
                    if ours:
                        gemv(x[w.shape[1]], w, config=pick(M, w.shape[1]))
                    else:
                        F.linear(x[w.shape[1]], w)
        us = bench(run) / chain
        layers.clear()  # free this chain before the next one
        return us

    for arch, shapes in archs.items():
        layer_bytes = sum(shapes[s][0] * shapes[s][1] for s in LAYER) * torch.tensor([], dtype=dtype).element_size()
        for M in ms:
            ours, theirs = chain_us(arch, M, True), chain_us(arch, M, False)
            key = f"{arch}_layer_m{M}"
            result.update({f"{key}_gemv_us": ours, f"{key}_cublas_us": theirs, f"{key}_speedup_vs_cublas": theirs / ours})
            if bw:
                result.update({f"{key}_gemv_roofline_fraction": layer_bytes / ours / 1e3 / bw,
                               f"{key}_cublas_roofline_fraction": layer_bytes / theirs / 1e3 / bw})
    # silu(gate) * up in the gate/up GEMV's epilogue (gated=True: the engine's bf16 MLP at bs=1) against the GEMV and
    # then the silu_mul kernel, each over ``chain`` distinct gate/up weights back to back
    gated_rows = []
    for arch, shapes in archs.items() if 1 in ms else ():
        N, K = shapes["gate_up"]
        ws = [torch.randn(N, K, device=device, dtype=dtype, generator=gen) * 0.02 for _ in range(chain)]
        x, c = xs[1, K], pick(1, K)
        if not torch.equal(gemv(x, ws[0], config=c, gated=True), silu_mul_triton(gemv(x, ws[0], config=c))):
            raise SystemExit(f"gated gemv {arch}: not the bits of gemv then silu_mul")
        two = chain_bench(lambda: [silu_mul_triton(gemv(x, w, config=c)) for w in ws]) / chain
        one = chain_bench(lambda: [gemv(x, w, config=c, gated=True) for w in ws]) / chain
        key = f"{arch}_gate_up_m1"
        result.update({f"{key}_gemv_then_silu_mul_us": two, f"{key}_gated_epilogue_us": one,
                       f"{key}_gated_saved_us": two - one})
        gated_rows.append((arch, two, one))
        ws.clear()
    result["elapsed_s"] = time.perf_counter() - t_start

    t = Table("arch", "linear", "NxK", "M", "gemv us", "cuBLAS us", "speedup", "gemv GB/s", "cuBLAS GB/s",
              title=f"decode GEMV vs cuBLAS, L2 flushed ({device}{', swept' if a.sweep else ''})")
    for arch, s, nk, M, ours, theirs, g1, g2 in rows:
        t.add_row(arch, s, nk, str(M), f"{ours:.1f}", f"{theirs:.1f}", f"{theirs / ours:.2f}x", f"{g1:.0f}", f"{g2:.0f}")
    console.print(t)
    lt = Table("arch", "M", "config", "gemv us/layer", "cuBLAS us/layer", "speedup", "gemv % roofline",
               "cuBLAS % roofline", title=f"{chain} layers back to back, per layer"
               + (f" (copy bandwidth {bw:.0f} GB/s)" if bw else ""))
    for arch in archs:
        for M in ms:
            k = f"{arch}_layer_m{M}"
            pct = (lambda f: f"{100 * result[f]:.1f}" if f in result else "-")
            lt.add_row(arch, str(M), f"{result[f'gemv_m{M}_config']} / {result[f'gemv_m{M}_uneven_k_config']}", f"{result[f'{k}_gemv_us']:.1f}",
                       f"{result[f'{k}_cublas_us']:.1f}", f"{result[f'{k}_speedup_vs_cublas']:.2f}x",
                       pct(f"{k}_gemv_roofline_fraction"), pct(f"{k}_cublas_roofline_fraction"))
    console.print(lt)
    gt = Table("arch", "GEMV + silu_mul us", "gated GEMV us", "saved us", title=f"gate/up at M=1, {chain} layers back to back")
    for arch, two, one in gated_rows:
        gt.add_row(arch, f"{two:.2f}", f"{one:.2f}", f"{two - one:.2f}")
    console.print(gt)
    if best:
        console.print("[bold]paste into src/onecard/kernels/gemv.py:[/]")
        # prefetch (weight tiles before the PDL wait) is kept as set by hand: it pays only behind a kernel that
        # is not a GEMV, which these chains do not have, so engine runs decide it (see gemv._gemv_kernel)
        for name, old, new in (("CONFIGS", CONFIGS, best), ("UNEVEN_K_CONFIGS", UNEVEN_K_CONFIGS, best_uneven)):
            print(f"{name}: dict[int, GemvConfig] = {{")
            for M, c in sorted({**old, **new}.items()):
                keep = old[M].prefetch if M in old else 0
                print(f"    {M}: GemvConfig({c.block_m}, {c.block_n}, {c.block_k}, {c.num_warps}"
                      f"{f', prefetch={keep}' if keep else ''}),")
            print("}")

    fig = speedup_bars({arch: [result[f"{arch}_layer_m{M}_speedup_vs_cublas"] for M in ms] for arch in archs},
                       [f"M={M}" for M in ms], "speedup vs cuBLAS (one layer's linears)",
                       f"onecard decode GEMV, {dtype} ({device})")
    publish("kernel_gemv", result, fig, out_dir, console)


if __name__ == "__main__":
    main()
