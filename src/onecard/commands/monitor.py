"""``onecard monitor``: live GPU panel, wrapped-command traces, reports."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    @app.command("monitor")
    def monitor_cmd() -> None:
        """Live GPU panel; wrap a command and log a trace; write reports."""
        raise not_built("monitor", 10)
