"""Weight-only int4 / int8 kernels (``onecard.kernels.wo_matmul``) vs bf16 cuBLAS, per linear shape, one process.

    PYTHONPATH=src python benchmarks/quant_kernels.py           # H100: ~1 min, the configs in wo_matmul.CONFIGS
    PYTHONPATH=src python benchmarks/quant_kernels.py --sweep   # H100: ~10 min, tries the config grids and prints
                                                                #   CONFIGS tables to paste into wo_matmul.py and
                                                                #   wo_mma.py
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/quant_kernels.py --smoke   # CPU (Triton interpreter), tiny shapes, < 2 min

Shapes: the Llama-2-7B linears as the engine fuses them (K x N: qkv 4096x12288,
o 4096x4096, gate_up 4096x22016, down 11008x4096); M = 1-128 (decode batch) and
2048 (prefill). Each M runs what the engine runs (from ``dequant_min_rows`` rows
on, the dequantize + cuBLAS path); ``--sweep`` times the config grid up to 128
rows, from 32 rows against the dequantize path too. int4 is group 128
(asymmetric, the GPTQ-g128 layout); int8 is per-channel by default, as the
engine's ``quantization="int8"`` runs it (``--int8-group 128`` for g128).
Each case is checked against ``wo_matmul_reference`` and timed with
``onecard.bench.timing.graph_time_us`` (inside a CUDA graph, as the engine's
decode step runs them, so the microseconds are the GPU's and not the Python
launch's; L2 flushed before each call, so the weights come from HBM as in a
real decode step; the memset and cast a split-K launch adds are included). Reported: us, effective GB/s
(quantized bytes read / time), that as % of the bf16 GEMV's measured GB/s on
the same shape (M = 1), speedup vs bf16 ``F.linear``, and the same for a whole
layer (sum of the four shapes: what one decode step spends per layer).
Writes docs/results/quant_kernels.json (+ PNG).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from onecard.bench.results import publish, speedup_bars
from onecard.bench.timing import kernel_timer
from onecard.kernels import wo_mma
from onecard.kernels.wo_matmul import (
    CONFIGS,
    DEQUANT_GEMM_MIN_M,
    KernelConfig,
    dequant_gemm,
    dequant_min_rows,
    pick_config,
    wo_matmul,
    wo_matmul_reference,
)

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 2048)
SWEPT_MAX_M = 128  # decode batches; longer inputs are prefills, which the dequantize + cuBLAS path serves


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes; output to a temp dir")
    p.add_argument("--sweep", action="store_true", help="try the config grid per (M, bits); print the best as CONFIGS")
    p.add_argument("--int8-group", type=int, default=-1, help="int8 group size (-1 = per-channel, the engine's int8)")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


def packed_weight(K: int, N: int, bits: int, group: int, device: str) -> tuple[torch.Tensor, ...]:
    """Random codes in the kernel layout (speed does not depend on how codes were chosen)."""
    g = torch.Generator(device=device).manual_seed(K * 7 + N + bits)
    qweight = torch.randint(-2**31, 2**31 - 1, (K * bits // 32, N), dtype=torch.int32, device=device, generator=g)
    groups = -(-K // group)
    scales = (torch.rand(groups, N, device=device, generator=g) * 0.02 + 0.001).half()
    zeros = torch.randint(1, 2**bits, (groups, N), device=device, generator=g).half()
    return qweight, scales, zeros



def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def candidates(M: int, bits: int, smoke: bool) -> list[KernelConfig]:
    """The sweep grid for one (M, bits): wide at M = 1 (the decode case that matters most), narrower above.

    4-bit rows up to M = 2 sweep ``gemv_bf16x2`` (what bf16 activations run on an Ampere-or-later GPU; the fp32
    ``gemv`` is its fallback elsewhere), 8-bit ones the ``gemv``; at M = 1 each with and without the prefetch.
    From M = 4 the ``dot`` and the transposed ``dot_t`` (its tiles one group: 16 word rows at 4-bit, 32 at 8-bit);
    above 16 rows ``dot_t`` alone, with row tiles of 16 up to M (at most 128), which the sweep times against the
    dequantize + cuBLAS path.
    """
    g = 128 * bits // 32  # word rows in a 128-channel group: 16 (int4), 32 (int8)
    bm = 1 << (M - 1).bit_length()
    gemv = "gemv_bf16x2" if bits == 4 and M <= 2 else "gemv"
    out: list[KernelConfig] = []
    if M <= 8:
        wide = M == 1
        for bn in (32, 64, 128):
            for kp in (g // 2, g, 2 * g):
                for warps in ((4, 8) if wide else (4,)):
                    for waves in ((0, 2, 4, 8) if wide else (0, 2, 4)):
                        for prefetch in ((False, True) if wide else (False,)):
                            out.append(KernelConfig(gemv, bm, bn, kp, float(waves), warps, 3, prefetch))
    if M > 16:
        for bm in (128, 64, 32, 16):  # the widest first: the smoke run's one dot_t takes tiles of several 16-row blocks
            for bn in (64, 128, 256):
                for waves in (1, 2):
                    for warps in (4, 8):
                        if bm <= M:
                            out.append(KernelConfig("dot_t", bm, bn, g, float(waves), warps, 3))
    elif M >= 4:
        for bn in (64, 128):
            for kp in (16, 32):
                for waves in (0, 1, 2, 4):
                    for warps in (4, 8):
                        out.append(KernelConfig("dot", 16, bn, kp, float(waves), warps, 3))
        for bn in (64, 128, 256):  # the transposed dot: tiles inside one 128-channel group
            for waves in (1, 2, 4):
                for warps in (4, 8):
                    out.append(KernelConfig("dot_t", 16, bn, g, float(waves), warps, 3))
    if smoke:  # one of each kernel: exercises the sweep's code, not its search
        out = [next(c for c in out if c.kernel == k) for k in ("gemv", "gemv_bf16x2", "dot", "dot_t")
               if any(c.kernel == k for c in out)]
    return out


MMA = "mma"  # the engine's path for int4 g128 at 2-64 and int8 per-channel at 1-32 rows of bf16 x on CUDA:
# onecard.kernels.wo_mma (Gluon)


def mma_candidates(rows: int) -> list[wo_mma.MmaConfig]:
    """The sweep grid of ``kernels.wo_mma`` for its row bucket ``rows`` (8, 16, 32): the bucket's row tile, 64 or 128
    columns, 4 or 8 warps (16 columns each at least), 3 or 4 stages, split-K from 1.5 to 8 programs per SM."""
    return [wo_mma.MmaConfig(rows, bn, warps, stages, waves)
            for bn in (64, 128) for warps in (4, 8) if 16 * warps <= bn
            for stages in (3, 4) for waves in (1.5, 3.0, 6.0, 8.0)]


def short(c: KernelConfig | str | None) -> str:
    if c is None:
        return "dequantize + cuBLAS"
    if c == MMA:
        return "wo_mma (Gluon, tensor cores)"
    return (f"{c.kernel} m{c.block_m} n{c.block_n} kp{c.block_kp} waves{c.waves:g} "
            f"warps{c.num_warps} stages{c.num_stages}{' prefetch' if c.prefetch else ''}")


def main() -> None:
    a = parse()
    console = Console()
    if a.smoke:
        device, dtype = "cpu", torch.float32
        shapes, ms = {"a": (256, 384), "b": (256, 128)}, (1, 4, 16, 32)
        out_dir = a.out or tempfile.mkdtemp(prefix="quant_kernels_")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --smoke on CPU")
        device, dtype, shapes, ms, out_dir = "cuda", torch.bfloat16, SHAPES, MS, a.out
    fl = "bf16" if dtype == torch.bfloat16 else "fp32"
    groups = {4: 128, 8: a.int8_group}

    def group(bits: int, K: int) -> int:
        """The kernel group size of ``bits``-bit weights with ``K`` inputs (per-channel: K)."""
        return K if groups[bits] == -1 else groups[bits]

    bench = kernel_timer(device)
    t_start = time.perf_counter()
    weights = {(bits, s): packed_weight(K, N, bits, group(bits, K), device)
               for bits in (4, 8) for s, (K, N) in shapes.items()}
    xs = {(M, K): torch.randn(M, K, device=device, dtype=dtype) for M in ms for K in {k for k, _ in shapes.values()}}
    refs = {(bits, s, M): wo_matmul_reference(xs[M, shapes[s][0]], *weights[bits, s], bits, group(bits, shapes[s][0]))
            for bits in (4, 8) for s in shapes for M in ms}

    result: dict = {"device": device, "dtype": fl, "int4_group": 128, "int8_group": a.int8_group, "sweep": a.sweep,
                    "shapes": {s: list(kn) for s, kn in shapes.items()}}
    # the float baseline: F.linear on an [N, K] weight, as the engine's bf16 path runs it
    for s, (K, N) in shapes.items():
        w = torch.randn(N, K, device=device, dtype=dtype) * 0.02
        for M in ms:
            result[f"{fl}_m{M}_{K}x{N}_us"] = bench(lambda x=xs[M, K], w=w: F.linear(x, w))
        result[f"{fl}_m1_{K}x{N}_gbs"] = K * N * w.element_size() / result[f"{fl}_m1_{K}x{N}_us"] / 1e3

    def run(bits: int, s: str, M: int, config: KernelConfig | wo_mma.MmaConfig | str | None) -> tuple[float, float]:
        """(us, relative error) of one linear; ``config`` None is the dequantize + cuBLAS path, MMA wo_mma with its
        table, an ``MmaConfig`` wo_mma with that config."""
        K = shapes[s][0]
        gs = group(bits, K)

        def fn() -> torch.Tensor:
            if config is None:
                return dequant_gemm(xs[M, K], *weights[bits, s], bits, gs)
            if config == MMA or isinstance(config, wo_mma.MmaConfig):
                return wo_mma.wo_mma(xs[M, K], *weights[bits, s], bits, None if config == MMA else config)
            return wo_matmul(xs[M, K], *weights[bits, s], bits, gs, config)
        err = rel_err(fn(), refs[bits, s, M])
        if err > 2e-2:
            raise SystemExit(f"int{bits} {s} M={M} {config}: relative error {err:.2e} vs wo_matmul_reference")
        return bench(fn), err

    def engine_config(M: int, bits: int) -> KernelConfig | str | None:
        """What the engine runs at M rows: None is the dequantize + cuBLAS path (CUDA, from dequant_min_rows,
        the same for every shape here: g128 and per-channel tiles hold one group), MMA the Gluon kernel."""
        deq = any(M >= dequant_min_rows(bits, group(bits, K), K) for K, _ in shapes.values())
        if device == "cuda" and deq:
            return None
        if all(wo_mma.pick(xs[M, K], bits, group(bits, K), N) for K, N in shapes.values()):
            return MMA
        return pick_config(M, bits)

    best: dict[tuple[int, int], KernelConfig | None] = {}  # None: the dequantize + cuBLAS path won
    if a.sweep:
        for bits in (4, 8):
            for M in (m for m in ms if m <= SWEPT_MAX_M):
                def layer_us(c: KernelConfig | None, bits: int = bits, M: int = M) -> float:
                    return sum(run(bits, s, M, c)[0] for s in shapes)

                scored = [(layer_us(c), c) for c in candidates(M, bits, a.smoke)]
                us, c = min(scored, key=lambda t: t[0])
                for stages in (() if a.smoke else (2, 4)):  # second pass: pipelining depth of the winner
                    alt = dataclasses.replace(c, num_stages=stages)
                    alt_us = layer_us(alt)
                    if alt_us < us:
                        us, c = alt_us, alt
                if device == "cuda" and M >= 32:  # and the path the engine takes from dequant_min_rows
                    deq_us = layer_us(None)
                    if deq_us < us:
                        us, c = deq_us, None
                best[M, bits] = c
                console.print(f"int{bits} M={M}: {len(scored)} configs, best {short(c)} ({us:.1f} us per layer), "
                              f"{time.perf_counter() - t_start:.0f} s so far")

    if a.sweep and device == "cuda" and wo_mma.gluon is not None:  # and wo_mma's own table, one bucket at a time
        swept = False
        for bits, table in wo_mma.CONFIGS.items():
            qkv_k, qkv_n = shapes["qkv"]
            for bucket in table:
                if wo_mma.pick(xs[bucket, qkv_k], bits, group(bits, qkv_k), qkv_n) is None:
                    continue  # not on this GPU (compute capability), this Triton, or (int8 in groups) these codes
                scored = [(sum(run(bits, s, bucket, c)[0] for s in shapes), c) for c in mma_candidates(bucket)]
                us, table[bucket] = min(scored, key=lambda t: t[0])  # the rows below time the swept table
                swept = True
                console.print(f"wo_mma int{bits} M={bucket}: {len(scored)} configs, best {table[bucket]} "
                              f"({us:.1f} us per layer)")
        if swept:
            console.print("[bold]paste into src/onecard/kernels/wo_mma.py:[/]")
            print("CONFIGS: dict[int, dict[int, MmaConfig]] = {")
            for bits, table in wo_mma.CONFIGS.items():
                rows = ", ".join(f"{b}: MmaConfig({c.block_m}, {c.block_n}, {c.num_warps}, {c.stages}, {c.waves})"
                                 for b, c in sorted(table.items()))
                print(f"    {bits}: {{{rows}}},")
            print("}")

    rows = []
    for bits in (4, 8):
        q = f"int{bits}"
        for M in ms:
            config = best[M, bits] if (M, bits) in best else engine_config(M, bits)
            layer_q = layer_f = 0.0
            for s, (K, N) in shapes.items():
                us, err = run(bits, s, M, config)
                nbytes = sum(t.numel() * t.element_size() for t in weights[bits, s])
                key = f"{q}_m{M}_{K}x{N}"
                result[f"{key}_us"], result[f"{key}_rel_err"] = us, err
                result[f"{key}_gbs"] = nbytes / us / 1e3
                result[f"{key}_pct_of_{fl}_gemv_bw"] = 100 * result[f"{key}_gbs"] / result[f"{fl}_m1_{K}x{N}_gbs"]
                result[f"{key}_speedup_vs_{fl}"] = result[f"{fl}_m{M}_{K}x{N}_us"] / us
                layer_q, layer_f = layer_q + us, layer_f + result[f"{fl}_m{M}_{K}x{N}_us"]
                rows.append((q, s, f"{K}x{N}", M, us, result[f"{key}_gbs"], result[f"{key}_pct_of_{fl}_gemv_bw"],
                             result[f"{fl}_m{M}_{K}x{N}_us"], result[f"{key}_speedup_vs_{fl}"]))
            result[f"{q}_m{M}_config"] = short(config)
            result[f"{q}_m{M}_layer_us"] = layer_q
            result[f"{q}_m{M}_layer_speedup_vs_{fl}"] = layer_f / layer_q
            if config == MMA:  # and the Triton kernel it replaced, side by side
                triton_us = sum(run(bits, s, M, pick_config(M, bits))[0] for s in shapes)
                result[f"{q}_m{M}_triton_config"] = short(pick_config(M, bits))
                result[f"{q}_m{M}_triton_layer_us"] = triton_us
                result[f"{q}_m{M}_mma_speedup_vs_triton"] = triton_us / layer_q
    result["elapsed_s"] = time.perf_counter() - t_start

    t = Table("w", "linear", "KxN", "M", "us", "GB/s", f"% {fl} GEMV BW", f"{fl} us", "speedup",
              title=f"weight-only matmul vs {fl} ({device}{', swept' if a.sweep else ''})")
    for q, s, kn, M, us, gbs, pct, fus, sp in rows:
        t.add_row(q, s, kn, str(M), f"{us:.1f}", f"{gbs:.0f}", f"{pct:.0f}%", f"{fus:.1f}", f"{sp:.2f}x")
    console.print(t)
    lt = Table("w", "M", "config", "layer us", f"layer speedup vs {fl}", "Triton kernel us (wo_mma rows)",
               title="per layer (sum of the four linears)")
    for bits in (4, 8):
        for M in ms:
            k = f"int{bits}_m{M}"
            tri = result.get(f"{k}_triton_layer_us")
            lt.add_row(f"int{bits}", str(M), result[f"{k}_config"], f"{result[f'{k}_layer_us']:.1f}",
                       f"{result[f'{k}_layer_speedup_vs_{fl}']:.2f}x", "" if tri is None else f"{tri:.1f}")
    console.print(lt)
    if best:
        table = dict(CONFIGS)
        # PDL is an end-to-end choice (quant_decode.py), not a kernel time: each row keeps the setting of the table
        # row that serves its M now
        table.update({(M, bits): dataclasses.replace(c, pdl=pick_config(M, bits).pdl)
                      for (M, bits), c in best.items() if c is not None})
        for bits in (4, 8) if device == "cuda" else ():
            won = sorted(M for (M, b), c in best.items() if b == bits and c is None)
            console.print(f"int{bits}: dequantize + cuBLAS " + (f"won from M = {won[0]} (rows at or above it: "
                          f"{won}); DEQUANT_GEMM_MIN_M is {DEQUANT_GEMM_MIN_M}" if won else
                          f"won at no swept M up to {SWEPT_MAX_M}; DEQUANT_GEMM_MIN_M is {DEQUANT_GEMM_MIN_M}"))
        console.print("[bold]paste into src/onecard/kernels/wo_matmul.py:[/]")
        print("CONFIGS: dict[tuple[int, int], KernelConfig] = {")
        for (M, bits), c in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            m = "2**31" if M == 2**31 else str(M)
            flags = (", prefetch=True" if c.prefetch else "") + ("" if c.pdl else ", pdl=False")
            print(f"    ({m}, {bits}): KernelConfig(\"{c.kernel}\", {c.block_m}, {c.block_n}, {c.block_kp}, "
                  f"{c.waves}, {c.num_warps}, {c.num_stages}{flags}),")
        print("}")

    fig = speedup_bars({f"int{bits}": [result[f"int{bits}_m{M}_layer_speedup_vs_{fl}"] for M in ms] for bits in (4, 8)},
                       [f"M={M}" for M in ms], f"speedup vs {fl} (one layer's linears)",
                       f"onecard weight-only matmul ({device})")
    publish("quant_kernels", result, fig, out_dir, console)


if __name__ == "__main__":
    main()
