"""``onecard plan``: Predict memory and speed for model x card x job; propose settings that fit."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(model: str = typer.Argument(..., help="Local Hugging Face model folder.")) -> None:
        """Predict memory and speed for model x card x job; propose settings that fit."""
        raise not_built("plan", 9)
