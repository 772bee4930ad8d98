"""``onecard inspect MODEL``: validate a local model folder and show what it holds."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from onecard.models.folder import open_model_folder


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        model: str = typer.Argument(..., help="Local Hugging Face model folder (config.json, *.safetensors, tokenizer)."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:
        """Check a model folder (config, shards, dtype, tokenizer) and print its architecture, size and layout."""
        summary = open_model_folder(model).summary()
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        table = Table("", "", title=f"model folder {summary['path']}", show_header=False)
        for key, value in summary.items():
            if key == "path":
                continue
            if key in ("parameters", "stored_elements", "size_bytes"):
                value = f"{value:,}"
            elif isinstance(value, list):
                value = ", ".join(value) or "-"
            table.add_row(key.replace("_", " "), "-" if value is None else str(value))
        Console().print(table)
        Console().print("[green]ok[/]: config, shards, dtype and tokenizer are consistent")
