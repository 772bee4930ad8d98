"""``onecard serve``: OpenAI-compatible HTTP server on the engine."""

from __future__ import annotations

import logging
import os
import sys

import typer

from onecard.commands.engine_options import with_engine_options


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @with_engine_options
    def serve_cmd(
        model: str = typer.Argument(..., help="Local Hugging Face model folder."),
        host: str = typer.Option("127.0.0.1", help="Address to bind; the default is reachable from this machine only."),
        port: int = typer.Option(8000, help="TCP port (0 = any free port)."),
        api_key: str | None = typer.Option(None, "--api-key", envvar="ONECARD_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' on every route but /health."),
        served_model_name: str | None = typer.Option(None, help="Model id clients send (default: the folder name)."),
        shutdown_timeout: float = typer.Option(30.0, help="Seconds in-flight requests get to finish on SIGTERM."),
        log_level: str = typer.Option("warning", help="uvicorn log level: debug|info|warning|error."),
        rag_db: str | None = typer.Option(None, help="A 'onecard rag index' database: enables POST /v1/rag/ask."),
        tool_call_parser: str | None = typer.Option(None, help="How the model writes tool calls (hermes | "
                                                    "llama3_json): enables tool_choice 'auto'."),
        *,
        engine: dict,
    ) -> None:
        """OpenAI-compatible HTTP server on the engine (/v1/completions, /v1/chat/completions, /metrics)."""
        from rich.console import Console

        from onecard.serve.server import ServeConfig, serve

        cfg = ServeConfig(model, host, port, api_key, served_model_name, shutdown_timeout, log_level, rag_db, engine,
                          tool_call_parser)
        console = Console(stderr=True)
        status = serve(cfg, on_listening=lambda url: console.print(
            f"onecard serve: [bold]{url}/v1[/] model [bold]{cfg.model_name}[/] (loading; GET {url}/health says 200 "
            "when ready)", highlight=False, soft_wrap=True))
        # Everything is shut down and flushed; skip interpreter teardown, which would garbage-collect the
        # model's frozen objects for seconds (and make Triton's nanobind report them as leaks).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
