"""``onecard rag index|ask|search|eval``: local question answering with citations."""

from __future__ import annotations

import typer

from onecard.commands import not_built


def register(app: typer.Typer) -> None:
    rag = typer.Typer(help="Local RAG: index documents, ask questions with citations.", no_args_is_help=True)

    @rag.command("index")
    def index_cmd(directory: str = typer.Argument(..., help="Folder of documents.")) -> None:
        """Index a folder of documents."""
        raise not_built("rag index", 11)

    @rag.command("ask")
    def ask_cmd(question: str = typer.Argument(...)) -> None:
        """Answer a question with citations."""
        raise not_built("rag ask", 11)

    app.add_typer(rag, name="rag")
