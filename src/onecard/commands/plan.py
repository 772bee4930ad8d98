"""``onecard plan``: predict memory and speed for model x card x job; propose settings that fit."""

from __future__ import annotations

import json
from enum import Enum

import typer

from onecard.errors import BadInputError


class Job(str, Enum):
    infer = "infer"
    train = "train"


def _card(card: str | None, console) -> str | None:
    """The named card, else the live GPU, else the RTX 4090 (said out loud): planning needs no GPU."""
    if card:
        return card
    import torch

    if torch.cuda.is_available():
        return None
    console.print("[dim]no CUDA GPU here: planning for an RTX 4090 (choose another with --card)[/]")
    return "4090"


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        model: str = typer.Argument(None, help="Model folder (config.json is enough) or built-in name (llama-3-8b, ...)."),
        job: Job = typer.Option(Job.infer, "--job", "--task", help="infer or train."),
        card: str = typer.Option(None, "--card", help="Catalog card (4090, 3090, a100-80, h100, ...); default: this GPU."),
        bits: int = typer.Option(None, "--bits", help="Inference weight bits: 16, 8 or 4 (default: the checkpoint's)."),
        ctx: int = typer.Option(None, "--ctx", help="Inference max_model_len (default: the model's maximum) / training seq len (default 2048)."),
        batch: int = typer.Option(1, "--batch", help="Inference: concurrent sequences (max_num_seqs); training: micro-batch."),
        method: str = typer.Option("lora", "--method", help="Training: full, lora or qlora."),
        kv_dtype: str = typer.Option("auto", "--kv-dtype", help="KV cache dtype: auto (bf16), fp8 or int8."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Training: gradient accumulation steps."),
        checkpointing: bool = typer.Option(True, "--checkpointing/--no-checkpointing", help="Training: gradient checkpointing."),
        optimizer: str = typer.Option("adamw", "--optimizer", help="Training: adamw or adamw-8bit."),
        precision: str = typer.Option("bf16", "--precision", help="Full training: bf16 or mixed (fp32 master weights)."),
        util: float = typer.Option(None, "--util", help="Fraction of the card the job may use (default 0.9 infer, 0.95 train)."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
        table: bool = typer.Option(False, "--table", help="Print the fits-matrix: built-in models x methods on the card."),
    ) -> None:
        """Predict memory and speed for model x card x job; propose settings that fit."""
        from rich.console import Console

        console = Console()
        err = Console(stderr=True)
        if table:
            from onecard.plan.table import fits_matrix, render_matrix

            matrix = fits_matrix(_card(card, err), ctx=ctx or 4096)
            if as_json:
                typer.echo(json.dumps({"card": matrix.card.key, "ctx": matrix.ctx, "seq_len": matrix.seq_len,
                                       "columns": list(matrix.columns),
                                       "rows": {n: [c.__dict__ for c in cells] for n, cells in matrix.rows}}, indent=2))
            else:
                console.print(render_matrix(matrix))
            return
        if model is None:
            raise BadInputError("name a model (folder or built-in, e.g. llama-3-8b), or pass --table")
        from onecard.plan import plan_inference, plan_training

        gpu = _card(card, err)
        if job is Job.infer:
            plan = plan_inference(model, gpu, bits=bits, max_model_len=ctx, max_num_seqs=batch, kv_cache_dtype=kv_dtype,
                                  gpu_memory_utilization=util or 0.9)
            title = (f"{plan.model} inference on {plan.card}: {plan.bits}-bit, {plan.max_num_seqs} x {plan.max_model_len:,} tokens")
            speed = [("decode, bs=1", f"{plan.decode_tok_s_bs1:,.1f} tok/s at {plan.max_model_len // 2:,} tokens of context")]
            if plan.max_num_seqs > 1:
                n = min(plan.max_num_seqs, max(plan.max_concurrent_seqs, 1))
                speed.append((f"decode, {n} seqs", f"{plan.decode_tok_s_batch:,.1f} tok/s in total"))
            speed += [("efficiency", f"{plan.efficiency:.2f} of roofline ({plan.efficiency_source})"),
                      ("max context", f"{plan.max_context_tokens:,} tokens (1 sequence, the engine's KV pool)"),
                      ("max sequences", f"{plan.max_concurrent_seqs} of {plan.max_model_len:,} tokens")]
        else:
            plan = plan_training(model, gpu, method=method, seq_len=ctx, batch_size=batch, grad_accum=grad_accum,
                                 gradient_checkpointing=checkpointing, optimizer=optimizer, precision=precision,
                                 gpu_memory_utilization=util or 0.95)
            title = (f"{plan.model} {plan.method} training on {plan.card}: batch {plan.batch_size} x {plan.seq_len:,}, "
                     f"peak at {plan.peak_phase}")
            speed = [("training", f"{plan.tokens_per_s:,.0f} tokens/s"),
                     ("MFU", f"{plan.mfu:.2f} ({plan.mfu_source})"),
                     ("largest micro-batch", str(plan.max_batch_size)), ("longest seq at batch 1", f"{plan.max_seq_len:,}")]
        if as_json:
            typer.echo(json.dumps(plan.as_dict(), indent=2, default=str))
            return
        from rich.table import Table

        t = Table(title=title)
        t.add_column("item")
        t.add_column("GiB", justify="right")
        t.add_column("what")
        for item, gib, what in plan.breakdown():
            t.add_row(item, f"{gib:.2f}", what)
        t.add_row("[bold]total[/]", f"[bold]{plan.total_gib:.2f}[/]", f"of {plan.usable_gib:.1f} GiB usable "
                  f"({plan.gpu_memory_utilization:.0%} of the card)")
        for item, gib, what in plan.engine_rows() if job is Job.infer else []:
            t.add_row(item, f"{gib:.2f}", what)
        for item, value in speed:
            t.add_row(item, "", value)
        console.print(t)
        colour = "green" if plan.fits else "red"
        console.print(f"[bold {colour}]{plan.verdict}[/]", soft_wrap=True, highlight=False)
