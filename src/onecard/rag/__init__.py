"""Local RAG: load documents, split, embed, store (SQLite + sqlite-vec + FTS5), answer with citations.

Public entry points: ``index_directory`` (build or update an index file),
``search`` (retrieval only), ``ask`` (answer with numbered citations).
Heavy dependencies (sentence-transformers, apsw, pypdf) load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from onecard.rag.answer import Answer, Citation, ask
    from onecard.rag.indexer import index_directory
    from onecard.rag.store import Hit, search

__all__ = ["Answer", "Citation", "Hit", "ask", "index_directory", "search"]


def __getattr__(name: str):
    if name in ("Answer", "Citation", "ask"):
        from onecard.rag import answer

        return getattr(answer, name)
    if name == "index_directory":
        from onecard.rag.indexer import index_directory

        return index_directory
    if name in ("Hit", "search"):
        from onecard.rag import store

        return getattr(store, name)
    raise AttributeError(name)
