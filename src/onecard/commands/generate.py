"""``onecard generate``: Generate text with onecard's engine."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(model: str = typer.Argument(..., help="Local Hugging Face model folder.")) -> None:
        """Generate text with onecard's engine."""
        raise not_built("generate", 4)
