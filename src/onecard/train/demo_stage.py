"""``onecard demo`` train stage: LoRA on the tiny model for a few steps of local text, loss before/after."""

from __future__ import annotations

import shutil
import time


def demo_stage(ctx):
    """~20 LoRA steps on a slice of the stdlib corpus (CPU < 1 min); puts the adapter in ctx.artifacts['lora_dir']."""
    import torch

    from onecard.demo import StageResult
    from onecard.testing import local_corpus
    from onecard.train.trainer import TrainConfig, train

    t0 = time.perf_counter()
    data = ctx.workdir / "train-data"
    data.mkdir(parents=True, exist_ok=True)
    # A small fixed slice seen several times in 20 steps, so the loss falls clearly rather than within batch noise.
    for i, text in enumerate(local_corpus().train[:4]):
        (data / f"doc{i:02d}.txt").write_text(text[:3000])
    out = ctx.workdir / "lora-run"
    shutil.rmtree(out, ignore_errors=True)  # the demo's own scratch run: a repeated demo starts it afresh
    cfg = TrainConfig(model=ctx.artifacts["model_dir"], data=data, out=out, method="lora", seq_len=128,
                      batch_size=2, max_steps=20, lr=2e-3, lora_r=8, lora_alpha=16, logging_steps=5, eval_steps=20,
                      val_fraction=0.1, max_eval_rows=8, save_steps=1000, device=ctx.device, progress=False,
                      gradient_checkpointing=ctx.device != "cpu")
    with torch.random.fork_rng():
        result = train(cfg, console=ctx.console)
    ctx.artifacts["lora_dir"] = result.weights_dir
    first, last = result.train_loss[0][1], result.train_loss[-1][1]
    ev = f", eval ppl {result.eval[-1][2]:.1f}" if result.eval else ""
    return StageResult("train (LoRA)", f"{result.steps} steps on {ctx.device}: mean train loss of the first 5 steps "
                       f"{first:.3f} -> last 5 {last:.3f}{ev}, "
                       f"{result.trainable_parameters / 1e3:.0f}k trainable params; {result.patch_summary}; "
                       f"adapter in {result.weights_dir}", seconds=time.perf_counter() - t0, ok=last < first)
