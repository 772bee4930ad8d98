"""Scale-out index: Postgres + pgvector behind the same ``Store`` interface as the SQLite file.

Use it when one file is not enough (many users, millions of chunks, an HNSW
index): ``--db postgresql://user@host/dbname``. Vectors live in a ``vector(d)``
column with an HNSW cosine index; the keyword side is Postgres full-text
search (``ts_rank_cd`` over a weighted ``tsvector``: heading and file name
weigh more than text). That ranking is not BM25, but hybrid retrieval only
uses its *order*, which reciprocal-rank fusion needs and nothing more.
``apply`` runs in one transaction, like the SQLite store.
"""

from __future__ import annotations

import re
import time

import numpy as np

from onecard.errors import BadInputError, MissingExtraError, OnecardError
from onecard.rag.splitter import Chunk
from onecard.rag.store import _STOPWORDS, SCHEMA_VERSION, FileUpdate, _title

PREFIX = "onecard_rag"


def _vec_literal(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, dtype=np.float32)) + "]"


def ts_query(text: str) -> str:
    """Words joined by OR for ``to_tsquery``; only \\w characters reach Postgres (no query-syntax injection)."""
    words = []
    for w in re.findall(r"\w+", text.lower()):
        if w not in _STOPWORDS and w not in words and (len(w) > 1 or w.isdigit()):
            words.append(w)
    return " | ".join(words)


class PgVectorStore:
    def __init__(self, dsn: str, create: bool = False) -> None:
        try:
            import psycopg
        except ImportError as err:
            raise MissingExtraError("the Postgres backend needs psycopg; install it with: pip install 'psycopg[binary]'") from err
        try:
            self.conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError as err:
            raise BadInputError(f"cannot connect to Postgres at {dsn!r}: {str(err).splitlines()[0]}") from err
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as err:
            raise BadInputError("the Postgres server has no pgvector extension; install it there "
                                "(Debian: postgresql-NN-pgvector) and retry") from err
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {PREFIX}_meta(key text PRIMARY KEY, value text NOT NULL)")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {PREFIX}_files(path text PRIMARY KEY, sha256 text NOT NULL, "
                          "n_chunks integer NOT NULL, indexed_at double precision NOT NULL)")
        if not create and "schema" not in self.get_meta():
            raise BadInputError(f"no onecard RAG index in {dsn!r}; build one with: onecard rag index DIR --db {dsn}")

    def _has_chunks(self) -> bool:
        return self.conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{PREFIX}_chunks",)).fetchone()[0]

    def _ensure_chunks(self, dim: int) -> None:
        if self._has_chunks():
            return
        self.conn.execute(
            f"CREATE TABLE {PREFIX}_chunks(id bigserial PRIMARY KEY, path text NOT NULL, page integer, "
            "heading text NOT NULL, start_ integer NOT NULL, end_ integer NOT NULL, kind text NOT NULL, "
            f"title text NOT NULL, text text NOT NULL, embedding vector({int(dim)}) NOT NULL, "
            "tsv tsvector GENERATED ALWAYS AS (setweight(to_tsvector('english', heading || ' ' || title), 'A') || "
            "setweight(to_tsvector('english', text), 'B')) STORED)")
        self.conn.execute(f"CREATE INDEX {PREFIX}_chunks_path ON {PREFIX}_chunks(path)")
        self.conn.execute(f"CREATE INDEX {PREFIX}_chunks_tsv ON {PREFIX}_chunks USING gin(tsv)")
        self.conn.execute(f"CREATE INDEX {PREFIX}_chunks_hnsw ON {PREFIX}_chunks USING hnsw (embedding vector_cosine_ops)")

    def get_meta(self) -> dict[str, str]:
        return dict(self.conn.execute(f"SELECT key, value FROM {PREFIX}_meta").fetchall())

    def file_hashes(self) -> dict[str, str]:
        return dict(self.conn.execute(f"SELECT path, sha256 FROM {PREFIX}_files").fetchall())

    def count(self) -> int:
        return self.conn.execute(f"SELECT count(*) FROM {PREFIX}_chunks").fetchone()[0] if self._has_chunks() else 0

    def apply(self, updates: list[FileUpdate], removed: list[str], meta: dict[str, str]) -> None:
        dim = int(meta["dim"])
        self._ensure_chunks(dim)
        paths = [u.path for u in updates] + list(removed)
        with self.conn.transaction():
            self.conn.execute(f"DELETE FROM {PREFIX}_chunks WHERE path = ANY(%s)", (paths,))
            self.conn.execute(f"DELETE FROM {PREFIX}_files WHERE path = ANY(%s)", (paths,))
            with self.conn.cursor() as cur:
                for u in updates:
                    if len(u.chunks) != len(u.vectors) or (len(u.vectors) and u.vectors.shape[1] != dim):
                        raise OnecardError(f"internal: {u.path} has {len(u.chunks)} chunks but vectors {u.vectors.shape}")
                    title = _title(u.path)
                    cur.executemany(
                        f"INSERT INTO {PREFIX}_chunks(path, page, heading, start_, end_, kind, title, text, embedding) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::vector)",
                        [(u.path, c.page, c.heading, c.start, c.end, c.kind, title, c.text, _vec_literal(v))
                         for c, v in zip(u.chunks, u.vectors)])
                    cur.execute(f"INSERT INTO {PREFIX}_files(path, sha256, n_chunks, indexed_at) VALUES (%s, %s, %s, %s)",
                                (u.path, u.sha256, len(u.chunks), time.time()))
                for key, value in {**meta, "schema": SCHEMA_VERSION}.items():
                    cur.execute(f"INSERT INTO {PREFIX}_meta(key, value) VALUES (%s, %s) "
                                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (key, str(value)))

    def vector_search(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        if not self._has_chunks():
            return []
        q = _vec_literal(query)
        rows = self.conn.execute(f"SELECT id, 1 - (embedding <=> %s::vector) FROM {PREFIX}_chunks "
                                 "ORDER BY embedding <=> %s::vector LIMIT %s", (q, q, int(n))).fetchall()
        return [(int(i), float(s)) for i, s in rows]

    def bm25_search(self, query: str, n: int) -> list[tuple[int, float]]:
        """Keyword search (ts_rank_cd; see the module docstring), best first."""
        expr = ts_query(query)
        if not expr or not self._has_chunks():
            return []
        rows = self.conn.execute(f"SELECT id, ts_rank_cd(tsv, q) AS r FROM {PREFIX}_chunks, to_tsquery('english', %s) q "
                                 "WHERE tsv @@ q ORDER BY r DESC, id LIMIT %s", (expr, int(n))).fetchall()
        return [(int(i), float(r)) for i, r in rows]

    def chunks(self, ids: list[int]) -> dict[int, Chunk]:
        if not ids:
            return {}
        rows = self.conn.execute(f"SELECT id, path, text, start_, end_, heading, page, kind FROM {PREFIX}_chunks "
                                 "WHERE id = ANY(%s)", (list(ids),)).fetchall()
        return {int(r[0]): Chunk(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows}

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        if not ids:
            return {}
        rows = self.conn.execute(f"SELECT id, embedding::real[] FROM {PREFIX}_chunks WHERE id = ANY(%s)",
                                 (list(ids),)).fetchall()
        return {int(i): np.asarray(v, dtype=np.float32) for i, v in rows}

    def close(self) -> None:
        self.conn.close()
