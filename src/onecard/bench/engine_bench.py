"""Engine vs HF transformers, in one process on one device: bs=1 decode, offline throughput, memory, KV waste.

``run_engine_bench(EngineBenchConfig(model=...))`` returns one flat dict (the
JSON that ``benchmarks/engine_vs_hf.py`` and ``onecard bench MODEL --engine``
write). What is measured, and how:

- bs=1 decode: ms/token over ``decode_tokens`` greedy steps after a
  ``decode_prompt_len`` prompt, prefill excluded (ours: first-token to finish
  time; HF: time(N tokens) - time(1 token), over N-1). HF runs its default
  dynamic cache ("eager": no compile) and, where it works, its static cache.
- roofline: bytes one decode step must read (all weights + the KV cache at the
  average context) / the device's *measured* copy bandwidth.
- offline throughput: ``num_prompts`` random-token prompts, input/output lengths
  drawn from a seeded lognormal (means ``mean_input``/``mean_output``), greedy,
  EOS ignored so every request makes exactly its output length. HF runs
  ``hf_prompts`` of them in left-padded batches of ``hf_batch`` (it generates
  to the longest request of each batch; only requested tokens count as useful)
  and its tok/s is extrapolated per useful token: the JSON says so.
- KV waste: over every engine step, 1 - tokens held / (blocks used x block_size).
- 24 GiB: the same engine runs again with ``torch.cuda.set_per_process_memory_fraction``
  capping the process at ``memory_cap_gib``, as on an RTX 4090.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from onecard.bench.results import memory_capped
from onecard.errors import BadInputError

GiB = 1 << 30


@dataclass
class EngineBenchConfig:
    model: str | Path
    dtype: str = "bfloat16"
    device: str | None = None
    num_prompts: int = 1000
    mean_input: int = 256
    mean_output: int = 256
    length_sigma: float = 0.6
    seed: int = 0
    max_model_len: int = 2048
    decode_prompt_len: int = 128
    decode_tokens: int = 256
    hf_prompts: int = 64
    hf_batch: int = 32
    memory_cap_gib: float | None = 24.0
    cap_num_prompts: int | None = None  # prompts for the capped run (default: num_prompts)
    gpu_memory_utilization: float = 0.9
    run_hf: bool = True
    run_hf_static: bool = True
    max_num_seqs: int = 256
    # how the offline requests are queued, for HF's batches and our engine alike: "longest_first" (``LLM.generate``'s
    # default, ``longest_output_first``) or "submitted" (as drawn)
    offline_order: str = "longest_first"

    def __post_init__(self) -> None:
        if self.offline_order not in ("longest_first", "submitted"):
            raise BadInputError(f"offline_order={self.offline_order!r}: choose 'longest_first' or 'submitted'")
        for f in ("num_prompts", "mean_input", "mean_output", "max_model_len", "decode_prompt_len", "decode_tokens",
                  "hf_prompts", "hf_batch", "max_num_seqs"):
            if getattr(self, f) < 1:
                raise BadInputError(f"{f}={getattr(self, f)} must be >= 1")
        if self.decode_prompt_len + self.decode_tokens >= self.max_model_len:
            raise BadInputError("decode_prompt_len + decode_tokens must be below max_model_len; raise max_model_len")
        if self.decode_tokens < 2:
            raise BadInputError("decode_tokens must be >= 2 (per-token time needs two steps)")


def lognormal_lengths(n: int, mean: float, sigma: float, seed: int, lo: int, hi: int) -> list[int]:
    """n lengths from a lognormal whose mean is ``mean`` (before clipping to [lo, hi])."""
    import math

    g = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma ** 2 / 2
    x = torch.empty(n).log_normal_(mu, sigma, generator=g)
    return x.round().clamp(lo, hi).long().tolist()


def workload(cfg: EngineBenchConfig, vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, as drawn; seeded; in + out fits max_model_len."""
    half = cfg.max_model_len // 2
    ins = lognormal_lengths(cfg.num_prompts, cfg.mean_input, cfg.length_sigma, cfg.seed, 4, half - 1)
    outs = lognormal_lengths(cfg.num_prompts, cfg.mean_output, cfg.length_sigma, cfg.seed + 1, 2, half)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    return [(torch.randint(3, vocab_size, (i,), generator=g).tolist(), o) for i, o in zip(ins, outs)]


