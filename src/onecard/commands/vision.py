"""``onecard vision``: LLaVA-style image question answering."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    @app.command("vision")
    def vision_cmd(model: str = typer.Argument(..., help="Local Hugging Face model folder.")) -> None:
        """LLaVA-style image question answering."""
        raise not_built("vision", 12)
