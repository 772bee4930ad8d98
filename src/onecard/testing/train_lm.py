"""The training loop of onecard's own small language models (the tiny test model, the benchmarks' medium one).

No weights can be downloaded, so quality checks train their models here from
the local corpus: plain HF transformers model, AdamW (weight decay 0.1,
betas 0.9/0.95), linear warm-up over the first 5% of steps then cosine decay,
gradient-norm clip 1.0, random ``seq_len`` windows of one long token stream.
One loop for every such model, so a fix or a change of recipe reaches all of
them; the tiny model's cached folder is keyed by its settings, not by this code,
so this loop must keep its numerics.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch


def train_lm(model: torch.nn.Module, train_ids: torch.Tensor, steps: int, seq_len: int, batch_size: int, lr: float, *,
             generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
             fused: bool | None = None, progress: bool = False, label: str = "training", console=None,
             train_labels: torch.Tensor | None = None, on_step: Callable[[int], None] | None = None,
             window_starts: torch.Tensor | None = None) -> float:
    """Train ``model`` (in place, left in train mode) for ``steps`` steps; returns the seconds the loop took.

    Windows are drawn on ``train_ids``' device from ``generator`` (the global RNG when None);
    ``autocast_dtype`` runs the forward under ``torch.autocast`` (bf16 on a GPU); ``fused`` is AdamW's.
    ``train_labels`` (aligned with ``train_ids``, -100 where no loss is taken) trains on part of the stream only,
    e.g. a copy task's copies; by default every token is a label. ``on_step(n)`` runs after optimizer step ``n``
    (1-based), e.g. to evaluate and keep the best weights. ``window_starts`` (offsets into ``train_ids``): windows
    begin only there, e.g. at a copy task's pair starts so that every copy's source is inside its window.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    autocast = (lambda: torch.autocast(train_ids.device.type, dtype=autocast_dtype)) if autocast_dtype else \
        contextlib.nullcontext
    t0 = time.perf_counter()
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(console=console, transient=True)
        bar.start()
        task = bar.add_task(label, total=steps)
    try:
        for step in range(1, steps + 1):
            if window_starts is None:
                starts = torch.randint(0, train_ids.numel() - seq_len - 1, (batch_size,), generator=generator,
                                       device=train_ids.device)
            else:
                starts = window_starts[torch.randint(0, window_starts.numel(), (batch_size,), generator=generator,
                                                     device=window_starts.device)]
            offsets = starts.tolist()
            batch = torch.stack([train_ids[s : s + seq_len] for s in offsets])
            labels = batch if train_labels is None else torch.stack([train_labels[s : s + seq_len] for s in offsets])
            with autocast():
                loss = model(input_ids=batch, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if bar:
                bar.update(task, advance=1, description=f"{label} (loss {loss.item():.2f})")
            if on_step:
                on_step(step)
    finally:
        if bar:
            bar.stop()
    return time.perf_counter() - t0


def save_float_folder(model, tokenizer_dir: Path, dest: Path) -> None:
    """Write ``model`` as an fp32 HF folder (safetensors, ``torch_dtype: float32``) with the tokenizer's files."""
    model.float().save_pretrained(str(dest), safe_serialization=True)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)
