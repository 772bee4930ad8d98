"""``onecard demo``: the whole path on built-in defaults, no downloads."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.errors import BadInputError
from onecard.testing.checkpoints import cache_dir


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        workdir: Path = typer.Option(None, help="Where the demo writes its files (default: the onecard cache)."),
        device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    ) -> None:
        """Build and train a tiny model on local text, then run every job on it, offline."""
        from onecard.demo import run_demo

        if device is not None:
            import torch

            if device != "cpu" and not device.startswith("cuda"):
                raise BadInputError(f"--device must be cpu or cuda, got '{device}'")
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise BadInputError("--device cuda asked for, but this machine has no CUDA GPU; use --device cpu")
        results = run_demo(workdir or cache_dir() / "demo", device)
        if not all(r.ok for r in results):
            raise typer.Exit(1)
