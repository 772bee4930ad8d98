"""Beyond one card: tensor-parallel decode and FSDP2 training, 2 processes vs 1, on the same machine.

Parts (pick with --part; each fits a 10-minute call on a 2-GPU host):
  tp    Llama-2-13B architecture (random bf16 checkpoint, written once and cached), through the engine:
        LLM(tensor_parallel_size=1) then LLM(tensor_parallel_size=2) (this process is rank 0, the engine spawns
        rank 1; CUDA-graph decode on every rank). bs=1 decode tok/s = (--decode - 1) tokens over (time of a
        --decode-token request - time of a 1-token request), the median of --repeats requests, and offline throughput = --batch prompts of
        --prompt tokens x --decode tokens / wall time. Target (issue 13): TP=2 bs=1 decode >= 1.6x TP=1.
  fsdp  Llama-3-8B architecture (random init; fp32 master weights, bf16 compute via MixedPrecisionPolicy,
        non-reentrant activation checkpointing, AdamW), HF model + PEFT, sharded with onecard.dist.fsdp
        (fully_shard per decoder layer, then the root): tokens/s on 1 process vs 2 at the same per-GPU batch.
        LoRA r=16 all-linear on all 32 layers; full fine-tuning on --full-layers layers (all 32 with fp32
        AdamW states need ~128 GB on one card). Target: 2-GPU tokens/s >= 1.8x 1-GPU.
  fit   Llama-2-13B architecture, LoRA, bf16 frozen base, seq 4096, activation checkpointing: the peak of one
        process (uncapped; above 24 GiB, since the bf16 weights alone are 24.2 GiB) and of two FSDP2 processes
        each capped at 24 GiB (torch.cuda.set_per_process_memory_fraction). The cap starts once the model is
        sharded: this benchmark builds the random model whole on each card first (a real 24 GB card would
        build on meta and load its shards). Target: the 2-process run fits.

  PYTHONPATH=src python benchmarks/dist_scaling.py               # 2x H100, all three parts (estimate ~8 min)
  PYTHONPATH=src python benchmarks/dist_scaling.py --part tp     # 2x H100: ~3 min (+~2 min the first time: the
                                                                 #   26 GB checkpoint is written once, then cached)
  PYTHONPATH=src python benchmarks/dist_scaling.py --part tp --quantization rtn-int4   # the same, int4 weights
                                                                 #   (dist_tp_rtn-int4.json; int8 likewise)
  PYTHONPATH=src python benchmarks/dist_scaling.py --part fsdp-qlora   # 2x H100: QLoRA (int4 base sharded) 2 vs 1
  PYTHONPATH=src python benchmarks/dist_scaling.py --smoke       # CPU, gloo, tiny shapes, both parts, temp dir

The fsdp and fit parts run each world size in fresh processes (onecard.dist.launch.spawn: torchrun's variables, NCCL on GPU, gloo
on CPU); rank 0 writes its timings to a scratch file that this parent reads, tabulates and writes as
docs/results/dist_<part>.json (+ .png for tp and fsdp) (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import gpu_name, save_figure, write_result
from onecard.dist.launch import spawn

console = Console()


def _arch(name: str, smoke: bool, layers: int | None = None) -> dict:
    from onecard.models import arch_config, scale_config

    cfg = scale_config(arch_config(name), "tiny") if smoke else arch_config(name)
    if smoke and name == "llama-3-8b":
        cfg["num_key_value_heads"] = 2  # tiny GQA that still splits over 2 ranks
    if layers:
        cfg["num_hidden_layers"] = layers
    return cfg


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


# ---------------------------------------------------------------- tensor parallel decode

def _engine_run(folder: str, tp: int, device: str, a) -> dict:
    """One engine (``LLM(tensor_parallel_size=tp)``): bs=1 decode tok/s and offline throughput at ``a.batch``."""
    import gc

    from onecard.engine import LLM, SamplingParams

    llm = LLM(folder, tensor_parallel_size=tp, device=device, max_model_len=a.prompt + a.decode + 16,
              max_num_seqs=a.batch, enable_prefix_caching=False, quantization=a.quantization,
              tp_all_reduce=a.all_reduce, decode_gemv=a.decode_gemv,
              async_scheduling=a.async_scheduling)  # every timed prompt computes its prefill
    vocab = llm.engine.vocab_size
    prompts = [torch.randint(3, vocab, (a.prompt,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(a.batch)]

    def timed(batch: list[list[int]], tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        _sync(device)
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        _sync(device)
        return time.perf_counter() - t0

    timed(prompts[:1], 4)  # warm-up: compiles, first graph replays
    prefill = min(timed(prompts[:1], 1) for _ in range(2))
    runs = [(a.decode - 1) / max(timed(prompts[:1], a.decode) - prefill, 1e-9) for _ in range(a.repeats)]
    offline = timed(prompts, a.decode)
    stats = llm.stats()
    from onecard.quant.linear import QuantLinear

    model = llm.engine.runner.model
    weight_gib = (sum(p.numel() * p.element_size() for p in model.parameters())
                  + sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))) / 2**30
    result = {"bs1_decode_tokens_per_s": statistics.median(runs), "bs1_decode_tokens_per_s_runs": runs,
              "prefill_s": prefill,
              "offline_tokens_per_s": a.batch * a.decode / offline, "weight_gib_rank0": weight_gib,
              "cuda_graphs": stats["cuda_graphs"], "kv_blocks": stats["kv_blocks_total"],
              "symm_mem_all_reduce": any(getattr(m, "fast", None) is not None for m in model.modules()),
              "sums_fused_into_norms": any(getattr(m, "defer", None) is not None for m in model.modules())}
    model = None
    console.print(f"TP={tp}: {result['bs1_decode_tokens_per_s']:.1f} tok/s at bs=1, "
                  f"{result['offline_tokens_per_s']:.1f} tok/s offline (bs={a.batch})")  # before a teardown can hang
    if tp > 1:
        llm.engine.runner.close()
    llm = None  # free the engine (a closure above holds the name)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def part_tp(a, out_dir: Path, scratch: Path) -> dict:
    """LLM(tensor_parallel_size=1) then =2 in this process (rank 0 here, rank 1 spawned by the engine)."""
    from onecard.testing.checkpoints import (
        gpu_benchmark_checkpoint,
        make_random_checkpoint,
    )

    device = "cpu" if a.smoke else "cuda"
    folder = str(make_random_checkpoint("llama-2-13b", "tiny") if a.smoke else
                 gpu_benchmark_checkpoint("llama-2-13b", console))
    res = {}
    for tp in (1, 2):  # a line per engine: a run cut by a timeout still says how far it got
        t0 = time.perf_counter()
        res[tp] = _engine_run(folder, tp, device, a)
        console.print(f"TP={tp} done in {time.perf_counter() - t0:.0f} s")
    data = {"arch": "llama-2-13b" + (" (tiny)" if a.smoke else ""), "dtype": "fp32" if a.smoke else "bf16",
            "quantization": a.quantization, "tp_all_reduce": a.all_reduce, "decode_gemv": a.decode_gemv,
            "async_scheduling": a.async_scheduling is not False, "engine": "onecard LLM(tensor_parallel_size=N)",
            "prompt_tokens": a.prompt, "decode_tokens": a.decode,
            "offline_batch": a.batch, "cuda_graphs": bool(res[2]["cuda_graphs"])}
    for tp, r in res.items():
        data.update({f"tp{tp}_{k}": v for k, v in r.items() if k != "cuda_graphs"})
    bs1 = res[2]["bs1_decode_tokens_per_s"] / res[1]["bs1_decode_tokens_per_s"]
    off = res[2]["offline_tokens_per_s"] / res[1]["offline_tokens_per_s"]
    data.update({"tp2_speedup_bs1_decode": bs1, "tp2_speedup_offline": off, "target_bs1_speedup": 1.6})
    t = Table(title=f"LLM tensor parallel, {data['arch']} {a.quantization or data['dtype']}, prompt {a.prompt}, "
                    f"all-reduce {a.all_reduce}, "
                    f"{gpu_name()}")
    for c in ("metric", "TP=1", "TP=2", "speedup"):
        t.add_column(c, justify="right")
    t.add_row("bs=1 decode tok/s", f"{res[1]['bs1_decode_tokens_per_s']:,.1f}",
              f"{res[2]['bs1_decode_tokens_per_s']:,.1f}", f"{bs1:.2f}x")
    t.add_row(f"offline tok/s (bs={a.batch})", f"{res[1]['offline_tokens_per_s']:,.1f}",
              f"{res[2]['offline_tokens_per_s']:,.1f}", f"{off:.2f}x")
    t.add_row("weights GiB (rank 0)", f"{res[1]['weight_gib_rank0']:.1f}", f"{res[2]['weight_gib_rank0']:.1f}", "")
    console.print(t)
    _chart(out_dir, _result_name("tp", a), f"LLM TP=2 vs TP=1 tok/s{f' ({a.quantization})' if a.quantization else ''}", ["bs=1 decode", f"offline bs={a.batch}"],
           {f"TP={tp}": [res[tp]["bs1_decode_tokens_per_s"], res[tp]["offline_tokens_per_s"]] for tp in (1, 2)})
    return data


# ---------------------------------------------------------------- FSDP2 training

def _fsdp_worker(cfg: dict, method: str, rows: int, seq: int, steps: int, out: str, base_bf16: bool = False,
                 cap_gib: float | None = None) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from onecard.dist.fsdp import shard_for_training_, train_step
    from onecard.dist.launch import init_distributed
    from onecard.train.checkpointing import enable_checkpointing
    from onecard.train.lora import add_lora

    env, device = init_distributed()
    on_gpu = device.startswith("cuda")
    torch.manual_seed(0)
    conf = LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16 if base_bf16 and on_gpu else torch.float32,
                                                 attn_implementation="sdpa")
    enable_checkpointing(model)
    if method == "qlora":  # int4 base (sharded by shard_for_training_ like any weight), LoRA in fp32
        from onecard.train.qlora import quantize_model_int4

        quantize_model_int4(model, 64, torch.bfloat16 if on_gpu else torch.float32)
    if method in ("lora", "qlora"):
        model.requires_grad_(False)
        model = add_lora(model, r=16, alpha=32, seed=0)
    model.train()
    shard_for_training_(model, mixed_precision=on_gpu)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if cap_gib:  # a 24 GB card, emulated from here on: the allocator refuses beyond this share of the H100
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    data = torch.randint(3, conf.vocab_size, (steps + 2, rows, seq), device=device,
                         generator=torch.Generator(device=device).manual_seed(env.rank))
    losses = [train_step(model, opt, data[i]) for i in range(2)]  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    losses += [train_step(model, opt, data[i]) for i in range(2, steps + 2)]
    _sync(device)
    sec = (time.perf_counter() - t0) / steps
    if env.rank == 0:
        Path(out).write_text(json.dumps({"s_per_step": sec, "tokens_per_s": env.world_size * rows * seq / sec,
                                         "peak_gib": _peak_gib(device), "losses": losses}))


def part_fsdp(a, out_dir: Path, scratch: Path, methods: tuple[str, ...] = ("lora", "full"),
              name: str = "dist_fsdp") -> dict:
    data = {"arch": "llama-3-8b" + (" (tiny)" if a.smoke else ""), "seq_len": a.seq, "rows_per_gpu": a.rows,
            "measured_steps": a.steps, "compute_dtype": "fp32" if a.smoke else "bf16 (fp32 master weights)",
            "full_num_layers": a.full_layers or _arch("llama-3-8b", a.smoke)["num_hidden_layers"]}
    t = Table(title=f"FSDP2 training, {data['arch']}, seq {a.seq}, {a.rows} row(s)/GPU, {gpu_name()}")
    for c in ("method", "1 GPU tok/s", "2 GPU tok/s", "scaling", "efficiency", "1 GPU peak GiB", "2 GPU peak GiB"):
        t.add_column(c, justify="right")
    series = {}
    for method in methods:
        cfg = _arch("llama-3-8b", a.smoke, a.full_layers if method == "full" else None)
        res = {}
        for world in (1, 2):
            path = scratch / f"fsdp_{method}{world}.json"
            spawn(_fsdp_worker, world, (cfg, method, a.rows, a.seq, a.steps, str(path)), timeout_s=a.timeout)
            res[world] = json.loads(path.read_text())
        sp = res[2]["tokens_per_s"] / res[1]["tokens_per_s"]
        data.update({f"{method}_1gpu_tokens_per_s": res[1]["tokens_per_s"],
                     f"{method}_2gpu_tokens_per_s": res[2]["tokens_per_s"], f"{method}_scaling_2gpu_vs_1": sp,
                     f"{method}_scaling_efficiency": sp / 2, f"{method}_1gpu_peak_gib": res[1]["peak_gib"],
                     f"{method}_2gpu_peak_gib_rank0": res[2]["peak_gib"],
                     f"{method}_2gpu_losses": res[2]["losses"]})
        fmt = (lambda g: "-" if g is None else f"{g:.1f}")
        t.add_row(method, f"{res[1]['tokens_per_s']:,.0f}", f"{res[2]['tokens_per_s']:,.0f}", f"{sp:.2f}x",
                  f"{sp / 2:.0%}", fmt(res[1]["peak_gib"]), fmt(res[2]["peak_gib"]))
        series[method] = [res[1]["tokens_per_s"], res[2]["tokens_per_s"]]
    console.print(t)
    data["target_scaling"] = 1.8
    _chart(out_dir, name, "FSDP2 training tokens/s", ["1 GPU", "2 GPUs"], series)
    return data


def part_fsdp_qlora(a, out_dir: Path, scratch: Path) -> dict:
    """The fsdp part for QLoRA (int4 base g64 + LoRA r=16): its own JSON, dist_fsdp_qlora."""
    return part_fsdp(a, out_dir, scratch, ("qlora",), "dist_fsdp_qlora")


def part_fit(a, out_dir: Path, scratch: Path) -> dict:
    """13B-arch LoRA at seq 4k: one process uncapped (its peak), two processes each capped at 24 GiB."""
    cfg = _arch("llama-2-13b", a.smoke)
    seq = a.seq if a.smoke else 4096
    cap = None if a.smoke else 24.0
    res = {}
    for world, limit in ((1, None), (2, cap)):
        path = scratch / f"fit{world}.json"
        try:
            spawn(_fsdp_worker, world, (cfg, "lora", 1, seq, 2, str(path), True, limit), timeout_s=a.timeout)
            res[world] = json.loads(path.read_text())
        except Exception as e:  # an out-of-memory under the cap is a result ("does not fit"), not a crash
            if limit is None:
                raise
            console.print(f"[red]{world} processes under {limit} GiB failed:[/] {str(e).splitlines()[-1][:300]}")
            res[world] = {"peak_gib": None, "tokens_per_s": 0.0, "error": str(e).splitlines()[-1][:300]}
    data = {"arch": "llama-2-13b" + (" (tiny)" if a.smoke else ""), "method": "lora r=16 all-linear",
            "base_dtype": "fp32" if a.smoke else "bf16", "seq_len": seq, "cap_gib_per_process": cap,
            "one_gpu_peak_gib": res[1]["peak_gib"], "two_gpu_peak_gib_rank0": res[2]["peak_gib"],
            "two_gpu_fits_cap": cap is not None and "error" not in res[2] and res[2]["peak_gib"] <= cap,
            "two_gpu_error": res[2].get("error"),
            "one_gpu_tokens_per_s": res[1]["tokens_per_s"], "two_gpu_tokens_per_s": res[2]["tokens_per_s"]}
    t = Table(title=f"13B-arch LoRA, seq {seq}: fits 24 GiB per card on 2 cards? ({gpu_name()})")
    for c in ("processes", "cap GiB", "peak GiB", "tok/s"):
        t.add_column(c, justify="right")
    for world, limit in ((1, None), (2, cap)):
        peak = res[world]["peak_gib"]
        t.add_row(str(world), "-" if limit is None else f"{limit:.0f}", "-" if peak is None else f"{peak:.1f}",
                  f"{res[world]['tokens_per_s']:,.0f}")
    console.print(t)
    return data


def _chart(out_dir: Path, name: str, title: str, groups: list[str], series: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=label)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{title} ({gpu_name()})", fontsize=9)
    ax.legend()
    save_figure(fig, name, out_dir)
    plt.close(fig)


def _result_name(part: str, a) -> str:
    """dist_tp, dist_fsdp, dist_fit; a quantized TP run is dist_tp_<quantization> beside the bf16 one, and one
    with ``--all-reduce nccl`` (every sum over NCCL: the comparison for symmetric memory) ends in _nccl, one with
    ``--all-reduce one-shot`` (symmetric memory, no sum fused into a norm) in _oneshot, and one
    with ``--no-decode-gemv`` (cuBLAS for every linear: the comparison for the GEMV) in _cublas, and one with
    ``--no-async`` (each decode step waits for the last one's tokens) in _sync."""
    name = f"dist_{part.replace('-', '_')}"
    if part != "tp":
        return name
    sums = {"auto": "", "nccl": "_nccl", "one-shot": "_oneshot"}[a.all_reduce]
    return (name + (f"_{a.quantization}" if a.quantization else "") + sums + ("" if a.decode_gemv else "_cublas")
            + ("_sync" if a.async_scheduling is False else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("tp", "fsdp", "fsdp-qlora", "fit", "all"), default="all",
                   help="all = tp, fsdp, fit (fsdp-qlora runs only when named)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with gloo; results to a temp dir")
    p.add_argument("--out", type=Path, help="results folder (default docs/results; --smoke: a temp dir)")
    p.add_argument("--prompt", type=int, default=None, help="TP: prompt tokens (default 512; smoke 16)")
    p.add_argument("--decode", type=int, default=None, help="TP: tokens generated per request (default 128; smoke 8)")
    p.add_argument("--batch", type=int, default=None, help="TP: offline batch besides 1 (default 32; smoke 4)")
    p.add_argument("--repeats", type=int, default=3, help="TP: timed bs=1 requests per engine; their median is "
                                                          "reported (each run's figure too)")
    p.add_argument("--quantization", choices=("int8", "rtn-int4", "rtn-int4-g64", "rtn-int4-g32"), default=None,
                   help="TP: quantize on load (both TP=1 and TP=2; each rank quantizes, then keeps its shard)")
    p.add_argument("--all-reduce", choices=("auto", "one-shot", "nccl"), default="auto",
                   help="TP: the engine's tp_all_reduce (auto: small sums through symmetric memory where it runs, "
                        "decode sums fused into the next norm; one-shot: without the fusion)")
    p.add_argument("--no-decode-gemv", dest="decode_gemv", action="store_false",
                   help="TP: the engine's decode_gemv off (cuBLAS for every linear at bs=1)")
    p.add_argument("--no-async", dest="async_scheduling", action="store_const", const=False, default=None,
                   help="TP: the engine's async_scheduling off (the host prepares each step after the last one's "
                        "tokens)")
    p.add_argument("--seq", type=int, default=None, help="FSDP: tokens per row (default 2048; smoke 32)")
    p.add_argument("--rows", type=int, default=1, help="FSDP: rows per GPU per step")
    p.add_argument("--steps", type=int, default=None, help="FSDP: timed steps after 2 warm-up (default 6; smoke 2)")
    p.add_argument("--full-layers", type=int, default=None, help="FSDP full fine-tune layers (default 8; smoke all)")
    p.add_argument("--timeout", type=float, default=540, help="seconds per world size before workers are killed")
    a = p.parse_args()
    if not a.smoke and not (torch.cuda.is_available() and torch.cuda.device_count() >= 2):
        raise SystemExit("dist_scaling needs 2 CUDA GPUs; use --smoke on CPU")
    smoke = a.smoke
    a.prompt = a.prompt or (16 if smoke else 512)
    a.decode = a.decode or (8 if smoke else 128)
    a.batch = a.batch or (4 if smoke else 32)
    a.seq = a.seq or (32 if smoke else 2048)
    a.steps = a.steps or (2 if smoke else 6)
    a.full_layers = a.full_layers if a.full_layers is not None else (None if smoke else 8)
    out_dir = a.out or (Path(tempfile.mkdtemp(prefix="dist_smoke_")) if smoke else None)
    with tempfile.TemporaryDirectory() as scratch:
        for part, fn in (("tp", part_tp), ("fsdp", part_fsdp), ("fsdp-qlora", part_fsdp_qlora), ("fit", part_fit)):
            if a.part == part or (a.part == "all" and part != "fsdp-qlora"):
                data = fn(a, out_dir, Path(scratch))
                console.print(f"wrote {write_result(_result_name(part, a), data, out_dir)}")  # each part as it ends


if __name__ == "__main__":
    main()
