"""``onecard demo``: the whole path on built-in defaults, no downloads."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.testing.checkpoints import cache_dir


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        workdir: Path = typer.Option(None, help="Where the demo writes its files (default: the onecard cache)."),
        device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    ) -> None:
        """Build and train a tiny model on local text, then run every job on it, offline."""
        from onecard.demo import run_demo

        results = run_demo(workdir or cache_dir() / "demo", device)
        if not all(r.ok for r in results):
            raise typer.Exit(1)
