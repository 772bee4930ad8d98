"""Quantized models on a 24 GB card (issue 5's memory targets), each under a process cap, in one process.

    PYTHONPATH=src python benchmarks/quant_memory.py           # H100/H200: ~2-4 min, writes docs/results/
    PYTHONPATH=src python benchmarks/quant_memory.py --smoke   # CPU, tiny shapes, < 1 min, writes to a temp dir

Rows (random int4 g128 codes built in memory: no dense 13B or 34B model ever exists; values do not change the
work): Llama-2-13B arch (its 4k positions lifted to 8k, as a RoPE-scaled fine-tune has) with ``max_model_len`` 8192, one 8,000-token prompt prefilled then 64 tokens decoded;
CodeLlama-34B arch with ``max_model_len`` 2048, a 512-token prompt and 64 tokens. Each row: whether the engine's
start-up and the generation ran under the ``--cap-gib`` cap, the allocator's peak, the weights, the KV tokens
the engine sized its cache to, prefill seconds, bs=1 decode tok/s, and the planner's prediction for the same job
on a card of the cap's size. Targets: both fit under 24 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.engine_bench import _sync
from onecard.bench.results import gpu_name, memory_capped, save_figure, write_result
from onecard.testing.random_llama import in_memory_llm, random_llama

GiB = 1 << 30
ROWS = (("13b_int4_8k", "llama-2-13b", 8192, 8000), ("34b_int4", "codellama-34b", 2048, 512))
SMOKE_ROWS = (("13b_int4_8k", "llama-2-13b", 256, 200), ("34b_int4", "codellama-34b", 128, 64))


def _planned(cfg: dict, cap_gib: float, max_model_len: int, prompt: int) -> dict:
    """The planner's verdict for this job on a card the size of the cap (the live card's figures otherwise)."""
    from onecard.plan import plan_inference, resolve_card

    card = resolve_card(None) if torch.cuda.is_available() else resolve_card("4090")
    plan = plan_inference(cfg, dataclasses.replace(card, memory_gib=cap_gib), bits=4, max_model_len=max_model_len,
                          max_num_seqs=1, prefill_tokens=prompt, gpu_memory_utilization=0.9)
    return {"planned_fits": plan.fits, "planned_total_gib": plan.total_gib}


def run_row(key: str, arch: str, max_model_len: int, prompt: int, decode: int, device: torch.device,
            cap_gib: float, smoke: bool, console) -> dict:
    from onecard.engine import SamplingParams
    from onecard.errors import DoesNotFitError
    from onecard.quant.linear import QuantLinear

    dtype = torch.float32 if smoke else torch.bfloat16
    t0 = time.perf_counter()
    model, cfg = random_llama(arch, "tiny" if smoke else "full", 4, dtype, max_model_len,
                              overrides={"max_position_embeddings": max_model_len})  # Llama-2-13B: 4k natively
    row = {"row": key, "arch": arch, "max_model_len": max_model_len, "prompt_tokens": prompt, "decode_tokens": decode,
           "build_s": time.perf_counter() - t0, **_planned(cfg, cap_gib, max_model_len, prompt)}
    row["weights_gib"] = (sum(p.numel() * p.element_size() for p in model.parameters())
                          + sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))) / GiB
    console.print(f"[dim]{arch} int4: {row['weights_gib']:.1f} GiB of weights, {max_model_len} context...[/]")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        llm, _ = in_memory_llm(model, device, max_model_len, max_num_seqs=1)
        vocab = model.args.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, vocab, (prompt,), generator=g).tolist() for _ in range(3)]

        def timed(p: list[int], n: int) -> float:
            _sync(device)
            t = time.perf_counter()
            llm.generate([p], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            _sync(device)
            return time.perf_counter() - t

        timed(prompts[0], 2)  # warm-up (kernels compile); fresh prompts after it, so no prefix-cache hit
        prefill = timed(prompts[1], 1)
        full = timed(prompts[2], decode)
        stats = llm.stats()
        row.update(fits=True, prefill_s=prefill, decode_tok_s=(decode - 1) / max(full - prefill, 1e-9),
                   kv_cache_tokens=stats["kv_blocks_total"] * llm.config.block_size)
        del llm
    except (DoesNotFitError, torch.cuda.OutOfMemoryError) as e:
        row.update(fits=False, reason=str(e).splitlines()[0][:300])
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; output to a temp dir")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    console = Console()
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke on CPU")
    device = torch.device("cpu" if a.smoke else "cuda")
    with memory_capped(device, a.cap_gib):
        rows = [run_row(key, arch, mml, prompt, 8 if a.smoke else a.decode_tokens, device, a.cap_gib, a.smoke, console)
                for key, arch, mml, prompt in (SMOKE_ROWS if a.smoke else ROWS)]
    result = {"device_name": gpu_name(), "cap_gib": a.cap_gib if device.type == "cuda" else None,
              "cap_enforced": device.type == "cuda", "weights": "random int4 g128 codes (QuantLinear), bf16 rest",
              "rows": rows, "target": "both rows fit under 24 GiB"}
    for r in rows:  # flat keys for the README and the planner's calibration scan
        result.update({f"{k}_{r['row']}": r.get(k) for k in ("fits", "peak_gib", "weights_gib", "decode_tok_s",
                                                              "kv_cache_tokens", "planned_fits")})
    t = Table("row", "fits", "weights GiB", "peak GiB", "KV tokens", "prefill s", "decode tok/s", "planner",
              title=f"int4 under a {a.cap_gib:g} GiB cap on {result['device_name']}")
    for r in rows:
        f = lambda k, fmt="{:.2f}": "-" if r.get(k) is None else fmt.format(r[k])  # noqa: E731
        t.add_row(f"{r['arch']} ({r['max_model_len']} ctx)", str(r["fits"]), f("weights_gib"), f("peak_gib"),
                  f("kv_cache_tokens", "{:,}"), f("prefill_s"), f("decode_tok_s", "{:.1f}"),
                  f"{'fits' if r['planned_fits'] else 'does not fit'} ({r['planned_total_gib']:.1f} GiB)")
    console.print(t)
    out = a.out or (tempfile.mkdtemp(prefix="quant_memory_") if a.smoke else None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    labels = [f"{r['arch']} int4, {r['max_model_len']} ctx" for r in rows]
    ax.barh(labels, [r["weights_gib"] for r in rows], color="tab:blue", label="weights")
    ax.barh(labels, [(r["peak_gib"] or 0) - r["weights_gib"] for r in rows], left=[r["weights_gib"] for r in rows],
            color="tab:orange", label="KV cache + activations (peak)")
    if result["cap_gib"]:
        ax.axvline(result["cap_gib"], color="tab:red", linestyle="--", label=f"{result['cap_gib']:g} GiB cap")
    ax.set_xlabel("GiB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    console.print(f"wrote {write_result('quant_memory', result, out)} and {save_figure(fig, 'quant_memory', out)}")


if __name__ == "__main__":
    main()
