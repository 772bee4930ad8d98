"""Prefix caching and chunked prefill on onecard's engine, one process, one GPU, under a 24 GiB process cap.

    PYTHONPATH=src python benchmarks/engine_prefix_chunk.py            # H100: ~3-5 min (random llama-2-7b bf16, cached)
    PYTHONPATH=src python benchmarks/engine_prefix_chunk.py --smoke    # CPU, tiny model, < 1 min, writes to a temp dir

1. Prefix caching (issue 6 target: TTFT >= 5x lower): one request with a long
   shared prefix (default 3968 tokens: Llama-2 has 4096 positions) warms the
   cache, then --num-requests requests with that prefix and distinct suffixes
   arrive together; mean / p50 / max TTFT and the wall time to first tokens, with
   enable_prefix_caching on vs off (same engine settings otherwise).
2. Chunked prefill: a request is decoding when a --long-prompt-token prompt
   arrives; the streaming request's largest gap between tokens and the long
   prompt's TTFT, chunked (--chunk tokens per step) vs unchunked.
3. n-gram speculative decoding (issue 6 target: >= 1.8x at bs=1 on a repetitive,
   code-editing-like workload): greedy bs=1 tok/s with num_speculative_tokens=
   --spec-tokens vs off, the outputs compared token for token, and the draft
   acceptance rate. With random weights the acceptance rate says little about a
   real model (it depends on how the model continues repeated text): pass
   --model with a trained checkpoint for a representative figure.
The engines run in this process one after the other, under --cap-gib (0 = no cap).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import cap_process_memory, free_memory, publish
from onecard.engine import LLM, SamplingParams
from onecard.testing.checkpoints import benchmark_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on CPU; output to a temp dir")
    p.add_argument("--model", default=None, help="model folder (default: random llama-2-7b, full size, bf16)")
    p.add_argument("--prefix-tokens", type=int, default=3968)
    p.add_argument("--suffix-tokens", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--long-prompt-tokens", type=int, default=4000)
    p.add_argument("--chunk", type=int, default=512, help="long_prefill_chunk for the chunked run")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--spec-tokens", type=int, default=4, help="num_speculative_tokens for the speculative run")
    p.add_argument("--spec-output-tokens", type=int, default=256)
    p.add_argument("--cap-gib", type=float, default=24.0, help="per-process memory cap (an RTX 4090), 0 = none")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()



def prefix_run(model: str, a: argparse.Namespace, device: str, dtype: str, caching: bool) -> dict:
    llm = LLM(model, dtype=dtype, device=device, max_model_len=a.max_model_len, max_num_seqs=a.num_requests,
              enable_prefix_caching=caching)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    vocab = eng.vocab_size
    prefix = torch.randint(3, vocab, (a.prefix_tokens,), generator=g).tolist()
    suffixes = [torch.randint(3, vocab, (a.suffix_tokens,), generator=g).tolist() for _ in range(a.num_requests + 1)]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng.add_request("warm", prefix + suffixes[-1], sp)
    while eng.has_unfinished_requests():
        eng.step()
    t0 = time.time()
    for i in range(a.num_requests):
        eng.add_request(f"r{i}", prefix + suffixes[i], sp, arrival_time=t0)
    ttft: dict[str, float] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id not in ttft and out.metrics["first_token_time"]:
                ttft[out.request_id] = out.metrics["first_token_time"] - t0
    st = llm.stats()
    del llm, eng
    free_memory()
    vals = sorted(ttft.values())
    return {"ttft_mean_s": statistics.mean(vals), "ttft_p50_s": vals[len(vals) // 2], "ttft_max_s": vals[-1],
            "hit_rate": st["prefix_cache_hit_rate"], "kv_blocks": st["kv_blocks_total"]}


def chunk_run(model: str, a: argparse.Namespace, device: str, dtype: str, chunked: bool) -> dict:
    kw = {"long_prefill_chunk": a.chunk} if chunked else {"enable_chunked_prefill": False}
    llm = LLM(model, dtype=dtype, device=device, max_model_len=a.max_model_len, max_num_seqs=8,
              enable_prefix_caching=False, **kw)
    eng = llm.engine
    g = torch.Generator().manual_seed(1)
    vocab = eng.vocab_size
    stream_prompt = torch.randint(3, vocab, (16,), generator=g).tolist()
    long_prompt = torch.randint(3, vocab, (a.long_prompt_tokens,), generator=g).tolist()
    eng.add_request("stream", stream_prompt, SamplingParams(temperature=0, max_tokens=a.max_model_len - 32,
                                                            ignore_eos=True))
    for _ in range(8):  # decoding steadily (and CUDA graphs warm) before the long prompt arrives
        eng.step()
    stream = eng.requests["stream"].seqs[0]
    t_long = time.time()
    eng.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    gaps, last, n = [], time.time(), stream.num_completion_tokens
    long_ttft = None
    while long_ttft is None or len(gaps) < 8:
        outs = eng.step()
        now = time.time()
        if stream.num_completion_tokens > n:
            gaps.append(now - last)
            last, n = now, stream.num_completion_tokens
        if long_ttft is None and any(o.request_id == "long" for o in outs):
            long_ttft = now - t_long
    eng.abort_request("stream")
    del llm, eng
    free_memory()
    return {"stream_max_gap_ms": max(gaps) * 1e3, "stream_median_gap_ms": statistics.median(gaps) * 1e3,
            "long_prompt_ttft_s": long_ttft}


def spec_run(model: str, a: argparse.Namespace, device: str, dtype: str, k: int) -> dict:
    llm = LLM(model, dtype=dtype, device=device, max_model_len=a.max_model_len, max_num_seqs=1,
              num_speculative_tokens=k)
    g = torch.Generator().manual_seed(2)
    # A code-editing-like prompt: a block of source, then the same block again up to the point being edited.
    block = torch.randint(3, llm.engine.vocab_size, (a.spec_output_tokens,), generator=g).tolist()
    prompt = block + [7] + block[:16]
    sp = SamplingParams(temperature=0, max_tokens=a.spec_output_tokens, ignore_eos=True)
    llm.generate([prompt[:32]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    dt = time.perf_counter() - t0
    st = llm.stats()
    del llm
    free_memory()
    return {"tok_s": len(out) / dt, "tokens": out, "acceptance_rate": st["spec_acceptance_rate"],
            "draft_tokens": st["spec_draft_tokens"]}


def main() -> None:
    a = parse()
    console = Console()
    if a.smoke:
        from onecard.testing import make_random_checkpoint

        model = a.model or str(make_random_checkpoint("llama-2-7b", "tiny"))
        device, dtype = "cpu", "float32"
        a.prefix_tokens, a.suffix_tokens, a.num_requests = 192, 8, 8
        a.long_prompt_tokens, a.chunk, a.max_model_len = 448, 64, 512
        a.spec_output_tokens = 48
        out_dir = a.out or tempfile.mkdtemp(prefix="engine_prefix_chunk_")
    else:
        model = benchmark_model(a.model, "llama-2-7b", console)
        free_memory()
        device, dtype = "cuda", "auto"
        if a.cap_gib:
            cap_process_memory(a.cap_gib)
        out_dir = a.out
    if a.prefix_tokens + a.suffix_tokens + 4 > a.max_model_len or a.long_prompt_tokens + 32 > a.max_model_len:
        raise SystemExit("prompts do not fit --max-model-len; lower --prefix-tokens / --long-prompt-tokens")
    r: dict = {"model": model, "cap_gib": a.cap_gib if not a.smoke else None, "prefix_tokens": a.prefix_tokens,
               "suffix_tokens": a.suffix_tokens, "num_requests": a.num_requests,
               "long_prompt_tokens": a.long_prompt_tokens, "chunk_tokens": a.chunk}
    for caching in (True, False):
        console.print(f"[dim]prefix caching {'on' if caching else 'off'}...[/]")
        res = prefix_run(model, a, device, dtype, caching)
        r.update({f"prefix_{'on' if caching else 'off'}_{k}": v for k, v in res.items()})
    r["prefix_ttft_speedup"] = r["prefix_off_ttft_mean_s"] / r["prefix_on_ttft_mean_s"]
    for chunked in (True, False):
        console.print(f"[dim]long prompt {'chunked' if chunked else 'unchunked'}...[/]")
        res = chunk_run(model, a, device, dtype, chunked)
        r.update({f"{'chunked' if chunked else 'unchunked'}_{k}": v for k, v in res.items()})
    r["chunked_max_gap_reduction"] = r["unchunked_stream_max_gap_ms"] / r["chunked_stream_max_gap_ms"]
    console.print("[dim]bs=1 decode with and without n-gram speculation...[/]")
    on, off = spec_run(model, a, device, dtype, a.spec_tokens), spec_run(model, a, device, dtype, 0)
    r.update({"spec_tokens": a.spec_tokens, "spec_on_tok_s": on["tok_s"], "spec_off_tok_s": off["tok_s"],
              "spec_speedup": on["tok_s"] / off["tok_s"], "spec_acceptance_rate": on["acceptance_rate"],
              "spec_draft_tokens": on["draft_tokens"], "spec_outputs_identical": on["tokens"] == off["tokens"],
              "spec_weights": "random (acceptance not representative)" if a.model is None else "given --model"})

    t = Table(title=f"prefix caching ({a.num_requests} requests x {a.prefix_tokens}-token shared prefix) and "
                    f"chunked prefill ({a.long_prompt_tokens}-token prompt, chunk {a.chunk})")
    t.add_column("measure")
    t.add_column("on / chunked", justify="right")
    t.add_column("off / unchunked", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("mean TTFT (s)", f"{r['prefix_on_ttft_mean_s']:.3f}", f"{r['prefix_off_ttft_mean_s']:.3f}",
              f"{r['prefix_ttft_speedup']:.1f}x")
    t.add_row("prefix-cache hit rate", f"{r['prefix_on_hit_rate']:.2f}", f"{r['prefix_off_hit_rate']:.2f}", "")
    t.add_row("streaming request: max gap (ms)", f"{r['chunked_stream_max_gap_ms']:.1f}",
              f"{r['unchunked_stream_max_gap_ms']:.1f}", f"{r['chunked_max_gap_reduction']:.1f}x")
    t.add_row("long prompt TTFT (s)", f"{r['chunked_long_prompt_ttft_s']:.3f}",
              f"{r['unchunked_long_prompt_ttft_s']:.3f}", "")
    t.add_row(f"bs=1 decode tok/s, n-gram spec k={a.spec_tokens}", f"{r['spec_on_tok_s']:.1f}",
              f"{r['spec_off_tok_s']:.1f}", f"{r['spec_speedup']:.2f}x")
    t.add_row("spec acceptance rate / outputs identical", f"{r['spec_acceptance_rate']:.2f}",
              str(r["spec_outputs_identical"]), "")
    console.print(t)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    ax1.bar(["caching on", "caching off"], [r["prefix_on_ttft_mean_s"], r["prefix_off_ttft_mean_s"]],
            color=["tab:green", "tab:gray"])
    ax1.set_ylabel("mean TTFT (s)")
    ax1.set_title(f"{a.num_requests} requests, {a.prefix_tokens}-token shared prefix")
    ax2.bar(["chunked", "unchunked"], [r["chunked_stream_max_gap_ms"], r["unchunked_stream_max_gap_ms"]],
            color=["tab:green", "tab:gray"])
    ax2.set_ylabel("largest inter-token gap (ms)")
    ax2.set_title(f"decode while a {a.long_prompt_tokens}-token prompt prefills")
    ax3.bar([f"spec k={a.spec_tokens}", "plain"], [r["spec_on_tok_s"], r["spec_off_tok_s"]],
            color=["tab:green", "tab:gray"])
    ax3.set_ylabel("bs=1 decode tok/s")
    ax3.set_title(f"n-gram speculation (acceptance {r['spec_acceptance_rate']:.2f})")
    fig.suptitle(f"onecard engine, {'CPU smoke' if a.smoke else torch.cuda.get_device_name(0)}"
                 f"{'' if a.smoke or not a.cap_gib else f', {a.cap_gib:g} GiB cap'}")
    publish("engine_prefix_chunk", r, fig, out_dir, console)


if __name__ == "__main__":
    main()
