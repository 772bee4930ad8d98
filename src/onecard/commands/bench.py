"""``onecard bench``: Benchmark inference paths side by side (HF vs engine vs quantized)."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(model: str = typer.Argument(..., help="Local Hugging Face model folder.")) -> None:
        """Benchmark inference paths side by side (HF vs engine vs quantized)."""
        raise not_built("bench", 4)
