"""Where a decode step's time goes, per kernel kind, in the bf16 / int8 / int4 engine arms, and how fast each
quantized arm could be with its weights (and KV cache) streamed perfectly: the bounds behind issue 5's targets.

    PYTHONPATH=src python benchmarks/quant_decode_profile.py          # H100: ~3 min; random Llama-2-7B arch
    PYTHONPATH=src python benchmarks/quant_decode_profile.py --smoke  # CPU, tiny random model, writes to a temp dir

torch.profiler records the kernels of the engine's CUDA-graph replays (CPU ops, self time, on the CPU) over a
generation of N + 1 tokens, minus one of 1 token (prefill and first sample), which leaves N decode steps; the
prompts are ``--prompt-len`` random tokens, the same in both runs. PDL is off (``programmatic_launch=False``) so
kernel times do not overlap and add up to the step; with PDL (the engine's default on Hopper, what
``quant_decode.py`` measures) each kernel's start overlaps the previous one's tail and steps are a little shorter.

Kinds: linears (every matmul kernel, the LM head included), attention, norms, silu·up, other (sampling,
copies). The bounds, per quantized arm and batch size, against bf16's profiled step in the same process:

  perfect weights:        weight bytes / copy bandwidth + every other kernel as profiled
  perfect weights and KV: weight bytes / copy bandwidth + KV-cache bytes / copy bandwidth (attention replaced by
                          the cache it must read: the profiled runs' mean context) + the other kernels as profiled

``max_speedup_*`` is bf16's profiled step over that ideal step: no kernel for the linears, however good, can take
the arm past it while the other kernels stay as they are. Issue 5's targets: int4 3.0x and int8 1.8x at bs=1,
int4 2.5x at bs=16.
"""

from __future__ import annotations

import argparse
import gc
import tempfile

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.engine_bench import measure_copy_bandwidth
from onecard.bench.kernel_profile import by_kind, kind_names, minus, profile_events, time_per_name
from onecard.bench.results import gpu_name, save_figure, write_result
from onecard.engine.offload import resident_step_bytes
from onecard.testing.checkpoints import benchmark_model

KINDS = (("linears", r"_wo_|gemv|gemm|nvjet|cutlass|xmma|splitkreduce|int4pack|aten::(mm|addmm|linear|matmul)$"),
         ("attention", r"attention|attn|paged|decode_fused|rope|flash|fmha"),
         ("norms", r"norm"),
         ("silu_up", r"silu|swiglu"))
KIND_NAMES = kind_names(KINDS)
TARGETS = {("int4", 1): 3.0, ("int8", 1): 1.8, ("int4", 16): 2.5}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on CPU; output to a temp dir")
    p.add_argument("--model", default=None, help="float model folder (default: random llama-2-7b, bf16)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args(argv)


def step_kinds(llm, batch: int, prompt_len: int, n: int, vocab: int) -> tuple[dict[str, float], dict[str, float]]:
    """(µs per decode step by kind, µs per step by kernel name) over ``n`` steps of ``batch`` sequences."""
    from onecard.engine import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]

    def run(tokens: int):
        return lambda: llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
                                    use_tqdm=False)

    run(8)()  # warm-up: compiles and captures the graphs
    per_name = minus(time_per_name(profile_events(run(n + 1))), time_per_name(profile_events(run(1))), 1 / n)
    return by_kind(per_name, KINDS), per_name


def kv_bytes_per_step(args, batch: int, mean_context: float, elem_bytes: int) -> float:
    """Bytes of keys and values a decode step reads at a mean context (every layer, K and V)."""
    return batch * mean_context * args.num_layers * 2 * args.num_kv_heads * args.head_dim * elem_bytes


