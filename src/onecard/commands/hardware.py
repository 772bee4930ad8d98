"""``onecard hardware list|compare``: the GPU catalog."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from onecard.hardware.catalog import COMPARE_NOTE, basis, compare_rows, find_gpu, list_gpus


def register(app: typer.Typer) -> None:
    hw = typer.Typer(help="The GPU catalog: memory, bandwidth, tensor TFLOP/s (with basis), FP8, power.",
                     no_args_is_help=True)

    @hw.command("list")
    def list_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """List every card in the catalog."""
        specs = list_gpus()
        if as_json:
            typer.echo(json.dumps({"basis": basis(), "gpus": [s.as_dict() for s in specs]}, indent=2))
            return
        table = Table("key", "driver name", "GiB", "GB/s", "BF16 TF", "FP8", "W", "sm")
        for s in specs:
            table.add_row(s.key, s.name.removeprefix("NVIDIA ").removeprefix("GeForce "), f"{s.memory_gib:g}",
                          f"{s.bandwidth_gbs:g}", f"{s.bf16_dense_tflops:g}", "yes" if s.fp8 else "no",
                          f"{s.power_w:g}", s.compute_capability.replace(".", ""))
        console = Console()
        console.print(table)
        console.print("[dim]BF16 TF = dense tensor TFLOP/s, FP32 accumulate; `onecard hardware compare` shows more[/]")

    @hw.command("compare")
    def compare_cmd(
        cards: list[str] = typer.Argument(..., help="Cards to compare, e.g. 4090 3090 a100-40 a100-80."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:
        """Side-by-side table of cards (the seed article's §1.3 table, with correct figures)."""
        specs = [find_gpu(c) for c in cards]
        if as_json:
            typer.echo(json.dumps({"basis": basis(), "gpus": [s.as_dict() for s in specs]}, indent=2))
            return
        table = Table("", *[s.key for s in specs], title="GPU comparison")
        for label, cells in compare_rows(specs):
            table.add_row(label, *cells)
        console = Console()
        console.print(table)
        console.print(f"[dim]{COMPARE_NOTE}[/]")
        for s in specs:
            console.print(f"[dim]{s.key} = {s.name}: {s.source}[/]")

    app.add_typer(hw, name="hardware")
