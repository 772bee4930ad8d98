"""Training: onecard's path vs stock HF + PEFT, in one process on one device.

Parts (each fits a 10-minute GPU call; pick with --part):
  speed      Llama-3-8B architecture (random init, bf16), LoRA r=16 all-linear, seq 2048, gradient
             checkpointing, AdamW on the adapter, at each --batch-sizes (default 1,4). Stock HF + PEFT (SDPA, HF
             checkpointing) vs onecard (fused RMSNorm/RoPE/SwiGLU/linear+CE patched in, same checkpointing).
             tokens/s, ms/step, peak GiB per batch size. Targets (issue 8): speedup >= 2.0x, peak <= 0.5x. At bs 1
             the bf16 weights (15 GiB) are most of HF's peak, so 0.5x cannot be met there; at bs 4 activations and
             the 128k-vocab loss (HF: fp32 logits + grads; ours chunked) dominate. memory_floor_note says how much.
  qlora-ctx  Llama-3-8B, onecard int4 base + LoRA r=32 all-linear, bs 1, CPU-offloaded checkpoints, under a
             24 GiB process cap (torch.cuda.set_per_process_memory_fraction): the longest sequence that trains
             one full step (fwd+bwd+optimizer), with its step time. Target 96k. The search starts at the planner's
             prediction for the capped card (or --start-len), gallops (strides double) to the first OOM, then bisects to
             --granularity; no trial starts after --search-budget-s (then the answer is a lower bound).
  loss       The tiny trained model, LoRA, 200 steps from the same seed and data order, both paths through HF
             Trainer; the largest relative loss difference at any logged step. Target < 1%.
  qlora-bases  Llama-3-8B architecture (one random bf16 folder), QLoRA r=16 all-linear, bs 1, seq 2048,
             checkpointing, on three bases: HF + PEFT over bitsandbytes NF4 (the HF QLoRA recipe, without
             prepare_model_for_kbit_training's fp32 casts), onecard over NF4 (--qlora-quant nf4) and onecard over
             its own int4 (the default). tokens/s, ms/step, peak GiB. No issue target; needs bitsandbytes.
  profile    The speed part's setting at --profile-batch-size: one step of each path under torch.profiler, device
             time by kind (matmuls, split into base GEMMs and rank-r adapter products by operand shape; attention;
             norms; ...), beside each path's timed step. speedup_if_only_*: HF's step over onecard's matmuls and
             attention alone, i.e. the most any work on the other kernels could give at this work.
Both paths run the same hand-written loop (autocast, backward, clip 1.0, AdamW) so only the model path differs.

  PYTHONPATH=src python benchmarks/train_vs_hf.py --part speed        # H100: ~3-4 min (bs 1 and 4)
  PYTHONPATH=src python benchmarks/train_vs_hf.py --part qlora-ctx    # H100: < 4 min (search budget 130 s)
  PYTHONPATH=src python benchmarks/train_vs_hf.py --part loss         # H100: ~1-2 min
  PYTHONPATH=src python benchmarks/train_vs_hf.py --part qlora-bases  # H100: ~4-5 min (three 8B loads)
  PYTHONPATH=src python benchmarks/train_vs_hf.py --part profile      # H100: ~2 min (bs 4)
  PYTHONPATH=src python benchmarks/train_vs_hf.py --smoke --part all  # CPU, tiny shapes, writes to a temp dir
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.kernel_profile import (MATMUL_OPS_PATTERN, by_kind, kind_names, matmul_calls, profile_events,
                                         time_per_name)
from onecard.bench.results import gpu_name, save_figure, write_result

console = Console()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _matmul_peak_tflops() -> float | None:
    """This card's dense bf16 matmul rate, measured in this process (an 8192^3 product, mean of 10 after 3
    warm-ups): the ceiling MFU is taken against, so the fractions transfer between cards. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12


