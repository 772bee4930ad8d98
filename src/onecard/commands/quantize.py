"""``onecard quantize``: Quantize a model (GPTQ / AWQ / RTN, int4 / int8) into a new folder."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_cmd(model: str = typer.Argument(..., help="Local Hugging Face model folder.")) -> None:
        """Quantize a model (GPTQ / AWQ / RTN, int4 / int8) into a new folder."""
        raise not_built("quantize", 5)
