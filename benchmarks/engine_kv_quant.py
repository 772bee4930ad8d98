"""KV-cache quantization (issue 6.3): the context one 24 GiB card gains with fp8/int8 KV, the quality it costs, and
bs=1 decode speed; one process, one GPU.

    PYTHONPATH=src python benchmarks/engine_kv_quant.py            # H100: ~5-7 min (random Llama-3.1-8B bf16, cached)
    PYTHONPATH=src python benchmarks/engine_kv_quant.py --int4     # + int4 weights x fp8 KV up to 128k: ~3 min more
    PYTHONPATH=src python benchmarks/engine_kv_quant.py --smoke    # CPU, tiny models, < 2 min, writes to a temp dir

1. Max single-sequence context under --cap-gib (torch.cuda.set_per_process_memory_fraction), per KV format, found
   by search: a probe builds the engine with max_model_len=L and max_num_seqs=1, prefills L - --decode-tokens
   random tokens and decodes --decode-tokens. The first probe (--first-probe tokens) reports how many tokens the
   start-up sizing gave the cache; the next probes that (rounded down to --step, capped by the model's positions),
   then bisect down to --step when a long prefill runs out of memory. Llama-3.1-8B has Llama-3-8B's shapes and
   131072 positions. Issue 6 targets: bf16 weights + fp8 KV >= 64k; int4 weights + fp8 KV >= 128k (--int4,
   quantization='rtn-int4').
2. Quality: sliding-window perplexity of the project's tiny trained model (onecard.testing.tiny_model) on the
   stdlib validation text, every attention reading K/V back from a paged cache in each format
   (onecard.engine.kv_cache.logits_through_cache), in windows of the context it was trained at (256 tokens).
3. bs=1 greedy decode tok/s per format at each --decode-contexts prompt length (CUDA graphs).

--smoke runs all three on CPU with a tiny random Llama-3.1 in bf16 and a fixed KV byte budget (--smoke-kv-kib)
in place of the memory cap, so the context search still measures what the format buys.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import cap_process_memory, free_memory, publish
from onecard.engine import LLM, SamplingParams
from onecard.errors import DoesNotFitError
from onecard.testing.checkpoints import benchmark_model

GiB = 1 << 30


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU, small budget; output to a temp dir")
    p.add_argument("--model", default=None, help="model folder (default: random llama-3.1-8b, full size, bf16)")
    p.add_argument("--formats", default="auto,fp8", help="kv_cache_dtype values to compare (auto = bf16 KV)")
    p.add_argument("--int4", action="store_true", help="also search int4 weights (rtn-int4) x fp8 KV")
    p.add_argument("--cap-gib", type=float, default=24.0, help="per-process memory cap (an RTX 4090)")
    p.add_argument("--util", type=float, default=0.9, help="gpu_memory_utilization of every engine (the default)")
    p.add_argument("--chunk", type=int, default=4096, help="max_num_batched_tokens: prefill chunk of the probes")
    p.add_argument("--first-probe", type=int, default=4096)
    p.add_argument("--step", type=int, default=1024, help="search resolution in tokens")
    p.add_argument("--decode-tokens", type=int, default=4, help="tokens each capacity probe decodes")
    p.add_argument("--decode-contexts", default="1024,32768", help="prompt lengths of the tok/s runs")
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps timed per tok/s run")
    p.add_argument("--ppl-tokens", type=int, default=40_000, help="validation tokens the perplexity scores")
    p.add_argument("--smoke-kv-kib", type=int, default=96, help="--smoke: KV bytes budget standing in for the cap")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    a = p.parse_args()
    if a.smoke:
        a.first_probe, a.step, a.chunk, a.decode_contexts, a.decode_steps, a.ppl_tokens = 64, 16, 64, "128", 8, 2000
    return a



def _engine_kwargs(a: argparse.Namespace, model: str, fmt: str, quantization: str | None, device: str) -> dict:
    kw = {"kv_cache_dtype": fmt, "quantization": quantization, "max_num_seqs": 1, "max_num_batched_tokens": a.chunk,
          "enable_prefix_caching": False, "device": device, "gpu_memory_utilization": a.util}
    if a.smoke:  # CPU sizes the cache for max_model_len tokens: a fixed byte budget stands in for the GPU cap
        from onecard.engine.model_runner import kv_bytes_per_token
        from onecard.models.folder import open_model_folder
        from onecard.models.loader import build_model

        args = open_model_folder(model).model_args()
        per_token = kv_bytes_per_token(build_model(args, torch.bfloat16, "cpu"), torch.bfloat16, fmt)
        kw.update(dtype="bfloat16", num_kv_blocks=max(1, a.smoke_kv_kib * 1024 // (per_token * 16)))
    return kw


def _run_probe(a: argparse.Namespace, model: str, fmt: str, quantization: str | None, device: str,
               length: int) -> int:
    """Prefill ``length - decode_tokens`` tokens and decode the rest; returns the cache's token capacity.

    A function of its own so the engine dies with its frame: a reference left in the caller (``eng``) kept
    the previous probe's weights and cache allocated, and the next probe's preflight saw ~1 GiB free."""
    llm = LLM(model, max_model_len=length, **_engine_kwargs(a, model, fmt, quantization, device))
    eng = llm.engine
    capacity = eng.stats()["kv_blocks_total"] * eng.stats()["block_size"]
    prompt = torch.randint(3, eng.vocab_size, (length - a.decode_tokens,),
                           generator=torch.Generator().manual_seed(length)).tolist()
    eng.add_request("probe", prompt, SamplingParams(temperature=0, max_tokens=a.decode_tokens, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    return capacity


def probe(a: argparse.Namespace, model: str, fmt: str, quantization: str | None, device: str, length: int,
          console: Console) -> tuple[bool, int, str]:
    """Build the engine for one ``length``-token sequence, prefill and decode it: (ran, cache tokens, why not)."""
    t0 = time.perf_counter()
    try:
        ok, capacity, why = True, _run_probe(a, model, fmt, quantization, device, length), ""
    except DoesNotFitError as e:
        ok, capacity, why = False, 0, f"start-up: {e}"
    except torch.cuda.OutOfMemoryError as e:
        ok, capacity, why = False, 0, f"out of memory while running: {str(e).splitlines()[0]}"
    free_memory()  # after _run_probe returned: none of its engine's tensors is referenced any more
    console.print(f"  {fmt:>5} {quantization or 'bf16'} L={length:>7,}: {'ok' if ok else 'FAILS'} "
                  f"({time.perf_counter() - t0:.0f} s){'' if ok else ' - ' + why[:160]}")
    return ok, capacity, why


def max_context(a: argparse.Namespace, model: str, fmt: str, quantization: str | None, device: str, max_pos: int,
                console: Console) -> dict:
    """Largest single-sequence max_model_len that builds, prefills and decodes (to --step tokens)."""
    ok, capacity, why = probe(a, model, fmt, quantization, device, a.first_probe, console)
    probes = [(a.first_probe, ok)]
    if not ok:
        return {"max_context": 0, "cache_tokens_at_first_probe": 0, "probes": probes, "limit": why}
    good, bad = a.first_probe, None
    top = min(capacity // a.step * a.step, max_pos)
    limit = "model positions" if top == max_pos else "KV cache size at start-up"
    if top > good:
        ok, _, why = probe(a, model, fmt, quantization, device, top, console)
        probes.append((top, ok))
        if ok:
            good = top
        else:
            bad, limit = top, why
    while bad is not None and bad - good > a.step:
        mid = (good + bad) // 2 // a.step * a.step
        if mid <= good:
            break
        ok, _, why = probe(a, model, fmt, quantization, device, mid, console)
        probes.append((mid, ok))
        good, bad = (mid, bad) if ok else (good, mid)
    return {"max_context": good, "cache_tokens_at_first_probe": capacity, "probes": probes, "limit": limit}


def decode_speed(a: argparse.Namespace, model: str, fmt: str, device: str, context: int) -> float:
    """bs=1 greedy decode tok/s after a ``context``-token prompt (time of --decode-steps steps after the first)."""
    kw = _engine_kwargs(a, model, fmt, None, device)
    if a.smoke:
        kw.pop("num_kv_blocks")
    llm = LLM(model, max_model_len=context + a.decode_steps + 8, **kw)
    eng = llm.engine
    prompt = torch.randint(3, eng.vocab_size, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    eng.add_request("d", prompt, SamplingParams(temperature=0, max_tokens=a.decode_steps + 1, ignore_eos=True))
    seq = eng.requests["d"].seqs[0]
    while seq.num_completion_tokens == 0:
        eng.step()
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    tok_s = a.decode_steps / (time.perf_counter() - t0)
    del llm, eng, seq
    free_memory()
    return tok_s


def flat_summary(r: dict) -> dict:
    """The headline figures as flat keys (max_context_tokens_<weights>_<kv>, perplexity_kv_<fmt>, ...)."""
    flat = {}
    for name, v in r["max_context"].items():
        weights, kv = name.replace(" weights,", "").replace(" KV", "").split()
        flat[f"max_context_tokens_{weights}_weights_{kv}_kv"] = v["max_context"]
    base = r["perplexity"]["auto"]["perplexity"]
    for fmt in ("auto", "fp8", "int8"):
        if fmt in r["perplexity"]:
            flat[f"perplexity_kv_{fmt}"] = r["perplexity"][fmt]["perplexity"]
            if fmt != "auto":
                flat[f"perplexity_change_kv_{fmt}_vs_auto"] = r["perplexity"][fmt]["perplexity"] / base - 1
    for ctx, row in r["decode_tok_s"].items():
        for fmt, tok_s in row.items():
            flat[f"decode_tok_s_bs1_ctx{ctx}_kv_{fmt}"] = tok_s
    return flat


def perplexities(a: argparse.Namespace, device: str) -> dict:
    """Tiny trained model: validation perplexity with every format, all attention read back through the cache."""
    from transformers import AutoTokenizer

    from onecard.bench.perplexity import sliding_window_perplexity
    from onecard.engine.kv_cache import logits_through_cache
    from onecard.models.folder import open_model_folder
    from onecard.models.loader import load_model
    from onecard.testing import train_tiny_model
    from onecard.testing.corpus import local_corpus

    info = train_tiny_model()
    model = load_model(open_model_folder(info.path), torch.float32, device)
    tok = AutoTokenizer.from_pretrained(str(info.path))
    ids = torch.tensor(tok.encode(local_corpus().validation_text(), add_special_tokens=False)[:a.ppl_tokens],
                       device=device)
    ctx = info.seq_len  # the context it was trained at (its 1024 positions past that are untrained)
    out = {}
    for fmt in ("auto", "fp8", "int8"):
        res = sliding_window_perplexity(lambda w, f=fmt: logits_through_cache(model, w[0], f)[None], ids, context=ctx,
                                        stride=ctx // 2)
        out[fmt] = {"perplexity": res.perplexity, "protocol": res.protocol()}
    out["model"] = f"tiny trained Llama ({info.parameters / 1e6:.1f}M params, fp32 weights and compute)"
    return out


def figure(r: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    rows = r["max_context"]
    ax[0].bar(list(rows), [v["max_context"] / 1024 for v in rows.values()], color="tab:blue")
    ax[0].set_ylabel("max single-sequence context (k tokens)")
    ax[0].set_title("context that fits" + (f" ({r['cap_gib']:g} GiB cap)" if r.get("cap_gib") else ""))
    ppl = {k: v["perplexity"] for k, v in r["perplexity"].items() if isinstance(v, dict)}
    ax[1].bar(list(ppl), list(ppl.values()), color="tab:orange")
    ax[1].set_ylim(min(ppl.values()) * 0.98, max(ppl.values()) * 1.01)
    for i, v in enumerate(ppl.values()):
        ax[1].annotate(f"{v:.3f} ({(v / ppl['auto'] - 1) * 100:+.2f}%)", (i, v), ha="center", va="bottom")
    ax[1].set_title("tiny model perplexity (KV read from cache)")
    speeds = r["decode_tok_s"]
    fmts = list(next(iter(speeds.values())))
    width = 0.8 / len(fmts)
    for i, f in enumerate(fmts):
        ax[2].bar([j + i * width for j in range(len(speeds))], [speeds[c][f] for c in speeds], width, label=f)
    ax[2].set_xticks([j + width * (len(fmts) - 1) / 2 for j in range(len(speeds))], [f"ctx {c}" for c in speeds])
    ax[2].set_ylabel("tok/s (bs=1)")
    ax[2].legend()
    ax[2].set_title("decode speed")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main() -> None:
    a = parse()
    console = Console()
    formats = a.formats.split(",")
    if a.smoke:
        from onecard.testing import make_random_checkpoint

        model, device = str(a.model or make_random_checkpoint("llama-3.1-8b", "tiny")), "cpu"
        out_dir = a.out or tempfile.mkdtemp(prefix="engine_kv_quant_")
    else:
        model = benchmark_model(a.model, "llama-3.1-8b", console)
        device, out_dir = "cuda", a.out
        cap_process_memory(a.cap_gib)
    from onecard.models.folder import open_model_folder

    max_pos = open_model_folder(model).model_args().max_position_embeddings
    r: dict = {"model": model, "cap_gib": None if a.smoke else a.cap_gib,
               "kv_budget_kib": a.smoke_kv_kib if a.smoke else None, "gpu_memory_utilization": a.util,
               "max_num_batched_tokens": a.chunk, "search_step_tokens": a.step, "max_context": {}, "decode_tok_s": {}}
    console.print("[bold]1. max single-sequence context[/]")
    runs = [(f, None) for f in formats] + ([("fp8", "rtn-int4")] if a.int4 else [])
    for fmt, quant in runs:
        r["max_context"][f"{quant or 'bf16'} weights, {fmt} KV"] = max_context(a, model, fmt, quant, device, max_pos,
                                                                               console)
    console.print("[bold]2. perplexity with vs without KV quantization[/]")
    r["perplexity"] = perplexities(a, device)
    console.print("[bold]3. bs=1 decode[/]")
    for ctx in (int(c) for c in a.decode_contexts.split(",")):
        r["decode_tok_s"][ctx] = {f: decode_speed(a, model, f, device, ctx) for f in formats}

    r.update(flat_summary(r))

    t = Table(title="KV-cache formats")
    t.add_column("weights / KV")
    t.add_column("max context", justify="right")
    t.add_column("limited by")
    for name, v in r["max_context"].items():
        t.add_row(name, f"{v['max_context']:,}", v["limit"][:60])
    console.print(t)
    p = Table(title=f"perplexity: {r['perplexity']['model']}")
    p.add_column("KV")
    p.add_column("perplexity", justify="right")
    for f in ("auto", "fp8", "int8"):
        p.add_row(f, f"{r['perplexity'][f]['perplexity']:.4f}")
    console.print(p)
    d = Table(title="bs=1 decode tok/s")
    d.add_column("context", justify="right")
    for f in formats:
        d.add_column(f, justify="right")
    for ctx, row in r["decode_tok_s"].items():
        d.add_row(f"{ctx:,}", *(f"{row[f]:.1f}" for f in formats))
    console.print(d)
    where = "CPU smoke" if a.smoke else f"{torch.cuda.get_device_name(0)}, {a.cap_gib:g} GiB cap"
    publish("engine_kv_quant", r, figure(r, f"onecard KV-cache quantization ({where})"), out_dir, console)


if __name__ == "__main__":
    main()
