"""The ``onecard`` command: parse, call one library function, print.

Each job's commands live in ``onecard.commands.<job>`` (one module per job,
each with ``register(app)``); this file only assembles them and turns
``OnecardError`` into one red line and exit code 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from onecard import __version__
from onecard.commands import (bench, demo, doctor, eval as eval_cmd, generate, hardware, inspect, monitor, plan, quantize,
                              rag, serve, train, vision)
from onecard.errors import OnecardError

app = typer.Typer(
    name="onecard",
    help="Train, quantize, serve, search over (RAG) and monitor LLMs on one 24 GB GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"onecard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


for _module in (doctor, hardware, inspect, plan, train, quantize, eval_cmd, generate, serve, bench, rag, vision, monitor, demo):
    _module.register(app)


def main() -> None:
    try:
        app()
    except OnecardError as err:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