def queued(reqs: list[tuple[list[int], int]], order: str) -> list[tuple[list[int], int]]:
    """The requests in the order a run queues them (``EngineBenchConfig.offline_order``). Callers take a subset of
    the drawn workload first and order it after, so a subset stays a sample of the workload."""
    from onecard.engine.llm import longest_output_first

    return [reqs[i] for i in longest_output_first([o for _, o in reqs])] if order == "longest_first" else reqs


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in GB/s from a large tensor copy (bytes read + bytes written)."""
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
        repeats = 3
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    return 2 * nbytes * repeats / seconds / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


# ---- HF reference --------------------------------------------------------------------------------------------------
def _hf_decode_ms(model, prompt: torch.Tensor, n: int, **kw) -> float:
    def run(k: int) -> float:
        _sync(prompt.device)
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k, min_new_tokens=k,
                       do_sample=False, pad_token_id=0, **kw)
        _sync(prompt.device)
        return time.perf_counter() - t0

    run(4)  # warm-up (and compile, for the static cache)
    return (run(n) - run(1)) / (n - 1) * 1e3


def _hf_batched(model, reqs: list[tuple[list[int], int]], batch: int, progress) -> tuple[float, int, int]:
    """Seconds, useful tokens, generated tokens (incl. padding to the longest request) for HF batched generate."""
    dev = next(model.parameters()).device
    seconds, useful, generated = 0.0, 0, 0
    task = progress.add_task("HF batched generate", total=len(reqs))
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=dev)
        k = max(o for _, o in chunk)
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        _sync(dev)
        seconds += time.perf_counter() - t0
        useful += sum(o for _, o in chunk)
        generated += k * len(chunk)
        progress.advance(task, len(chunk))
    return seconds, useful, generated


def run_hf(cfg: EngineBenchConfig, reqs, device: torch.device, progress) -> dict:
    from transformers import AutoModelForCausalLM

    out: dict = {}
    _peak_reset(device)
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=getattr(torch, cfg.dtype)).to(device).eval()
    g = torch.Generator().manual_seed(cfg.seed + 3)
    prompt = torch.randint(3, model.config.vocab_size, (1, cfg.decode_prompt_len), generator=g).to(device)
    with torch.no_grad():
        ms = _hf_decode_ms(model, prompt, cfg.decode_tokens)
        out.update(hf_eager_bs1_ms_per_token=ms, hf_eager_bs1_tok_s=1e3 / ms)
        if cfg.run_hf_static:
            try:
                ms = _hf_decode_ms(model, prompt, cfg.decode_tokens, cache_implementation="static")
                out.update(hf_static_bs1_ms_per_token=ms, hf_static_bs1_tok_s=1e3 / ms)
            except Exception as exc:  # recorded, not hidden: "where it works"
                out["hf_static_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        sub = queued(reqs[:cfg.hf_prompts], cfg.offline_order)
        seconds, useful, generated = _hf_batched(model, sub, cfg.hf_batch, progress)
    out.update(hf_batched_prompts=len(sub), hf_batched_batch_size=cfg.hf_batch, hf_batched_seconds=seconds,
               hf_batched_useful_tokens=useful, hf_batched_generated_tokens=generated,
               hf_batched_useful_tok_s=useful / seconds,
               hf_batched_extrapolated=len(sub) < len(reqs),
               hf_batched_note=(f"HF ran {len(sub)} of {len(reqs)} prompts; its tok/s is per useful (requested) "
                                "output token and is extrapolated to the full workload"),
               hf_peak_gib=_peak_gib(device))
    del model
    _peak_reset(device)
    return out


# ---- our engine ----------------------------------------------------------------------------------------------------
def _engine_decode(llm, cfg: EngineBenchConfig, vocab: int) -> tuple[float, float]:
    from onecard.engine import SamplingParams

    g = torch.Generator().manual_seed(cfg.seed + 3)
    prompt = torch.randint(3, vocab, (cfg.decode_prompt_len,), generator=g).tolist()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=cfg.decode_tokens, ignore_eos=True),
                       use_tqdm=False)[0]
    total = time.perf_counter() - t0
    m = out.metrics
    ms = (m["finished_time"] - m["first_token_time"]) / (cfg.decode_tokens - 1) * 1e3
    return ms, total


def _engine_offline(llm, reqs, progress, label: str) -> dict:
    from onecard.engine import SamplingParams

    eng = llm.engine
    task = progress.add_task(label, total=len(reqs))
    held_sum = alloc_sum = 0
    steps = 0
    t0 = time.perf_counter()
    for i, (p, o) in enumerate(reqs):
        eng.add_request(f"bench-{label}-{i}", p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True))
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                progress.advance(task)
        running = eng.scheduler.running
        if running:
            held_sum += sum(len(s) for s in running)
            alloc_sum += sum(len(s.block_table) for s in running) * eng.block_manager.block_size
        steps += 1
    seconds = time.perf_counter() - t0
    out_tokens = sum(o for _, o in reqs)
    in_tokens = sum(len(p) for p, _ in reqs)
    return {"seconds": seconds, "output_tokens": out_tokens, "input_tokens": in_tokens, "steps": steps,
            "output_tok_s": out_tokens / seconds, "total_tok_s": (in_tokens + out_tokens) / seconds,
            "kv_waste_pct": 100 * (1 - held_sum / alloc_sum) if alloc_sum else None,
            "preemptions": eng.scheduler.num_preemptions}


def run_engine(cfg: EngineBenchConfig, reqs, device: torch.device, progress, prefix: str,
               num_prompts: int | None = None, **engine_kwargs) -> dict:
    """``engine_kwargs``: extra ``LLM`` options for this run (e.g. ``async_scheduling=False``)."""
    from onecard.engine import LLM
    from onecard.engine.model_runner import kv_bytes_per_token
    from onecard.engine.offload import resident_step_bytes

    _peak_reset(device)
    t0 = time.perf_counter()
    llm = LLM(cfg.model, dtype=cfg.dtype, device=str(device), max_model_len=cfg.max_model_len,
              max_num_seqs=cfg.max_num_seqs, gpu_memory_utilization=cfg.gpu_memory_utilization, **engine_kwargs)
    startup = time.perf_counter() - t0
    model = llm.engine.runner.model
    vocab = model.args.vocab_size
    ms, _ = _engine_decode(llm, cfg, vocab)
    off = _engine_offline(llm, queued(reqs[:num_prompts] if num_prompts else reqs, cfg.offline_order), progress,
                          prefix)
    st = llm.stats()
    kvpt = kv_bytes_per_token(model, llm.engine.runner.dtype, llm.engine.config.kv_cache_dtype)
    # a decode step reads every weight (quantized codes and scales included) except the (untied) embedding table,
    # of which it reads one row per token
    step_weight_bytes = resident_step_bytes(model)
    emb = model.embed_tokens.weight
    weight_bytes = step_weight_bytes + (0 if model.args.tie_word_embeddings else emb.numel() * emb.element_size())
    res = {"startup_s": startup, "bs1_ms_per_token": ms, "bs1_tok_s": 1e3 / ms,
           "offline_prompts": len(reqs[:num_prompts] if num_prompts else reqs), "offline_order": cfg.offline_order,
           **{f"offline_{k}": v for k, v in off.items()},
           "kv_cache_gib": st["kv_blocks_total"] * st["block_size"] * kvpt / GiB, "kv_blocks": st["kv_blocks_total"],
           "cuda_graph_batch_sizes": len(st["cuda_graphs"]), "peak_gib": _peak_gib(device),
           "weight_gib": weight_bytes / GiB, "decode_step_weight_gib": step_weight_bytes / GiB,
           "kv_bytes_per_token": kvpt}
    del llm, model
    _peak_reset(device)
    return {f"{prefix}_{k}": v for k, v in res.items()}


def run_engine_bench(cfg: EngineBenchConfig, console=None) -> dict:
    """Run every measurement; returns one flat dict (no gpu/torch/date/command: ``write_result`` adds those)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from onecard.bench.results import gpu_name
    from onecard.engine.llm import resolve_device
    from onecard.models import open_model_folder

    console = console or Console()
    device = resolve_device(cfg.device)
    args = open_model_folder(cfg.model).model_args()
    reqs = workload(cfg, args.vocab_size)
    result: dict = {"model": str(cfg.model), "architecture": args.architecture, "parameters": args.num_parameters(),
                    "dtype": cfg.dtype, "device": str(device), "device_name": gpu_name(), **{f"config_{k}": v for k, v in asdict(cfg).items()
                                                                   if k != "model"},
                    "workload_mean_input": sum(len(p) for p, _ in reqs) / len(reqs),
                    "workload_mean_output": sum(o for _, o in reqs) / len(reqs)}
    bw = measure_copy_bandwidth(device)
    result["measured_copy_bandwidth_gbs"] = bw
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        if cfg.run_hf:
            result.update(run_hf(cfg, reqs, device, progress))
        result.update(run_engine(cfg, reqs, device, progress, "engine"))
        if cfg.memory_cap_gib and device.type == "cuda":
            with memory_capped(device, cfg.memory_cap_gib):
                try:
                    result.update(run_engine(cfg, reqs, device, progress, "engine_cap", cfg.cap_num_prompts))
                except Exception as exc:  # keep the uncapped results; the failure is itself a finding
                    result["engine_cap_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            result["engine_cap_memory_cap_gib"] = cfg.memory_cap_gib
    # roofline of bs=1 decode: weights + KV at the average context, per token, over measured bandwidth
    avg_ctx = cfg.decode_prompt_len + cfg.decode_tokens / 2
    step_bytes = result["engine_decode_step_weight_gib"] * GiB + avg_ctx * result["engine_kv_bytes_per_token"]
    roof_tok_s = bw * 1e9 / step_bytes
    result.update(bs1_bytes_per_token=step_bytes, bs1_roofline_tok_s=roof_tok_s,
                  engine_bs1_roofline_fraction=result["engine_bs1_tok_s"] / roof_tok_s)
    if cfg.run_hf:
        result["hf_eager_bs1_roofline_fraction"] = result["hf_eager_bs1_tok_s"] / roof_tok_s
        result["bs1_speedup_vs_hf_eager"] = result["engine_bs1_tok_s"] / result["hf_eager_bs1_tok_s"]
        if "hf_static_bs1_tok_s" in result:
            result["hf_static_bs1_roofline_fraction"] = result["hf_static_bs1_tok_s"] / roof_tok_s
            result["bs1_speedup_vs_hf_static"] = result["engine_bs1_tok_s"] / result["hf_static_bs1_tok_s"]
        result["offline_speedup_vs_hf_batched"] = result["engine_offline_output_tok_s"] / result["hf_batched_useful_tok_s"]
        if result.get("hf_peak_gib") and result.get("engine_peak_gib"):
            result["memory_ratio_vs_hf"] = result["engine_peak_gib"] / result["hf_peak_gib"]
            result["memory_note"] = ("engine_peak_gib includes the KV cache the engine preallocates up to "
                                     "gpu_memory_utilization; hf_peak_gib is what HF's runs touched")
    return result


def results_table(r: dict):
    from rich.table import Table

    t = Table("path", "bs=1 tok/s", "ms/token", "% roofline", "offline out tok/s", "peak GiB", "KV waste %",
              title=f"engine vs HF: {r['architecture']} {r['dtype']} on {r['device_name']} "
                    f"(copy bandwidth {r['measured_copy_bandwidth_gbs']:.0f} GB/s)")

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    roof = r["bs1_roofline_tok_s"]
    if "hf_eager_bs1_tok_s" in r:
        t.add_row("HF generate (dynamic cache)", f(r["hf_eager_bs1_tok_s"]), f(r["hf_eager_bs1_ms_per_token"], "{:.2f}"),
                  f(100 * r["hf_eager_bs1_tok_s"] / roof), f(r["hf_batched_useful_tok_s"]) + "*", f(r.get("hf_peak_gib"), "{:.2f}"), "-")
        if "hf_static_bs1_tok_s" in r:
            t.add_row("HF generate (static cache)", f(r["hf_static_bs1_tok_s"]), f(r["hf_static_bs1_ms_per_token"], "{:.2f}"),
                      f(100 * r["hf_static_bs1_tok_s"] / roof), "-", "-", "-")
        elif "hf_static_error" in r:
            t.add_row("HF static cache", "failed: " + r["hf_static_error"][:40], "", "", "", "", "")
    for prefix, label in (("engine", "onecard engine"), ("engine_cap", f"onecard engine, {r.get('engine_cap_memory_cap_gib')} GiB cap")):
        if f"{prefix}_bs1_tok_s" in r:
            t.add_row(label, f(r[f"{prefix}_bs1_tok_s"]), f(r[f"{prefix}_bs1_ms_per_token"], "{:.2f}"),
                      f(100 * r[f"{prefix}_bs1_tok_s"] / roof), f(r[f"{prefix}_offline_output_tok_s"]),
                      f(r.get(f"{prefix}_peak_gib"), "{:.2f}"), f(r.get(f"{prefix}_offline_kv_waste_pct"), "{:.2f}"))
    if "hf_batched_useful_tok_s" in r:
        t.caption = f"* HF on {r['hf_batched_prompts']} of {r['config_num_prompts']} prompts, extrapolated per useful token"
    return t


def results_figure(r: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names, vals = [], []
    for key, label in (("hf_eager_bs1_tok_s", "HF dynamic"), ("hf_static_bs1_tok_s", "HF static"),
                       ("engine_bs1_tok_s", "onecard"), ("engine_cap_bs1_tok_s", "onecard 24G cap")):
        if key in r:
            names.append(label)
            vals.append(r[key])
    a.bar(names, vals, color="tab:blue")
    a.axhline(r["bs1_roofline_tok_s"], color="tab:red", ls="--", label="bandwidth roofline")
    a.set_ylabel("tok/s")
    a.set_title("bs=1 decode")
    a.legend()
    names, vals = [], []
    for key, label in (("hf_batched_useful_tok_s", "HF batched*"), ("engine_offline_output_tok_s", "onecard"),
                       ("engine_cap_offline_output_tok_s", "onecard 24G cap")):
        if key in r:
            names.append(label)
            vals.append(r[key])
    b.bar(names, vals, color="tab:green")
    b.set_yscale("log")
    b.set_ylabel("output tok/s (log)")
    b.set_title(f"offline: {r['config_num_prompts']} lognormal prompts")
    fig.suptitle(f"{r['architecture']} {r['dtype']} on {r['device_name']}")
    fig.tight_layout()
    return fig
