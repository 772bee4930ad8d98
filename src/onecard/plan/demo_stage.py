"""Demo stage: plan the demo's tiny model on this machine, and Llama-3-8B on an RTX 4090 (int4 serving, QLoRA)."""

from __future__ import annotations

from onecard.demo import DemoContext, StageResult
from onecard.plan.fit import plan_inference, plan_training


def demo_stage(ctx: DemoContext) -> StageResult:
    model_dir = ctx.artifacts.get("model_dir")
    lines = []
    if model_dir is not None:
        tiny = plan_inference(model_dir, "4090", bits=16, max_model_len=256)
        lines.append(f"tiny model, bf16 on a 4090: {tiny.verdict}")
    infer = plan_inference("llama-3-8b", "4090", bits=4, max_model_len=8192)
    train = plan_training("llama-3-8b", "4090", method="qlora", seq_len=2048)
    big = plan_inference("llama-2-70b", "4090", bits=4, max_model_len=4096)
    lines += [f"Llama-3-8B int4 serving, 8k context: {infer.verdict}",
              f"Llama-3-8B QLoRA, 1 x 2,048 tokens: {train.verdict}",
              f"Llama-2-70B int4: {big.verdict}"]
    for line in lines:
        ctx.console.print(f"[dim]plan:[/] {line}", highlight=False, soft_wrap=True)
    ctx.artifacts["plan_llama3_8b_int4"] = infer
    ctx.artifacts["plan_llama3_8b_qlora"] = train
    return StageResult("plan", f"Llama-3-8B on a 4090: int4 {infer.total_gib:.1f} GiB ({'fits' if infer.fits else 'no'}), "
                       f"QLoRA {train.total_gib:.1f} GiB ({'fits' if train.fits else 'no'}); "
                       f"70B int4 needs {big.total_gib:.1f} GiB: {'fits' if big.fits else 'offload only'}")
