"""Training precision benchmark done right (the seed's §2.2.2 converted one model in place and timed one forward).

For each mode a *fresh* model is loaded from disk (no precision lost from an
earlier conversion), warmed up, then timed over several forward+backward steps
with the device synchronised; tokens/s and peak GiB are reported per mode.

Modes (mixed precision = fp32 master weights + autocast, as a trainer runs):
- ``fp32``: fp32 everywhere, TF32 tensor cores off;
- ``tf32``: fp32 weights, TF32 matmuls (CUDA Ampere+ only);
- ``fp16``: autocast fp16 with a GradScaler (the scaler is part of the step);
- ``bf16``: autocast bf16, no scaler (ERRATA 8: bf16 does not need one);
- ``fp8``: torchao float8 training linears (Ada/Hopper, torchao installed).
A mode the machine cannot run is reported as skipped with the reason, never timed on something else.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from onecard.errors import BadInputError

MODES = ("fp32", "tf32", "fp16", "bf16", "fp8")


@dataclass
class PrecisionResult:
    mode: str
    tokens_per_second: float | None
    ms_per_step: float | None
    peak_gib: float | None
    loss: float | None
    skipped: str | None = None


def _skip_reason(mode: str, device: str) -> str | None:
    cuda = device.startswith("cuda")
    if mode in ("tf32", "fp16", "fp8") and not cuda:
        return f"{mode} needs a CUDA GPU"
    if mode == "tf32" and torch.cuda.get_device_capability()[0] < 8:
        return "TF32 needs an Ampere or newer GPU"
    if mode == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if mode == "fp8":
        return fp8_unavailable(device)
    return None


def fp8_unavailable(device: str, torchao: bool = True) -> str | None:
    """Why fp8 training cannot run on ``device`` (None: it can); ``torchao``: it needs torchao's float8 linears
    (trained weights), not only onecard's frozen fp8 bases (LoRA)."""
    from onecard.kernels.fp8_quant import rowwise_fp8_problem

    if not device.startswith("cuda"):
        return "fp8 training needs a CUDA GPU (Ada sm_89 or Hopper sm_90)"
    why = rowwise_fp8_problem(torch.cuda.get_device_capability(torch.device(device)))
    if why is not None:
        return why
    if torchao and importlib.util.find_spec("torchao") is None:
        return "fp8 training of full weights needs torchao (pip install torchao)"
    return None


def fp8_linear_filter(module: torch.nn.Module, name: str) -> bool:
    """Which linears become float8: not the output head (its 128k-wide logits feed the loss, where fp8 costs
    accuracy, as torchao's own recipes also leave it out), and only shapes fp8 matmuls take (both dims a multiple
    of 16)."""
    if name.split(".")[-1] == "lm_head" or not isinstance(module, torch.nn.Linear):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def use_fp8_linears_(model: torch.nn.Module) -> int:
    """Swap the model's eligible linears for torchao's ``Float8Linear`` (dynamic scaling, bf16 autocast around
    them); returns how many. Frozen bases work too (their input gradient is an fp8 matmul)."""
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=fp8_linear_filter)
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def benchmark_precision(model_dir: str | Path, modes: tuple[str, ...] = MODES, seq_len: int = 512,
                        batch_size: int = 1, steps: int = 5, warmup: int = 2, device: str | None = None,
                        seed: int = 0) -> list[PrecisionResult]:
    """Forward+backward throughput and peak memory per precision mode, a fresh model for each."""
    from transformers import AutoModelForCausalLM

    from onecard.models import open_model_folder

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise BadInputError(f"unknown precision mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if steps < 1 or warmup < 0 or seq_len < 2 or batch_size < 1:
        raise BadInputError("precision benchmark needs steps >= 1, warmup >= 0, seq_len >= 2, batch_size >= 1")
    folder = open_model_folder(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab = folder.config["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
    results = []
    for mode in modes:
        reason = _skip_reason(mode, device)
        if reason:
            results.append(PrecisionResult(mode, None, None, None, None, skipped=reason))
            continue
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa",
                                                     device_map={"": device}).train()
        if mode == "fp8":
            use_fp8_linears_(model)
        old_tf32 = torch.backends.cuda.matmul.allow_tf32 if device.startswith("cuda") else None
        if old_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}.get(mode)
        scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

        def step() -> float:
            with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = model(input_ids=ids, labels=ids).loss
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        try:
            for _ in range(warmup):
                step()
            _sync(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            _sync(device)
            dt = (time.perf_counter() - t0) / steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            results.append(PrecisionResult(mode, batch_size * seq_len / dt, dt * 1e3, peak, loss))
        finally:
            if old_tf32 is not None:
                torch.backends.cuda.matmul.allow_tf32 = old_tf32
            model = opt = None  # free this mode's weights before the next (the closure above holds the names)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return results