def bounds(kinds: dict[str, float], ref_total_us: float, weights_us: float, kv_us: float) -> dict[str, float]:
    """An arm's ideal steps (µs) and the most it could gain over the reference's step (see the module docstring)."""
    rest = sum(kinds.values()) - kinds["linears"]
    ideal_w = weights_us + rest
    ideal_wkv = weights_us + kv_us + rest - kinds["attention"]
    return {"ideal_step_us_perfect_weights": ideal_w, "ideal_step_us_perfect_weights_and_kv": ideal_wkv,
            "max_speedup_perfect_weights": ref_total_us / ideal_w,
            "max_speedup_perfect_weights_and_kv": ref_total_us / ideal_wkv}


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    console = Console()
    if a.smoke:
        from onecard.testing import make_random_checkpoint

        model_dir = a.model or make_random_checkpoint("llama-2-7b", "tiny")
        device, dtype = "cpu", "float32"
        a.decode_tokens, a.prompt_len, a.batch_sizes = 4, 16, "1,4"
        out_dir = a.out or tempfile.mkdtemp(prefix="quant_decode_profile_")
    else:
        model_dir = benchmark_model(a.model, "llama-2-7b", console)
        device, dtype, out_dir = "cuda", "bfloat16", a.out
    from onecard.engine import LLM

    sizes = [int(b) for b in a.batch_sizes.split(",")]
    bw = measure_copy_bandwidth(torch.device(device))
    fl = "bf16" if dtype == "bfloat16" else "fp32"
    n = a.decode_tokens
    mean_context = a.prompt_len + (n + 1) / 2
    result: dict = {"model": str(model_dir), "dtype": dtype, "copy_bandwidth_gbs": bw, "decode_steps": n,
                    "prompt_len": a.prompt_len, "mean_context_tokens": mean_context, "batch_sizes": sizes,
                    "programmatic_launch": False, "reference_arm": fl}
    tops: dict[tuple[str, int], list[tuple[str, float]]] = {}
    for arm, quant in ((fl, None), ("int8", "int8"), ("int4", "rtn-int4")):
        console.print(f"[bold]{arm}[/] ...")
        gc.collect()
        llm = LLM(str(model_dir), dtype=dtype, device=device, quantization=quant, max_model_len=a.prompt_len + n + 64,
                  max_num_seqs=max(sizes), gpu_memory_utilization=0.85, programmatic_launch=False)
        model = llm.engine.runner.model
        weights_us = resident_step_bytes(model) / (bw * 1e3)
        kv_elem = torch.finfo(getattr(torch, dtype)).bits // 8
        for bs in sizes:
            kinds, per_name = step_kinds(llm, bs, a.prompt_len, n, model.args.vocab_size)
            total = sum(kinds.values())
            key = f"{arm}_bs{bs}"
            result.update({f"{key}_{k}_us_per_step": v for k, v in kinds.items()})
            result[f"{key}_total_us_per_step"] = total
            result[f"{key}_weights_at_copy_bandwidth_us"] = weights_us
            kv = kv_bytes_per_step(model.args, bs, mean_context, kv_elem)
            result[f"{key}_kv_at_copy_bandwidth_us"] = kv / (bw * 1e3)
            tops[(arm, bs)] = sorted(per_name.items(), key=lambda kv: -kv[1])[:4]
        del llm, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for arm in ("int8", "int4"):
        for bs in sizes:
            key = f"{arm}_bs{bs}"
            kinds = {k: result[f"{key}_{k}_us_per_step"] for k in KIND_NAMES}
            ref = result[f"{fl}_bs{bs}_total_us_per_step"]
            result[f"{key}_profiled_speedup_vs_{fl}"] = ref / result[f"{key}_total_us_per_step"]
            b = bounds(kinds, ref, result[f"{key}_weights_at_copy_bandwidth_us"],
                       result[f"{key}_kv_at_copy_bandwidth_us"])
            result.update({f"{key}_{k}": v for k, v in b.items()})
            if (arm, bs) in TARGETS:
                result[f"{key}_target_speedup"] = TARGETS[(arm, bs)]
    _report(result, sizes, fl, tops, console)
    _plot(result, sizes, fl, out_dir, console)
    return result


def _report(result: dict, sizes: list[int], fl: str, tops, console) -> None:
    title = f"decode step by kernel kind, PDL off ({gpu_name()}, {result['copy_bandwidth_gbs']:.0f} GB/s copy)"
    t = Table("arm", "bs", *[f"{c} µs" for c in KIND_NAMES], "total µs", "vs " + fl, "max (perfect W)",
              "max (perfect W+KV)", "target", title=title)
    for arm in (fl, "int8", "int4"):
        for bs in sizes:
            g = lambda k: result.get(f"{arm}_bs{bs}_{k}")  # noqa: E731
            f = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
            t.add_row(arm, str(bs), *[f(g(f"{c}_us_per_step"), ".0f") for c in KIND_NAMES],
                      f(g("total_us_per_step"), ".0f"),
                      f(g(f"profiled_speedup_vs_{fl}")), f(g("max_speedup_perfect_weights")),
                      f(g("max_speedup_perfect_weights_and_kv")), f(g("target_speedup"), ".1f"))
    console.print(t)
    for (arm, bs), rows in tops.items():
        console.print(f"{arm} bs={bs} top kernels: " + "; ".join(f"{us:.0f} µs {name[:70]}" for name, us in rows))


def _plot(result: dict, sizes: list[int], fl: str, out_dir, console) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(arm, bs) for bs in sizes for arm in (fl, "int8", "int4")]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    left = [0.0] * len(bars)
    for c in KIND_NAMES:
        vals = [result[f"{arm}_bs{bs}_{c}_us_per_step"] / 1e3 for arm, bs in bars]
        ax.barh(range(len(bars)), vals, left=left, label=c)
        left = [x + v for x, v in zip(left, vals)]
    for i, (arm, bs) in enumerate(bars):
        ideal = result.get(f"{arm}_bs{bs}_ideal_step_us_perfect_weights")
        if ideal is not None:
            ax.plot([ideal / 1e3] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
    ax.set_yticks(range(len(bars)), [f"{arm} bs={bs}" for arm, bs in bars])
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step (PDL off); black: the step with perfectly streamed weights")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Where a decode step goes, {result['model'].rsplit('/', 1)[-1]} ({gpu_name()})")
    fig.tight_layout()
    path = write_result("quant_decode_profile", result, out_dir)
    png = save_figure(fig, "quant_decode_profile", out_dir)
    console.print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
