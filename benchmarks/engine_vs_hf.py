"""onecard's engine vs HF transformers generate, one process, one GPU: Llama-2-7B architecture, bf16, random weights.

    PYTHONPATH=src python benchmarks/engine_vs_hf.py            # H100: ~6-9 min, ~40 GB disk cache, writes docs/results/
    PYTHONPATH=src python benchmarks/engine_vs_hf.py --smoke    # CPU, tiny model, ~1 min, writes to a temp dir

Measures (see onecard.bench.engine_bench): bs=1 decode tok/s and ms/token (ours,
HF dynamic cache, HF static cache) and % of the bandwidth roofline (measured copy
bandwidth); offline throughput on --num-prompts lognormal prompts (mean 256 in /
256 out, seeded) ours vs HF batched generate (HF on --hf-prompts, extrapolated per
useful token); peak GiB; KV-cache waste; and the engine again under a 24 GiB
process cap (an RTX 4090's memory). The random 7B checkpoint is built on the GPU
once and cached (~13 GB under ~/.cache/onecard, or --model DIR to use your own).
"""

from __future__ import annotations

import argparse
import tempfile

from rich.console import Console

from onecard.bench.engine_bench import (
    EngineBenchConfig,
    results_figure,
    results_table,
    run_engine_bench,
)
from onecard.bench.results import save_figure, write_result
from onecard.testing.checkpoints import benchmark_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on CPU, small workload; output to a temp dir")
    p.add_argument("--model", default=None, help="model folder (default: random llama-2-7b, full size, bf16, built on the GPU)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--hf-prompts", type=int, default=64, help="prompts HF batched generate runs (extrapolated)")
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--cap-gib", type=float, default=24.0, help="process memory cap for the second engine run (0 = skip)")
    p.add_argument("--cap-num-prompts", type=int, default=None, help="prompts for the capped run (default: all)")
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--no-hf-static", action="store_true", help="skip HF's static-cache run")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


def main() -> None:
    a = parse()
    console = Console()
    if a.smoke:
        from onecard.testing import make_random_checkpoint

        model = a.model or make_random_checkpoint("llama-2-7b", "tiny")
        cfg = EngineBenchConfig(model, dtype="float32", device="cpu", num_prompts=12, mean_input=24, mean_output=16,
                                max_model_len=256, decode_prompt_len=16, decode_tokens=16, hf_prompts=4, hf_batch=4,
                                memory_cap_gib=None, max_num_seqs=8, run_hf_static=not a.no_hf_static)
        out_dir = a.out or tempfile.mkdtemp(prefix="engine_vs_hf_")
    else:
        model = benchmark_model(a.model, "llama-2-7b", console)
        cfg = EngineBenchConfig(model, num_prompts=a.num_prompts, hf_prompts=a.hf_prompts, hf_batch=a.hf_batch,
                                memory_cap_gib=a.cap_gib or None, cap_num_prompts=a.cap_num_prompts,
                                decode_tokens=a.decode_tokens, run_hf_static=not a.no_hf_static)
        out_dir = a.out
    result = run_engine_bench(cfg, console)
    console.print(results_table(result))
    path = write_result("engine_vs_hf", result, out_dir)
    fig = results_figure(result)
    png = save_figure(fig, "engine_vs_hf", out_dir)
    console.print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
