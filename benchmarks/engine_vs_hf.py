"""onecard's engine vs HF transformers generate, one process, one GPU: Llama-2-7B architecture, bf16, random weights.

    PYTHONPATH=src python benchmarks/engine_vs_hf.py            # H100: ~6-9 min, ~40 GB disk cache, writes docs/results/
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --smoke    # CPU, tiny model, ~1 min, writes to a temp dir
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-async   # H100: ~5-6 min, engine only, sync vs async
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-gemv    # H100: ~5-6 min, engine only, cuBLAS vs GEMV
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-admit   # engine only, admission one by one vs batched
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-attention   # engine only, decode attention 3 launches vs 1
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-pdl   # engine only, programmatic dependent launch off/on
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-kv --num-prompts 1000   # engine only, bf16 vs fp8 KV
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-prefill-rope --kv-cache-dtype fp8   # prefill RoPE+store
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --arch llama-3-8b --compare-kv   # another architecture (GQA)
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-fp8-weights --kv-cache-dtype fp8   # bf16 vs fp8 weights
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --compare-order --kv-cache-dtype fp8 --quantization fp8  # queue order

Measures (see onecard.bench.engine_bench): bs=1 decode tok/s and ms/token (ours,
HF dynamic cache, HF static cache) and % of the bandwidth roofline (measured copy
bandwidth); offline throughput on --num-prompts lognormal prompts (mean 256 in /
256 out, seeded) ours vs HF batched generate (HF on --hf-prompts, extrapolated per
useful token); peak GiB; KV-cache waste; and the engine again under a 24 GiB
process cap (an RTX 4090's memory). The random 7B checkpoint is built on the GPU
once and cached (~13 GB under ~/.cache/onecard, or --model DIR to use your own).

--compare-async runs only our engine, twice in one process: async scheduling off
(the host reads each step's tokens before preparing the next) and on (the host
prepares step t+1 while the GPU runs step t), same workload, same roofline;
writes docs/results/engine_async.json + .png. --compare-gemv does the same with
the decode GEMV off (cuBLAS for every linear) and on (``decode_gemv``, the
default): docs/results/engine_gemv.json + .png. --compare-admit with waiting
requests admitted as soon as one seat frees (``admit_batch_size=1``) and in
batches (the default, ``max_num_seqs // 8`` seats): docs/results/engine_admit.json. --compare-attention with
each layer's decode attention as three launches (RoPE + KV store, split, merge: ``fused_decode_attention=False``)
and as one (the default): docs/results/engine_fused_attention.json. --compare-pdl with the decode kernels
launched plainly and with programmatic dependent launch (``programmatic_launch``): docs/results/engine_pdl.json.
--compare-kv with the KV cache in bf16 and in fp8 (``kv_cache_dtype="fp8"``; its perplexity cost is in
engine_kv_quant.json): at large batches decode reads more KV than weights, so this is the offline-throughput lever;
docs/results/engine_kv_fp8.json. --compare-prefill-rope with prefill's RoPE and KV-cache write as PyTorch ops
(``fused_prefill_rope=False``) and as the decode's one Triton kernel (the default):
docs/results/engine_prefill_rope.json. --compare-fp8-weights with bf16 weights and with ``quantization="fp8"``
(e4m3 weights and activations, ``_scaled_mm``; its roofline column counts bf16's bytes for both):
docs/results/engine_fp8_weights.json. --compare-order with the offline requests queued as drawn and longest output
first (``LLM.generate``'s default ``order``; HF's batches are queued the same way in the full run):
docs/results/engine_offline_order.json. ``--kv-cache-dtype`` sets the cache of both runs of a comparison that does
not choose it (the result name gets ``_<dtype>``), ``--quantization`` their weights (``_<method>`` too).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

from rich.console import Console

from onecard.bench.engine_bench import (
    EngineBenchConfig,
    GiB,
    measure_copy_bandwidth,
    results_figure,
    results_table,
    run_engine,
    run_engine_bench,
    workload,
)
from onecard.bench.results import save_figure, write_result
from onecard.testing.checkpoints import benchmark_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on CPU, small workload; output to a temp dir")
    p.add_argument("--model", default=None, help="model folder (default: random --arch, full size, bf16, built on the GPU)")
    p.add_argument("--arch", default="llama-2-7b",
                   help="built-in architecture of the random model (the issue's is llama-2-7b); another one's results "
                        "are written as <name>_<arch>.json")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--hf-prompts", type=int, default=64, help="prompts HF batched generate runs (extrapolated)")
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--cap-gib", type=float, default=24.0, help="process memory cap for the second engine run (0 = skip)")
    p.add_argument("--cap-num-prompts", type=int, default=None, help="prompts for the capped run (default: all)")
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256, help="the engine's max_num_seqs (offline batch)")
    p.add_argument("--no-hf-static", action="store_true", help="skip HF's static-cache run")
    p.add_argument("--kv-cache-dtype", default="auto", help="a comparison's KV cache (both runs), unless it sets it")
    p.add_argument("--quantization", default=None, help="a comparison's weights (both runs, e.g. fp8), unless it sets them")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    for what, (_, title, (base, _), (new, _)) in COMPARISONS.items():
        p.add_argument(f"--compare-{what}", action="store_true",
                       help=f"only our engine, {title}: {base} vs {new} (bs=1 decode + offline), in one process")
    return p.parse_args()


def main() -> None:
    a = parse()
    console = Console()
    if a.smoke:
        from onecard.testing import make_random_checkpoint

        model = a.model or make_random_checkpoint(a.arch, "tiny")
        cfg = EngineBenchConfig(model, dtype="float32", device="cpu", num_prompts=12, mean_input=24, mean_output=16,
                                max_model_len=256, decode_prompt_len=16, decode_tokens=16, hf_prompts=4, hf_batch=4,
                                memory_cap_gib=None, max_num_seqs=8, run_hf_static=not a.no_hf_static)
        out_dir = a.out or tempfile.mkdtemp(prefix="engine_vs_hf_")
    else:
        model = benchmark_model(a.model, a.arch, console)
        cfg = EngineBenchConfig(model, num_prompts=a.num_prompts, hf_prompts=a.hf_prompts, hf_batch=a.hf_batch,
                                memory_cap_gib=a.cap_gib or None, cap_num_prompts=a.cap_num_prompts,
                                decode_tokens=a.decode_tokens, run_hf_static=not a.no_hf_static,
                                max_num_seqs=a.max_num_seqs)
        out_dir = a.out
    what = next((w for w in COMPARISONS if getattr(a, f"compare_{w.replace('-', '_')}")), None)
    if what is not None:
        result = compare(cfg, what, console, a.kv_cache_dtype, a.quantization)
        console.print(compare_table(result, what))
        name, fig = COMPARISONS[what][0], compare_figure(result, what)
        if a.kv_cache_dtype != "auto" and what != "kv":
            name = f"{name}_{a.kv_cache_dtype}"
        if a.quantization and what != "fp8-weights":
            name = f"{name}_{a.quantization}"
    elif a.quantization:
        raise SystemExit("--quantization sets the weights of a --compare-* run; the full run compares bf16 with HF")
    else:
        result = run_engine_bench(cfg, console)
        console.print(results_table(result))
        name, fig = "engine_vs_hf", results_figure(result)
    if a.arch != "llama-2-7b":
        name = f"{name}_{a.arch}"
    path = write_result(name, result, out_dir)
    png = save_figure(fig, name, out_dir)
    console.print(f"wrote {path} and {png}")


# what -> (result name, title, (baseline label, engine options), (new label, engine options))
COMPARISONS = {
    "async": ("engine_async", "async scheduling", ("sync", {"async_scheduling": False}), ("async", {"async_scheduling": True})),
    "gemv": ("engine_gemv", "decode GEMV", ("cublas", {"decode_gemv": False}), ("gemv", {"decode_gemv": True})),
    "admit": ("engine_admit", "batched admission", ("one_by_one", {"admit_batch_size": 1}), ("batched", {})),
    "attention": ("engine_fused_attention", "one-launch decode attention",
                  ("three_launches", {"fused_decode_attention": False}), ("one_launch", {"fused_decode_attention": True})),
    "pdl": ("engine_pdl", "programmatic dependent launch", ("no_pdl", {"programmatic_launch": False}),
            ("pdl", {"programmatic_launch": True})),
    "kv": ("engine_kv_fp8", "fp8 KV cache", ("bf16_kv", {"kv_cache_dtype": "auto"}),
           ("fp8_kv", {"kv_cache_dtype": "fp8"})),
    "prefill-rope": ("engine_prefill_rope", "prefill RoPE + KV write in one kernel",
                     ("pytorch_rope", {"fused_prefill_rope": False}), ("fused", {"fused_prefill_rope": True})),
    "fp8-weights": ("engine_fp8_weights", "fp8 weights and activations (W8A8)",
                    ("bf16_weights", {"quantization": None}), ("fp8_weights", {"quantization": "fp8"})),
    "order": ("engine_offline_order", "offline queue order", ("submitted", {"offline_order": "submitted"}),
              ("longest_first", {"offline_order": "longest_first"})),
}


def compare(cfg: EngineBenchConfig, what: str, console, kv_cache_dtype: str = "auto",
            quantization: str | None = None) -> dict:
    """Our engine with one option off, then on: same process, device, workload and roofline; ``kv_cache_dtype`` and
    ``quantization`` for both runs unless the comparison sets them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from onecard.bench.results import gpu_name
    from onecard.engine.llm import resolve_device
    from onecard.models import open_model_folder

    _, _, *modes = COMPARISONS[what]
    (base, _), (new, _) = modes
    device = resolve_device(cfg.device)
    args = open_model_folder(cfg.model).model_args()
    reqs = workload(cfg, args.vocab_size)
    bw = measure_copy_bandwidth(device)
    result: dict = {"model": str(cfg.model), "architecture": args.architecture, "dtype": cfg.dtype,
                    "device": str(device), "device_name": gpu_name(), "measured_copy_bandwidth_gbs": bw,
                    "num_prompts": len(reqs), "decode_prompt_len": cfg.decode_prompt_len,
                    "decode_tokens": cfg.decode_tokens, "max_num_seqs": cfg.max_num_seqs,
                    "kv_cache_dtype": kv_cache_dtype if what != "kv" else "compared",
                    "quantization": quantization if what != "fp8-weights" else "compared"}
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        for mode, options in modes:
            options = dict(options)  # offline_order is the benchmark's setting, every other key an engine option
            run_cfg = replace(cfg, offline_order=options.pop("offline_order", cfg.offline_order))
            result.update(run_engine(run_cfg, reqs, device, progress, mode,
                                     **{"kv_cache_dtype": kv_cache_dtype, "quantization": quantization, **options}))
    step_bytes = result[f"{base}_decode_step_weight_gib"] * GiB + (
        cfg.decode_prompt_len + cfg.decode_tokens / 2) * result[f"{base}_kv_bytes_per_token"]
    roof = bw * 1e9 / step_bytes
    result.update({"bs1_bytes_per_token": step_bytes, "bs1_roofline_tok_s": roof,
                   **{f"{m}_bs1_roofline_fraction": result[f"{m}_bs1_tok_s"] / roof for m, _ in modes},
                   f"{new}_bs1_speedup": result[f"{new}_bs1_tok_s"] / result[f"{base}_bs1_tok_s"],
                   f"{new}_offline_speedup": result[f"{new}_offline_output_tok_s"] / result[f"{base}_offline_output_tok_s"],
                   "bs1_ms_per_token_saved": result[f"{base}_bs1_ms_per_token"] - result[f"{new}_bs1_ms_per_token"]})
    return result


