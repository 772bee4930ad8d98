"""``onecard demo``: the whole path on built-in defaults, offline, on CPU or GPU.

Each job adds one stage: a function ``(DemoContext) -> StageResult`` living in
its own package (``onecard.<job>.demo_stage``). Stages run in order; later
ones read earlier artifacts from ``ctx.artifacts``. A failing stage is shown
as failed in the summary and the demo exits non-zero: nothing is hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table


@dataclass
class DemoContext:
    workdir: Path
    device: str
    console: Console
    artifacts: dict[str, object] = field(default_factory=dict)


@dataclass
class StageResult:
    name: str
    summary: str
    seconds: float = 0.0
    ok: bool = True


Stage = Callable[[DemoContext], StageResult]


def stage_model(ctx: DemoContext) -> StageResult:
    from onecard.testing import train_tiny_model

    info = train_tiny_model(progress=True)
    ctx.artifacts["model_dir"] = info.path
    return StageResult("tiny model", f"{info.parameters / 1e6:.1f}M-param Llama trained on the Python stdlib: "
                       f"val ppl {info.val_perplexity:.1f} (untrained {info.untrained_val_perplexity:.0f}); {info.protocol}")


def stage_hardware(ctx: DemoContext) -> StageResult:
    from onecard.hardware.probe import probe

    report = probe()
    if report.has_gpu:
        g = report.gpus[0]
        spec = f" = catalog '{g.spec.key}'" if g.spec else ""
        return StageResult("hardware", f"{g.name}{spec}, {g.free_gib:.1f}/{g.total_gib:.1f} GiB free, torch {report.torch}")
    return StageResult("hardware", f"no CUDA GPU: running on CPU (torch {report.torch})")


def stage_hf_generate(ctx: DemoContext) -> StageResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(ctx.artifacts["model_dir"])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(ctx.device).eval()
    prompt = "class Config:\n    def __init__(self"
    ids = tok(prompt, return_tensors="pt").input_ids.to(ctx.device)
    with torch.no_grad():
        # greedy; the penalty keeps a 5M-parameter model from repeating one line
        out = model.generate(ids, max_new_tokens=32, do_sample=False, repetition_penalty=1.3, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    ctx.console.print(f"[dim]HF generate:[/]\n{prompt}{text}", highlight=False)
    return StageResult("generate (HF)", f"{out.shape[1] - ids.shape[1]} tokens greedy: {text.strip()[:40]!r}...")


# (label, "module:function"): resolved at run time so a job's optional extras load only when its stage runs.
STAGES: tuple[tuple[str, str], ...] = (
    ("monitor start", "onecard.monitor.demo_stage:start_demo_monitor"),
    ("tiny model", "onecard.demo:stage_model"),
    ("hardware", "onecard.demo:stage_hardware"),
    ("plan", "onecard.plan.demo_stage:demo_stage"),
    ("generate (HF)", "onecard.demo:stage_hf_generate"),
    ("train (LoRA)", "onecard.train.demo_stage:demo_stage"),
    ("quantize", "onecard.quant.demo_stage:demo_stage"),
    ("engine", "onecard.engine.demo_stage:demo_stage"),
    ("rag", "onecard.rag.demo_stage:demo_stage"),
    ("serve", "onecard.serve.demo_stage:demo_stage"),
    ("vision", "onecard.vision.demo_stage:demo_stage"),
)
# Run even when an earlier stage failed: the monitor report covers the run that happened.
FINAL_STAGES: tuple[tuple[str, str], ...] = (("monitor report", "onecard.monitor.demo_stage:demo_stage"),)


def _resolve(ref: str) -> Stage:
    import importlib

    module, func = ref.split(":")
    return getattr(importlib.import_module(module), func)


def _run_stage(ctx: DemoContext, label: str, ref: str) -> StageResult:
    ctx.console.rule(f"[bold]{label}")
    t0 = time.perf_counter()
    try:
        res = _resolve(ref)(ctx)
    except Exception as exc:  # shown in the summary, never swallowed
        ctx.console.print_exception(max_frames=3)
        res = StageResult(label, f"FAILED: {type(exc).__name__}: {exc}".splitlines()[0], ok=False)
    res.seconds = time.perf_counter() - t0
    return res


def run_demo(workdir: Path, device: str | None = None, console: Console | None = None,
             stages: tuple[tuple[str, str], ...] = STAGES,
             final_stages: tuple[tuple[str, str], ...] = FINAL_STAGES) -> list[StageResult]:
    import torch

    console = console or Console()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(workdir, device or ("cuda" if torch.cuda.is_available() else "cpu"), console)
    results: list[StageResult] = []
    for label, ref in stages:
        results.append(_run_stage(ctx, label, ref))
        if not results[-1].ok:
            break
    results.extend(_run_stage(ctx, label, ref) for label, ref in final_stages)
    table = Table("stage", "s", "result", title="onecard demo")
    for r in results:
        table.add_row(("[green]" if r.ok else "[red]") + r.name, f"{r.seconds:.1f}", r.summary)
    console.print(table)
    return results
