"""``onecard eval ppl``: sliding-window perplexity of a model on a text file."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    ev = typer.Typer(help="Evaluate models (perplexity).", no_args_is_help=True)

    @ev.command("ppl")
    def ppl_cmd(model: str = typer.Argument(..., help="Local model folder.")) -> None:
        """Sliding-window perplexity on a text file."""
        raise not_built("eval ppl", 5)

    app.add_typer(ev, name="eval")