def _flops_per_token(smoke: bool, seq: int) -> dict[str, float]:
    """Per-token FLOPs (``plan.speed.train_flops_per_token``): ``model`` counts forward + backward once (the MFU
    convention: recomputation is not useful work); ``onecard`` and ``hf`` what each path executes with
    checkpointing (onecard's recomputation skips the down projection, HF's recomputes the whole layer)."""
    from onecard.plan.spec import spec_from_config
    from onecard.plan.speed import forward_flops_per_token, train_flops_per_token

    spec = spec_from_config(_arch(smoke))
    model = train_flops_per_token(spec, "lora", seq, checkpointing=False)
    return {"model": model, "onecard": train_flops_per_token(spec, "lora", seq, checkpointing=True),
            "hf": model + forward_flops_per_token(spec, seq // 2)}  # HF recomputes a whole forward


def _arch(smoke: bool) -> dict:
    from onecard.models import arch_config, scale_config

    cfg = arch_config("llama-3-8b")
    return scale_config(cfg, "tiny") if smoke else cfg


def _build(smoke: bool, dtype: str):
    """A fresh random-init Llama-3-8B (tiny-scaled in smoke mode) on the benchmark device."""
    from onecard.testing.checkpoints import build_random_model

    return build_random_model(_arch(smoke), dtype, _device())


def _lora_hf(model, r: int, alpha: int):
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def _lora_ours(model, r: int, alpha: int, offload: bool = False, int4: bool = False, fp8: bool = False):
    """onecard's LoRA setup, in ``onecard train``'s order; ``fp8``: frozen fp8 bases (``--precision fp8``)."""
    from onecard.train.checkpointing import enable_checkpointing
    from onecard.train.lora import add_lora
    from onecard.train.patching import patch_model
    from onecard.train.qlora import quantize_model_int4

    model.config.use_cache = False
    if int4:
        quantize_model_int4(model, 64, next(model.parameters()).dtype, progress=True)
        _free()
    patch_model(model)
    if fp8:
        from onecard.train.fp8_base import use_fp8_bases_
        from onecard.train.precision import fp8_linear_filter

        use_fp8_bases_(model, fp8_linear_filter)
    model.requires_grad_(False)
    enable_checkpointing(model, offload=offload)
    return add_lora(model, r, alpha, 0.0, "all-linear", seed=0)


def _step_fn(model, ids: torch.Tensor, opt):
    dev = ids.device.type
    amp = dev == "cuda"

    def step() -> float:
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _time_steps(step, warmup: int, steps: int, card: dict | None = None) -> tuple[float, float]:
    """Seconds per step and the last loss; ``card``, when given, receives ``_card_state`` over the timed steps."""
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    mon = _clock_monitor() if card is not None else None
    t0 = time.perf_counter()
    loss = 0.0
    for _ in range(steps):
        loss = step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    if mon is not None:
        mon.stop()
        dev = torch.cuda.current_device()
        index = nvml_index(mon.reader.uuids, str(getattr(torch.cuda.get_device_properties(dev), "uuid", "")), dev)
        card.update(_card_state(mon.summary(), index))
    return dt, loss


def nvml_index(uuids: dict[int, str | None], torch_uuid: str, fallback: int) -> int:
    """The NVML index of the GPU torch runs on, matched by UUID (NVML's ``GPU-<uuid>``): CUDA_VISIBLE_DEVICES
    renumbers torch's devices, not NVML's. ``fallback`` (torch's index) where no UUID matches."""
    return next((i for i, u in uuids.items() if u and torch_uuid and u.endswith(torch_uuid)), fallback)


def _clock_monitor():
    """NVML sampled every 50 ms (SM clock, power, clock-event reasons), or None without a GPU or NVML."""
    if not torch.cuda.is_available():
        return None
    from onecard.monitor.monitor import Monitor

    mon = Monitor(interval=0.05, allocator=False, pcie=False, attach=False)
    return mon.start() if mon.reader is not None else None


def _card_state(summary: dict, index: int) -> dict:
    """What the card ran at while a path was timed. Why: the two paths load the card differently (onecard's step is
    denser in matmuls), and a power-capped card lowers its clocks under the denser load, which no kernel change
    undoes; these say how much of a speed ratio is clock. Keys are None where NVML did not report."""
    p = f"gpu{index}_"
    sampled = summary.get(p + "slowdown_fraction") is not None and summary.get("duration_s")
    return {"sm_clock_mean_mhz": summary.get(p + "sm_clock_mean_mhz"), "power_mean_w": summary.get(p + "power_mean_w"),
            "power_limit_w": summary.get(p + "power_limit_w"),
            "power_capped_fraction": (summary.get(p + "throttle_s_sw_power_cap", 0.0) / summary["duration_s"]
                                      if sampled else None),
            "slowdown_fraction": summary.get(p + "slowdown_fraction")}


def _steps_for(bs: int, steps: int, warmup: int) -> tuple[int, int]:
    """(timed, warm-up) steps at batch size ``bs``: about the same tokens timed at each size, never under 3 timed."""
    return max(3, round(steps / bs)), min(warmup, 1 if bs > 1 else warmup)


def part_speed(args, out_dir) -> dict:
    """Ours vs HF + PEFT at each batch size: one model per path, a fresh optimizer per batch size."""
    seq = 128 if args.smoke else args.seq_len
    dtype = "float32" if args.smoke else "bfloat16"
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    vocab = _arch(args.smoke)["vocab_size"]
    rows: dict[str, dict[int, dict]] = {"hf_peft": {}, "onecard": {}}
    if args.fp8:
        from onecard.train.precision import fp8_unavailable

        why = fp8_unavailable(_device(), torchao=False)
        if why is not None:
            sys.exit(f"--fp8: {why}")
        rows["onecard_fp8"] = {}
    weights_gib = 0.0
    peak = _matmul_peak_tflops()
    flops = _flops_per_token(args.smoke, seq)
    for name in rows:
        _free()
        model = _build(args.smoke, dtype)
        weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        model = _lora_hf(model, 16, 32) if name == "hf_peft" else _lora_ours(model, 16, 32, fp8=name == "onecard_fp8")
        model.train()
        for bs in sizes:
            _free()
            ids = torch.randint(0, vocab, (bs, seq), generator=torch.Generator().manual_seed(bs)).to(_device())
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            steps, warmup = _steps_for(bs, args.steps, args.warmup)
            card: dict = {}
            try:
                dt, loss = _time_steps(_step_fn(model, ids, opt), warmup, steps, card)
            except torch.cuda.OutOfMemoryError:  # a result too: the other path may train at this size
                rows[name][bs] = {"oom": True, "tokens_per_s": None, "ms_per_step": None, "peak_gib": None,
                                  "loss": None, "steps_timed": 0, "warmup_steps": warmup}
                console.print(f"{name} bs {bs}: out of memory on this card")
                model.zero_grad(set_to_none=True)
                del opt, ids
                continue
            r = {"oom": False, "tokens_per_s": bs * seq / dt, "ms_per_step": dt * 1e3, "peak_gib": _peak_gib(),
                 "loss": loss, "steps_timed": steps, "warmup_steps": warmup, **card}
            rows[name][bs] = r
            console.print(f"{name} bs {bs}: {r['tokens_per_s']:,.0f} tok/s, {r['ms_per_step']:.0f} ms/step, "
                          f"peak {r['peak_gib']} GiB")
            opt.zero_grad(set_to_none=True)
            del opt, ids
        del model
    _free()
    results = []
    for bs in sizes:
        h, o = rows["hf_peft"][bs], rows["onecard"][bs]
        ratio = _ratio(o["peak_gib"], h["peak_gib"])
        speedup = _ratio(o["tokens_per_s"], h["tokens_per_s"])
        results.append({"batch_size": bs, "tokens_per_step": bs * seq, "hf_oom": h["oom"], "onecard_oom": o["oom"],
                        "hf_tokens_per_s": h["tokens_per_s"], "onecard_tokens_per_s": o["tokens_per_s"],
                        "hf_ms_per_step": h["ms_per_step"], "onecard_ms_per_step": o["ms_per_step"],
                        "speedup_vs_hf": speedup,
                        "hf_peak_gib": h["peak_gib"], "onecard_peak_gib": o["peak_gib"], "memory_ratio_vs_hf": ratio,
                        "meets_speed_target": None if speedup is None else speedup >= 2.0,
                        "meets_memory_target": None if ratio is None else ratio <= 0.5,
                        "weights_share_of_hf_peak": (weights_gib / h["peak_gib"]) if h["peak_gib"] else None,
                        "steps_timed": o["steps_timed"], "warmup_steps": o["warmup_steps"],
                        "hf_loss_last_step": h["loss"], "onecard_loss_last_step": o["loss"],
                        **_utilization(h["tokens_per_s"], o["tokens_per_s"], flops, peak),
                        **_card_columns(h, o),
                        **(_fp8_row(rows["onecard_fp8"][bs], h, o) if args.fp8 else {})})
    shares = [f"{r['weights_share_of_hf_peak']:.0%} at bs {r['batch_size']}" for r in results
              if r["weights_share_of_hf_peak"] is not None]
    share = (f"they are {', '.join(shares)} of the HF + PEFT peak" if shares else
             "their share of the HF + PEFT peak is not measured (no CUDA)")
    note = (f"the frozen base weights ({weights_gib:.2f} GiB, {dtype}) are held by both paths; {share}. Peak <= 0.5x "
            "HF is out of reach wherever that share is above 50%: only activations and the loss (HF keeps fp32 "
            "logits and their grads; onecard's loss is chunked) can shrink.")
    if peak:
        note += (f" Against this card's measured bf16 matmul rate ({peak:.0f} TFLOP/s), onecard_mfu counts forward "
                 "+ backward once (model FLOPs); onecard_executed_fraction_of_peak counts what onecard runs (with "
                 "its checkpointing recomputation); speedup_ceiling_vs_hf is the speedup if every executed FLOP ran "
                 "at that rate, and fraction_of_peak_needed_for_2x what a 2x speedup would need.")
    note += (" *_sm_clock_mean_mhz, *_power_mean_w, *_power_capped_fraction (the share of the timed steps NVML "
             "reported the SW power cap holding the clocks) come from NVML samples every 50 ms over each path's "
             "timed steps; onecard_clock_ratio_vs_hf below 1 means onecard's steps ran at a lower SM clock; "
             "*_tokens_per_joule divide tokens/s by that mean board power, and energy_ratio_vs_hf is onecard's "
             "energy per token over HF's.")
    if args.fp8:
        note += (" onecard_fp8_*: onecard's path with --precision fp8 (frozen fp8 e4m3 bases quantized once, "
                 "row-wise scaled activations and gradients, torch._scaled_mm), against the same bf16 HF + PEFT: "
                 "not the same settings, so it does not count for the 2x target.")
    data = {"model": "llama-3-8b (random init)" if not args.smoke else "llama-3-8b scaled tiny (smoke)",
            "method": "lora r=16 alpha=32 all-linear, gradient checkpointing, AdamW on the adapter",
            "seq_len": seq, "batch_sizes": sizes, "dtype": dtype, "base_weights_gib": weights_gib,
            "rows": results, "memory_floor_note": note, "target_speedup": 2.0, "target_memory_ratio": 0.5,
            "matmul_peak_tflops": peak, "model_flops_per_token": flops["model"],
            "onecard_executed_flops_per_token": flops["onecard"], "hf_executed_flops_per_token": flops["hf"]}
    t = Table("bs", "HF tok/s", "ours tok/s", "speedup", "HF peak GiB", "ours peak GiB", "mem ratio", "weights/HF peak",
              "HF MFU", "ours MFU", "2x needs % peak", "targets met", title=f"LoRA training, seq {seq} ({gpu_name()})")
    for r in results:
        met = [k for k, ok in (("2x speed", r["meets_speed_target"]), ("0.5x mem", r["meets_memory_target"])) if ok]
        t.add_row(str(r["batch_size"]), _tok_s(r["hf_tokens_per_s"]), _tok_s(r["onecard_tokens_per_s"]),
                  _fmt(r["speedup_vs_hf"]), _fmt(r["hf_peak_gib"]), _fmt(r["onecard_peak_gib"]),
                  _fmt(r["memory_ratio_vs_hf"]), _fmt(r["weights_share_of_hf_peak"]), _fmt(r["hf_mfu"]),
                  _fmt(r["onecard_mfu"]), _fmt(r["fraction_of_peak_needed_for_2x"]), ", ".join(met) or "none")
    console.print(t)
    if any(r["onecard_sm_clock_mean_mhz"] for r in results):
        tc = Table("bs", "HF SM MHz", "ours SM MHz", "ours/HF clock", "HF W", "ours W", "limit W", "HF power-capped",
                   "ours power-capped", "HF tok/J", "ours tok/J", title="The card while each path was timed (NVML "
                   "every 50 ms)")
        for r in results:
            tc.add_row(str(r["batch_size"]), _fmt(r["hf_sm_clock_mean_mhz"]), _fmt(r["onecard_sm_clock_mean_mhz"]),
                       _fmt(r["onecard_clock_ratio_vs_hf"]), _fmt(r["hf_power_mean_w"]), _fmt(r["onecard_power_mean_w"]),
                       _fmt(r["power_limit_w"]), _fmt(r["hf_power_capped_fraction"]),
                       _fmt(r["onecard_power_capped_fraction"]), _fmt(r["hf_tokens_per_joule"]),
                       _fmt(r["onecard_tokens_per_joule"]))
        console.print(tc)
    if args.fp8:
        t8 = Table("bs", "fp8 tok/s", "vs HF (bf16)", "vs ours bf16", "fp8 peak GiB", "fp8 loss", "bf16 loss",
                   title="onecard --precision fp8 (frozen fp8 bases)")
        for r in results:
            t8.add_row(str(r["batch_size"]), _tok_s(r["onecard_fp8_tokens_per_s"]), _fmt(r["fp8_speedup_vs_hf"]),
                       _fmt(r["fp8_speedup_vs_onecard_bf16"]), _fmt(r["onecard_fp8_peak_gib"]),
                       _fmt(r["onecard_fp8_loss_last_step"]), _fmt(r["onecard_loss_last_step"]))
        console.print(t8)
    console.print(note)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(sizes))
    arms = [(n, c, lab) for n, c, lab in (("hf_peft", "grey", "HF + PEFT"), ("onecard", "tab:blue", "onecard"),
                                          ("onecard_fp8", "tab:orange", "onecard fp8")) if n in rows]
    width = 0.8 / len(arms)
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_gib", "peak GiB")):
        for k, (name, color, arm) in enumerate(arms):
            ax.bar([i + (k - (len(arms) - 1) / 2) * width for i in x], [rows[name][b][key] or 0 for b in sizes],
                   width, color=color, label=arm)
        ax.set_xticks(list(x), [f"bs {b}" for b in sizes])
        ax.set_ylabel(label)
    axes[1].axhline(weights_gib, color="black", ls=":", label="base weights")
    axes[1].legend()
    fig.suptitle(f"LoRA r=16, seq {seq}, {gpu_name()}")
    write_result("train_speed", data, out_dir)
    save_figure(fig, "train_speed", out_dir)
    return data


def _utilization(hf_tok_s: float | None, ours_tok_s: float | None, flops: dict[str, float],
                 peak_tflops: float | None) -> dict[str, float | None]:
    """MFU of both paths, how much of the card onecard's executed FLOPs use, and what 2x would need of it."""
    def frac(tok_s: float | None, per_token: float) -> float | None:
        return tok_s * per_token / (peak_tflops * 1e12) if tok_s and peak_tflops else None

    ceiling = peak_tflops * 1e12 / flops["onecard"] if peak_tflops else None
    return {"hf_mfu": frac(hf_tok_s, flops["model"]), "onecard_mfu": frac(ours_tok_s, flops["model"]),
            "onecard_executed_fraction_of_peak": frac(ours_tok_s, flops["onecard"]),
            "hf_executed_fraction_of_peak": frac(hf_tok_s, flops["hf"]),
            "speedup_ceiling_vs_hf": ceiling / hf_tok_s if ceiling and hf_tok_s else None,
            "fraction_of_peak_needed_for_2x": frac(2 * hf_tok_s, flops["onecard"]) if hf_tok_s else None}


CARD_KEYS = ("sm_clock_mean_mhz", "power_mean_w", "power_capped_fraction", "slowdown_fraction")


def _card_columns(h: dict, o: dict) -> dict:
    """Each path's ``_card_state`` as ``hf_*`` / ``onecard_*`` columns, the card's power limit, and onecard's mean
    SM clock over HF's (below 1: onecard's steps ran at a lower clock)."""
    cols = {f"{name}_{k}": row.get(k) for name, row in (("hf", h), ("onecard", o)) for k in CARD_KEYS}
    cols["power_limit_w"] = o.get("power_limit_w") or h.get("power_limit_w")
    cols["onecard_clock_ratio_vs_hf"] = _ratio(o.get("sm_clock_mean_mhz"), h.get("sm_clock_mean_mhz"))
    for name, row in (("hf", h), ("onecard", o)):  # tokens per joule of board energy: mean power over the timed steps
        cols[f"{name}_tokens_per_joule"] = _ratio(row.get("tokens_per_s"), row.get("power_mean_w"))
    cols["energy_ratio_vs_hf"] = _ratio(cols["hf_tokens_per_joule"], cols["onecard_tokens_per_joule"])
    return cols


def _fp8_row(f: dict, h: dict, o: dict) -> dict:
    """The fp8 arm's figures at one batch size, against HF + PEFT (bf16) and onecard's own bf16 path."""
    return {"onecard_fp8_oom": f["oom"], "onecard_fp8_tokens_per_s": f["tokens_per_s"],
            "onecard_fp8_ms_per_step": f["ms_per_step"], "onecard_fp8_peak_gib": f["peak_gib"],
            "onecard_fp8_loss_last_step": f["loss"],
            "fp8_speedup_vs_hf": _ratio(f["tokens_per_s"], h["tokens_per_s"]),
            "fp8_speedup_vs_onecard_bf16": _ratio(f["tokens_per_s"], o["tokens_per_s"]),
            "fp8_memory_ratio_vs_hf": _ratio(f["peak_gib"], h["peak_gib"])}


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either side is missing (a run out of memory, no CUDA peak on the CPU)."""
    return a / b if a and b else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _tok_s(v: float | None) -> str:
    return "OOM" if v is None else f"{v:,.0f}"


def _try_len(model, opt, seq: int, vocab: int) -> tuple[bool, float | None]:
    ids = torch.randint(0, vocab, (1, seq), device=_device())
    step = _step_fn(model, ids, opt)
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return True, time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return False, None
    finally:
        del ids
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _planned_len(cfg: dict, cap_gib: float, max_len: int) -> int:
    """The planner's longest QLoRA r=32 sequence (offloaded checkpoints, bs 1) under the cap on this card, before
    anything is loaded: where the search starts. The config's max_position_embeddings is lifted to ``max_len``
    (random init: RoPE extends to any length)."""
    from dataclasses import replace

    from onecard.plan import live_card_memory, plan_training

    card = live_card_memory()
    card = replace(card, cap_fraction=min(1.0, cap_gib * 2**30 / card.total_bytes))
    plan = plan_training({**cfg, "max_position_embeddings": max_len}, memory=card, method="qlora", seq_len=2048,
                         lora_rank=32, fused_ce=True, offload_checkpoints=True, gpu_memory_utilization=1.0)
    return plan.max_seq_len


def search_longest(ok, start: int, step: int, limit: int, more) -> tuple[int | None, int | None]:
    """(longest n <= limit, a multiple of ``step``, with ok(n); the shortest n that failed) by galloping from
    ``start`` (strides double) then bisecting. ``ok`` is monotone (longer never fits where shorter did not);
    ``more()`` says whether another trial may start, so with a time budget the answer is a lower bound."""
    good, bad, n, stride = None, None, start, step
    while (good is None or bad is None) and more():
        if ok(n):
            good = n
            if good >= limit:
                break
            n = min(good + stride, limit)
        else:
            bad = n
            if good is None:
                if bad <= step:
                    break  # not even the shortest fits
                n = max(bad - stride, step)
        stride *= 2
    while good is not None and bad is not None and bad - good > step and more():
        mid = (good + bad) // 2 // step * step
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good, bad


def part_qlora_ctx(args, out_dir) -> dict:
    from onecard.monitor.allocator import user_alloc_conf

    dtype = "float32" if args.smoke else "bfloat16"
    cfg = _arch(args.smoke)
    _free()
    cap_gib = args.cap_gib
    planned = _planned_len(cfg, cap_gib, args.max_len) if torch.cuda.is_available() else None  # before loading
    model = _lora_ours(_build(args.smoke, dtype), 32, 64, offload=True, int4=True).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
        _free()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    max_len = args.max_len if not args.smoke else 1024
    step_tokens = args.granularity if not args.smoke else 64
    start = args.start_len or (128 if args.smoke else 8192)
    if planned and args.start_len is None:  # begin where the planner says the longest fitting sequence is: fewer
        start = max(step_tokens, min(planned // step_tokens * step_tokens, max_len))  # ~40-80 s trials near 100k
    trials = []

    def attempt(n: int) -> bool:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ok, dt = _try_len(model, opt, n, cfg["vocab_size"])
        reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
        over = reserved is not None and reserved > cap_gib  # the allocator's own cap is checked, not assumed
        trials.append((n, ok and not over, dt, _peak_gib(), reserved))
        console.print(f"  seq {n:>7,}: {'ok' if ok and not over else 'OOM' if not ok else 'over the cap'}"
                      + (f" {dt:.1f} s/step" if ok else "") + (f", {reserved:.2f} GiB reserved" if reserved else ""))
        return ok and not over

    attempt(min(start, 4 * step_tokens))  # warm-up: Triton compiles and cuBLAS plans are not timed at the maximum
    deadline = time.perf_counter() + args.search_budget_s
    ok_len, bad_len = search_longest(attempt, start, step_tokens, max_len, lambda: time.perf_counter() < deadline)
    best = [t for t in trials if t[0] == ok_len and t[1]][-1:]  # the last: never the warm-up
    data = {"model": "llama-3-8b (random init)" if not args.smoke else "llama-3-8b scaled tiny (smoke)",
            "method": "qlora (onecard int4 RTN g64 base) r=32 alpha=64 all-linear, offloaded checkpoints, bs 1",
            "memory_cap_gib": cap_gib if torch.cuda.is_available() else None,
            "cap_enforced": torch.cuda.is_available(), "base_weights_gib": weights_gib,
            "max_trainable_tokens": ok_len, "first_oom_tokens": bad_len,
            "search_limit_tokens": max_len, "search_granularity_tokens": step_tokens,
            "search_start_tokens": start, "planner_predicted_tokens": planned, "search_budget_s": args.search_budget_s,
            "step_seconds_at_max": best[0][2] if best else None,
            "tokens_per_s_at_max": (ok_len / best[0][2]) if best and best[0][2] else None,
            "target_tokens": 96 * 1024, "unsloth_reported_24gb_tokens": 78475, "hf_fa2_reported_24gb_tokens": 5789,
            "allocator_conf": user_alloc_conf(),  # NAME=value, whichever of the two variables is set
            "peak_reserved_gib_at_max": best[0][4] if best else None,
            "trials": [{"tokens": s, "ok": ok, "step_s": dt, "peak_gib": pk, "peak_reserved_gib": rs}
                       for s, ok, dt, pk, rs in trials]}
    converged = ok_len == max_len or (ok_len is not None and bad_len is not None and bad_len - ok_len <= step_tokens)
    data["search_converged"] = converged
    console.print(f"longest trainable sequence: {ok_len or 0:,} tokens" + (f" ({best[0][2]:.1f} s/step)" if best else "")
                  + (f" (search limit {max_len:,} reached, no OOM)" if ok_len == max_len else "")
                  + ("" if converged else " (a lower bound: the search budget ran out)"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    oks = [(s, pk) for s, ok, _, pk, _ in trials if ok and pk is not None]
    if oks:
        ax.plot([s for s, _ in oks], [p for _, p in oks], "o-", label="peak GiB (ok)")
    ax.axhline(cap_gib, color="red", ls="--", label=f"{cap_gib} GiB cap")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak GiB")
    ax.legend()
    ax.set_title(f"QLoRA r=32 longest context: {ok_len or 0:,} tokens")
    write_result("train_qlora_ctx", data, out_dir)
    save_figure(fig, "train_qlora_ctx", out_dir)
    model = opt = None  # free them (a closure above holds the names)
    _free()
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)
    return data


def part_loss(args, out_dir) -> dict:
    from onecard.testing import local_corpus, train_tiny_model
    from onecard.train.data import load_training_data
    from onecard.train.reference import compare_loss_curves
    from onecard.train.trainer import TrainConfig, load_tokenizer, resolve_precision

    steps = 12 if args.smoke else args.loss_steps
    tiny = train_tiny_model(progress=True)
    tmp = Path(tempfile.mkdtemp(prefix="onecard-loss-"))
    for i, text in enumerate(local_corpus().train[:200]):
        (tmp / f"doc{i:03d}.txt").write_text(text)
    device = _device()
    precision = resolve_precision(args.loss_precision, device)
    cfg = TrainConfig(model=tiny.path, data=tmp, out=tmp / "unused", seq_len=256 if not args.smoke else 64,
                      batch_size=8 if not args.smoke else 2, max_steps=steps, lr=1e-3, lora_r=16, lora_alpha=32,
                      logging_steps=1 if args.smoke else 10, eval_steps=0, save_steps=10**6, progress=False,
                      device=device, gradient_checkpointing=not args.smoke)
    tok = load_tokenizer(cfg.model)
    train_ds, _, _ = load_training_data(tmp, tok, cfg.seq_len, 0.0, use_cache=False)
    ours, ref = compare_loss_curves(cfg, tok, train_ds, precision, device)
    rel = [abs(a - b) / abs(b) for (_, a), (_, b) in zip(ours, ref)]
    data = {"model": f"onecard tiny Llama ({tiny.parameters / 1e6:.1f}M params, trained on the stdlib corpus)",
            "method": "lora r=16 alpha=32 all-linear", "precision": precision,
            "hf_precision": "bf16" if precision == "fp8" else precision, "steps": steps,
            "logging_steps": cfg.logging_steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
            "max_relative_loss_diff": max(rel), "mean_relative_loss_diff": sum(rel) / len(rel),
            "within_1_percent_every_step": max(rel) < 0.01,
            "onecard_final_loss": ours[-1][1], "hf_final_loss": ref[-1][1],
            "onecard_curve": ours, "hf_curve": ref}
    console.print(f"loss curves over {steps} steps: max relative difference {max(rel):.2e} "
                  f"({'within' if max(rel) < 0.01 else 'NOT within'} 1%)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in ref], [l for _, l in ref], label="HF Trainer + PEFT", lw=3, alpha=0.5)
    ax.plot([s for s, _ in ours], [l for _, l in ours], label="onecard" + (" (fp8 bases)" if precision == "fp8" else ""),
            lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.set_title(f"LoRA loss curves ({precision}, max rel. diff {max(rel):.1e})")
    name = "train_loss_fp8" if precision == "fp8" else "train_loss"  # fp8: ours in fp8 against HF in bf16
    write_result(name, data, out_dir)
    save_figure(fig, name, out_dir)
    return data


def part_qlora_bases(args, out_dir) -> dict:
    """QLoRA on three bases in one process: HF + PEFT over NF4, onecard over NF4, onecard over its int4."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from onecard.testing.checkpoints import benchmark_model, make_random_checkpoint
    from onecard.train.qlora import load_nf4_model

    if importlib.util.find_spec("bitsandbytes") is None:
        sys.exit("--part qlora-bases needs bitsandbytes (pip install 'onecard[bnb]')")
    seq = 128 if args.smoke else args.seq_len
    dtype = torch.float32 if args.smoke else torch.bfloat16
    path = (make_random_checkpoint("llama-3-8b", "tiny") if args.smoke else benchmark_model(None, "llama-3-8b",
                                                                                             console))
    vocab = _arch(args.smoke)["vocab_size"]
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1)).to(_device())
    steps, warmup = _steps_for(1, args.steps, args.warmup)
    arms = {"hf_nf4": "HF + PEFT, bitsandbytes NF4", "onecard_nf4": "onecard, --qlora-quant nf4",
            "onecard_int4": "onecard, int4 base (default)"}
    rows = {}
    for name in arms:
        _free()
        if name == "onecard_int4":
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa",
                                                         device_map={"": _device()})
            model = _lora_ours(model, 16, 32, int4=True)
        else:
            model = load_nf4_model(path, dtype, _device())  # as onecard train --qlora-quant nf4 loads it
            model = _lora_hf(model, 16, 32) if name == "hf_nf4" else _lora_ours(model, 16, 32)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        dt, loss = _time_steps(_step_fn(model, ids, opt), warmup, steps)
        rows[name] = {"tokens_per_s": seq / dt, "ms_per_step": dt * 1e3, "peak_gib": _peak_gib(), "loss": loss}
        console.print(f"{arms[name]}: {rows[name]['tokens_per_s']:,.0f} tok/s, {rows[name]['ms_per_step']:.0f} "
                      f"ms/step, peak {_fmt(rows[name]['peak_gib'])} GiB")
        del model, opt
    _free()
    ref = rows["hf_nf4"]
    data = {"model": "llama-3-8b (random init)" if not args.smoke else "llama-3-8b scaled tiny (smoke)",
            "method": "qlora r=16 alpha=32 all-linear, batch 1, gradient checkpointing, AdamW on the adapter",
            "seq_len": seq, "steps_timed": steps, "warmup_steps": warmup, "dtype": str(dtype).split(".")[-1],
            "note": "HF + PEFT without prepare_model_for_kbit_training (it would cast the embeddings and head to "
                    "fp32); the NF4 arms load the same folder through transformers' BitsAndBytesConfig "
                    "(double-quantized NF4, bf16 compute), the int4 arm quantizes it with onecard's RTN g64"}
    for name, r in rows.items():
        data.update({f"{name}_{k}": v for k, v in r.items()})
        if name != "hf_nf4":
            data[f"{name}_speedup_vs_hf_nf4"] = _ratio(r["tokens_per_s"], ref["tokens_per_s"])
            data[f"{name}_memory_ratio_vs_hf_nf4"] = _ratio(r["peak_gib"], ref["peak_gib"])
    t = Table("base", "tok/s", "ms/step", "peak GiB", "speedup vs HF NF4", "memory vs HF NF4",
              title=f"QLoRA bases, seq {seq}, bs 1 ({gpu_name()})")
    for name, r in rows.items():
        t.add_row(arms[name], _tok_s(r["tokens_per_s"]), _fmt(r["ms_per_step"]), _fmt(r["peak_gib"]),
                  _fmt(data.get(f"{name}_speedup_vs_hf_nf4", 1.0)),
                  _fmt(data.get(f"{name}_memory_ratio_vs_hf_nf4", 1.0)))
    console.print(t)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = ["grey", "tab:orange", "tab:blue"]
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_gib", "peak GiB")):
        ax.bar(range(len(rows)), [r[key] or 0 for r in rows.values()], color=colors)
        ax.set_xticks(range(len(rows)), [arms[n].replace(", ", "\n") for n in rows], fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(f"QLoRA r=16, seq {seq}, bs 1, {gpu_name()}")
    write_result("train_qlora_bases", data, out_dir)
    save_figure(fig, "train_qlora_bases", out_dir)
    return data


PROFILE_KINDS = (("matmuls", r"gemm|gemv|nvjet|cutlass|xmma|splitkreduce|" + MATMUL_OPS_PATTERN),
                 ("attention", r"flash|fmha|sdpa|attention"),
                 ("norms", r"norm"),
                 ("swiglu", r"silu|swiglu|glu"),
                 ("rope", r"rope|rotary"),
                 ("loss", r"cross_entropy|_ce_|logsumexp|log_softmax|nll"),
                 ("optimizer", r"adam|multi_tensor|foreach"),
                 ("elementwise", r"elementwise|vectorized|reduce|copy|fill|cat|index|add|mul"))
ADAPTER_MAX_DIM = 64  # a matmul with an operand dimension this small is a rank-r adapter product, not a base GEMM


def adapter_split(calls) -> tuple[float, float]:
    """(base, adapter) µs of the profiled matmul ops: an op is an adapter product when one of its operands has a
    dimension of at most ``ADAPTER_MAX_DIM`` (the LoRA rank), a base GEMM otherwise (the LM head's included)."""
    adapter = sum(c.us for c in calls if any(0 < d <= ADAPTER_MAX_DIM for s in c.shapes for d in s[-2:]))
    return sum(c.us for c in calls) - adapter, adapter


def part_profile(args, out_dir) -> dict:
    """Where one LoRA step's device time goes, HF + PEFT and onecard at one batch size, in one process; and how
    fast onecard's step could be if only its matmuls and attention took time (the bound behind the 2x target)."""
    seq = 128 if args.smoke else args.seq_len
    dtype = "float32" if args.smoke else "bfloat16"
    bs = args.profile_batch_size
    vocab = _arch(args.smoke)["vocab_size"]
    ids = torch.randint(0, vocab, (bs, seq), generator=torch.Generator().manual_seed(bs)).to(_device())
    data: dict = {"model": "llama-3-8b (random init)" if not args.smoke else "llama-3-8b scaled tiny (smoke)",
                  "method": "lora r=16 alpha=32 all-linear, gradient checkpointing, AdamW on the adapter",
                  "seq_len": seq, "batch_size": bs, "dtype": dtype}
    for name in ("hf_peft", "onecard"):
        _free()
        model = _build(args.smoke, dtype)
        model = _lora_hf(model, 16, 32) if name == "hf_peft" else _lora_ours(model, 16, 32)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = _step_fn(model, ids, opt)
        steps, warmup = _steps_for(bs, args.steps, args.warmup)
        dt, _ = _time_steps(step, warmup, steps)
        events = profile_events(step, record_shapes=True)
        kinds = by_kind(time_per_name(events), PROFILE_KINDS)
        base, adapter = adapter_split(matmul_calls(events))
        data[f"{name}_step_ms"] = dt * 1e3
        data[f"{name}_kernel_ms"] = sum(kinds.values()) / 1e3
        data.update({f"{name}_{k}_ms": v / 1e3 for k, v in kinds.items()})
        data[f"{name}_matmuls_base_ms"], data[f"{name}_matmuls_adapter_ms"] = base / 1e3, adapter / 1e3
        console.print(f"{name}: {dt * 1e3:.0f} ms a step, {data[f'{name}_kernel_ms']:.0f} ms of kernels")
        del model, opt, step, events
    _free()
    hf = data["hf_peft_step_ms"]
    floor = data["onecard_matmuls_base_ms"] + data["onecard_attention_ms"]
    with_adapters = floor + data["onecard_matmuls_adapter_ms"]
    data.update({"speedup_vs_hf": _ratio(hf, data["onecard_step_ms"]), "step_ms_for_2x": hf / 2,
                 "onecard_base_matmuls_and_attention_ms": floor,
                 "speedup_if_only_base_matmuls_and_attention": _ratio(hf, floor),
                 "speedup_if_only_matmuls_and_attention": _ratio(hf, with_adapters),
                 "ms_left_for_everything_else_at_2x": hf / 2 - with_adapters})
    kinds = kind_names(PROFILE_KINDS)
    t = Table("kind", "HF + PEFT ms", "onecard ms", title=f"one LoRA step, bs {bs}, seq {seq} ({gpu_name()})")
    for k in kinds:
        t.add_row(k, _fmt(data[f"hf_peft_{k}_ms"]), _fmt(data[f"onecard_{k}_ms"]))
        if k == "matmuls":
            t.add_row("  of which adapters", _fmt(data["hf_peft_matmuls_adapter_ms"]),
                      _fmt(data["onecard_matmuls_adapter_ms"]))
    t.add_row("kernels", _fmt(data["hf_peft_kernel_ms"]), _fmt(data["onecard_kernel_ms"]))
    t.add_row("step (wall)", _fmt(data["hf_peft_step_ms"]), _fmt(data["onecard_step_ms"]))
    console.print(t)
    console.print(f"speedup {_fmt(data['speedup_vs_hf'])}x; with only base matmuls + attention "
                  f"{_fmt(data['speedup_if_only_base_matmuls_and_attention'])}x, adapters too "
                  f"{_fmt(data['speedup_if_only_matmuls_and_attention'])}x; 2x leaves "
                  f"{_fmt(data['ms_left_for_everything_else_at_2x'])} ms for everything else")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for i, name in enumerate(("hf_peft", "onecard")):
        left = 0.0
        for j, k in enumerate(kinds):
            v = data[f"{name}_{k}_ms"]
            ax.barh(i, v, left=left, color=f"C{j}", label=k if i == 0 else None)
            left += v
    ax.axvline(hf / 2, color="black", ls="--", label="2x HF's step")
    ax.set_yticks([0, 1], ["HF + PEFT", "onecard"])
    ax.set_xlabel("ms of kernels in one step")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title(f"Where a LoRA step goes: Llama-3-8B arch, bs {bs}, seq {seq} ({gpu_name()})")
    fig.tight_layout()
    write_result("train_profile", data, out_dir)
    save_figure(fig, "train_profile", out_dir)
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("speed", "qlora-ctx", "loss", "qlora-bases", "profile", "all"), default="speed")
    p.add_argument("--smoke", action="store_true", help="CPU-sized shapes; results go to a temp dir or --out")
    p.add_argument("--out", type=Path, default=None, help="result folder (default docs/results; temp dir in smoke)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-sizes", default="1,4", help="speed part: comma-separated micro-batch sizes")
    p.add_argument("--fp8", action="store_true", help="speed part: also time onecard with --precision fp8 "
                   "(frozen fp8 bases; Ada/Hopper), reported beside the bf16 rows, not as the target")
    p.add_argument("--profile-batch-size", type=int, default=4, help="profile part: the micro-batch size profiled")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--start-len", type=int, default=None, help="qlora-ctx: first length tried (default: the "
                   "planner's prediction on a GPU, else 8192): a known-good length skips the climb to it")
    p.add_argument("--max-len", type=int, default=262144)
    p.add_argument("--granularity", type=int, default=4096)
    p.add_argument("--search-budget-s", type=float, default=130.0, help="qlora-ctx: no new trial starts after this "
                   "many seconds of searching (a step near 100k tokens takes ~40 s on an H100)")
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--loss-precision", default="auto", help="loss part: auto (bf16 on the GPU) | bf16 | fp32 | fp8 "
                   "(onecard's frozen fp8 bases against HF + PEFT in bf16; writes train_loss_fp8)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="onecard-train-smoke-")) if args.smoke else None)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (use --smoke on CPU)")
    parts = ("speed", "qlora-ctx", "loss") if args.part == "all" else (args.part,)
    if "qlora-ctx" in parts:  # as `onecard train` runs (set before CUDA starts; the speed part then shares it)
        from onecard.monitor.allocator import prefer_expandable_segments

        prefer_expandable_segments()
    for part in parts:
        console.rule(part)
        {"speed": part_speed, "qlora-ctx": part_qlora_ctx, "loss": part_loss,
         "qlora-bases": part_qlora_bases, "profile": part_profile}[part](args, out_dir)
    console.print(f"results in {out_dir or 'docs/results'}")


if __name__ == "__main__":
    main()