def compare_table(r: dict, what: str):
    from rich.table import Table

    _, title, (base, _), (new, _) = COMPARISONS[what]

    t = Table("engine", "bs=1 tok/s", "ms/token", "% roofline", "offline out tok/s", "offline steps", "peak GiB",
              title=f"{title}: {r['architecture']} {r['dtype']} on {r['device_name']} "
                    f"(copy bandwidth {r['measured_copy_bandwidth_gbs']:.0f} GB/s, roofline "
                    f"{r['bs1_roofline_tok_s']:.1f} tok/s)")
    for m in (base, new):
        peak = r.get(f"{m}_peak_gib")
        t.add_row(m, f"{r[f'{m}_bs1_tok_s']:.1f}", f"{r[f'{m}_bs1_ms_per_token']:.2f}",
                  f"{100 * r[f'{m}_bs1_roofline_fraction']:.1f}", f"{r[f'{m}_offline_output_tok_s']:.0f}",
                  str(r[f"{m}_offline_steps"]), "-" if peak is None else f"{peak:.2f}")
    t.add_row(f"{new} / {base}", f"{r[f'{new}_bs1_speedup']:.3f}x", f"{-r['bs1_ms_per_token_saved']:+.2f}", "",
              f"{r[f'{new}_offline_speedup']:.3f}x", "", "")
    return t


def compare_figure(r: dict, what: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    _, title, (base, _), (new, _) = COMPARISONS[what]
    names = [base, new]
    a.bar(names, [r[f"{m}_bs1_tok_s"] for m in names], color="tab:blue")
    a.axhline(r["bs1_roofline_tok_s"], color="tab:red", ls="--", label="bandwidth roofline")
    a.set_ylabel("tok/s")
    a.set_title("bs=1 decode")
    a.legend()
    b.bar(names, [r[f"{m}_offline_output_tok_s"] for m in names], color="tab:green")
    b.set_ylabel("output tok/s")
    b.set_title(f"offline: {r['num_prompts']} lognormal prompts")
    fig.suptitle(f"{title}: {r['architecture']} {r['dtype']} on {r['device_name']}")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
