"""``onecard eval ppl``: sliding-window perplexity of a model (float or quantized) on a text file."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.errors import BadInputError


def register(app: typer.Typer) -> None:
    ev = typer.Typer(help="Evaluate models (perplexity).", no_args_is_help=True)

    @ev.command("ppl")
    def ppl_cmd(
        model: str = typer.Argument(..., help="Local model folder (float, or made by `onecard quantize`, or GPTQ/AWQ)."),
        data: Path = typer.Option(..., "--data", help="UTF-8 text file to score."),
        context: int = typer.Option(2048, "--context", help="Window length in tokens."),
        stride: int = typer.Option(512, "--stride", help="Window step; each window scores its last `stride` tokens."),
        max_tokens: int = typer.Option(None, "--max-tokens", help="Score only the first N tokens of the file."),
        device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if present)."),
    ) -> None:
        """Sliding-window perplexity on a text file; prints the protocol with the number."""
        from rich.console import Console

        from onecard.quant.evaluate import model_perplexity

        if not data.is_file():
            raise BadInputError(f"--data '{data}' is not a file; pass a UTF-8 text file")
        try:
            text = data.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BadInputError(f"--data '{data}' is not UTF-8 text") from None
        res = model_perplexity(model, text, context, stride, max_tokens, device)
        Console().print(f"perplexity [bold]{res.perplexity:.4f}[/] (nll {res.nll:.4f}) — {res.protocol()}; "
                        f"model {model}, data {data}")

    app.add_typer(ev, name="eval")
