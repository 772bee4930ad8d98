"""The Postgres + pgvector backend, run only against a reachable server that has the extension.

How to run: start Postgres with pgvector (Debian trixie+: apt-get install postgresql-17 postgresql-17-pgvector;
or the pgvector/pgvector Docker image), create a database, then
    ONECARD_PG_DSN=postgresql://postgres@127.0.0.1:5432/onecard_test PYTHONPATH=src pytest tests/test_rag_pgvector.py
The test drops its tables first, so point it at a scratch database.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from onecard.errors import BadInputError, OnecardError

DSN = os.environ.get("ONECARD_PG_DSN")


@pytest.fixture()
def pg_db():
    if not DSN:
        pytest.skip("set ONECARD_PG_DSN to a scratch Postgres database with pgvector to run this test")
    psycopg = pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' to test the Postgres backend")
    try:
        conn = psycopg.connect(DSN, autocommit=True)
    except psycopg.OperationalError as err:
        pytest.skip(f"Postgres at ONECARD_PG_DSN is not reachable: {str(err).splitlines()[0]}")
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error:
        pytest.skip("the Postgres server has no pgvector extension (Debian bookworm does not package it)")
    for t in ("chunks", "files", "meta"):
        conn.execute(f"DROP TABLE IF EXISTS onecard_rag_{t}")
    conn.close()
    return DSN


def test_pgvector_index_search_incremental_and_rollback(pg_db, tmp_path):
    from onecard.rag.indexer import index_directory
    from onecard.rag.pgvector_store import PgVectorStore
    from onecard.rag.splitter import Chunk
    from onecard.rag.store import FileUpdate, search

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "router.md").write_text("# Router\n\nError code ZX-4471 means the DSL line has no sync.\n")
    (docs / "garden.md").write_text("# Tomatoes\n\nWater tomato plants deeply twice a week.\n")
    rep = index_directory(docs, pg_db)
    assert len(rep.added) == 2 and rep.total_chunks == 2
    assert Path(search("ZX-4471", pg_db, k=1, mode="bm25").hits[0].chunk.source).name == "router.md"
    assert Path(search("how often to irrigate vegetables", pg_db, k=1, mode="vector").hits[0].chunk.source).name == "garden.md"
    hyb = search("router ZX-4471", pg_db, k=2).hits
    assert Path(hyb[0].chunk.source).name == "router.md" and all(h.similarity is not None for h in hyb)
    (docs / "garden.md").unlink()
    rep = index_directory(docs, pg_db)
    assert [Path(p).name for p in rep.removed] == ["garden.md"] and rep.unchanged == 1
    store = PgVectorStore(pg_db)
    before = (store.file_hashes(), store.count())
    bad = FileUpdate(str(docs / "router.md"), "x", [Chunk("s", "t", 0, 1)], np.zeros((1, 7), np.float32))
    with pytest.raises(OnecardError):
        store.apply([bad], [], store.get_meta())
    assert (store.file_hashes(), store.count()) == before, "a failed apply rolls back"
    store.close()


def test_pgvector_unreachable_is_a_clear_error():
    pytest.importorskip("psycopg")
    from onecard.rag.store import open_store

    with pytest.raises(BadInputError, match="cannot connect"):
        open_store("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
