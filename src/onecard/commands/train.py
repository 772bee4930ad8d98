"""``onecard train``: Fine-tune (LoRA / QLoRA / full) on local data."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(model: str = typer.Argument(..., help="Local Hugging Face model folder.")) -> None:
        """Fine-tune (LoRA / QLoRA / full) on local data."""
        raise not_built("train", 8)
