"""``onecard serve``: OpenAI-compatible HTTP server on the engine."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(model: str = typer.Argument(..., help="Local Hugging Face model folder.")) -> None:
        """OpenAI-compatible HTTP server on the engine."""
        raise not_built("serve", 7)
