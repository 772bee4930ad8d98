"""The fits-matrix: built-in models x methods on one card, each cell a re-planned verdict.

The honest version of the seed article's and LLaMA-Factory's hardware tables:
every cell is the planner's full breakdown (weights with scales, KV cache,
activations, optimizer, CUDA context) at a stated context and batch, not a
weights-only rule of thumb.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.hardware import GPUSpec
from onecard.models import builtin_archs
from onecard.plan.fit import plan_inference, plan_training, resolve_card
from onecard.plan.spec import resolve_model

# (column title, job, keyword arguments of the plan call)
METHODS: tuple[tuple[str, str, dict], ...] = (
    ("infer 16", "infer", {"bits": 16}),
    ("infer 8", "infer", {"bits": 8}),
    ("infer 4", "infer", {"bits": 4}),
    ("full", "train", {"method": "full", "optimizer": "adamw-8bit"}),
    ("LoRA", "train", {"method": "lora"}),
    ("QLoRA", "train", {"method": "qlora"}),
)


@dataclass(frozen=True)
class Cell:
    fits: bool
    total_gib: float
    speed: float  # decode tok/s at bs=1 (infer) or training tokens/s
    offload_tok_s: float | None = None


@dataclass(frozen=True)
class FitsMatrix:
    card: GPUSpec
    ctx: int
    seq_len: int
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[Cell, ...]], ...]


def fits_matrix(card: "str | GPUSpec | None" = "4090", ctx: int = 4096, seq_len: int = 2048,
                models: list[str] | None = None) -> FitsMatrix:
    """Plan every built-in model (or ``models``) x every column of ``METHODS`` on ``card``.

    Inference: one sequence of ``ctx`` tokens (capped at the model's maximum).
    Training: batch 1 x ``seq_len``, gradient checkpointing on; full
    fine-tuning uses bf16 weights with 8-bit AdamW (the cheapest full recipe).
    """
    gpu = resolve_card(card)
    rows = []
    for name in models or [m for m in builtin_archs() if m != "qwen2-0.5b"] + ["qwen2-0.5b"]:
        cells = []
        for _, job, kwargs in METHODS:
            if job == "infer":
                limit = resolve_model(name).args.max_position_embeddings
                p = plan_inference(name, gpu, max_model_len=min(ctx, limit), **kwargs)
                cells.append(Cell(p.fits, p.total_gib, p.decode_tok_s_bs1, None if p.fits else p.offload_tok_s))
            else:
                t = plan_training(name, gpu, seq_len=seq_len, **kwargs)
                cells.append(Cell(t.fits, t.total_gib, t.tokens_per_s))
        rows.append((name, tuple(cells)))
    return FitsMatrix(gpu, ctx, seq_len, tuple(c for c, _, _ in METHODS), tuple(rows))


def render_matrix(matrix: FitsMatrix):
    """A rich Table: green 'GiB' where it fits, red where not (with the offload speed when offload is possible)."""
    from rich.table import Table

    g = matrix.card
    table = Table(title=f"What fits on {g.name} ({g.memory_gib:g} GiB): peak GiB", caption=(
        f"infer N: N-bit weights, 1 x {matrix.ctx:,} tokens; train: batch 1 x {matrix.seq_len:,}, checkpointing on, "
        "full = bf16 + 8-bit AdamW, QLoRA = int4-g64 base. [green]green[/]: fits in 90% (infer) / 95% (train) of the card; "
        "[red]red[/]: does not; (n): bs=1 tok/s with the layers that do not fit offloaded to CPU RAM"))
    table.add_column("model", no_wrap=True)
    for c in matrix.columns:
        table.add_column(c, justify="right")
    for name, cells in matrix.rows:
        out = []
        for c in cells:
            if c.fits:
                out.append(f"[green]{c.total_gib:.1f}[/]")
            elif c.offload_tok_s:
                out.append(f"[red]{c.total_gib:.1f}[/] [dim]({c.offload_tok_s:.1f})[/]")
            else:
                out.append(f"[red]{c.total_gib:.1f}[/]")
        table.add_row(name, *out)
    return table
