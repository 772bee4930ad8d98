"""``onecard doctor``: what this machine has and what will work."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich.console import Console
from rich.table import Table

from onecard.hardware.probe import probe


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """Probe torch, CUDA, driver, GPUs (matched to the catalog), Triton, NVML and extras; say what will work."""
        report = probe()
        if as_json:
            data = asdict(report)
            for g in data["gpus"]:
                g["spec"] = g["spec"]["key"] if g["spec"] else None
            typer.echo(json.dumps(data, indent=2))
            return
        console = Console()
        console.print(f"python {report.python}  torch {report.torch}  CUDA {report.cuda or '-'}  driver {report.driver or '-'}")
        if not report.has_gpu:
            console.print("[yellow]No CUDA GPU found[/]: onecard runs on the CPU here (demo, tests, tiny models).")
        table = Table("check", "", "found", title="This machine")
        for c in report.checks:
            table.add_row(c.name, "[green]ok[/]" if c.ok else "[yellow]no[/]", c.detail)
        console.print(table)
        table = Table("feature", "", "why", title="What will work")
        for f in report.features:
            table.add_row(f.name, "[green]yes[/]" if f.ok else "[red]no[/]", f.why)
        console.print(table)
