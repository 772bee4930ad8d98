"""The index: one SQLite file holding chunks, their vectors (sqlite-vec) and a BM25 index (FTS5).

Why one file: nothing to start, copy it to move the index. Why apsw: many
Python builds (pyenv's default among them) compile ``sqlite3`` without
``enable_load_extension``, so sqlite-vec cannot load; apsw bundles a current
SQLite that can. ``sqlite3`` is used only when apsw is missing and it can load
extensions.

Writes are atomic: ``SqliteStore.apply`` replaces the chunks of changed files
and drops removed files inside one ``BEGIN IMMEDIATE ... COMMIT``; a crash
before COMMIT leaves the previous index intact (SQLite's journal rolls it
back on next open). WAL mode lets searches run while an index is written.

Retrieval (``search``): vector kNN and BM25 each return a candidate list (top
50); hybrid fuses them, by default with min-max normalised scores averaged
with equal weights (``minmax_fuse``; OpenSearch's hybrid-search default), or
by reciprocal rank (``rrf_fuse``, k=60); then an optional rerank hook
reorders the fused candidates.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from onecard.errors import BadInputError, MissingExtraError, OnecardError
from onecard.rag.bm25_memory import COLUMN_WEIGHTS, POSTINGS_SQL, Bm25Index, build_bm25_index
from onecard.rag.splitter import Chunk

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
RRF_K = 60
MODES = ("hybrid", "vector", "bm25")
FUSIONS = ("minmax", "rrf")
# Words too common to help BM25; an OR over them makes FTS5 score most of the index for nothing.
_STOPWORDS = frozenset("""a an and are as at be by can do does for from has have how i if in into is it its of on or
so that the their then there these this to was what when where which who why will with you your""".split())


@dataclass
class Hit:
    """One retrieved chunk. ``score`` is the ranking score of the mode used (the fused score for hybrid)."""

    id: int
    chunk: Chunk
    score: float
    similarity: float | None = None   # cosine similarity to the query (always filled by ``search``)
    bm25: float | None = None         # FTS5 BM25 (higher = better) when the chunk matched the words
    vector_rank: int | None = None    # 1-based ranks in each list, None when absent
    bm25_rank: int | None = None


@dataclass
class FileUpdate:
    """New content of one file: its hash and its chunks with one vector each."""

    path: str
    sha256: str
    chunks: list[Chunk]
    vectors: np.ndarray


class Store(Protocol):
    """What the indexer and retrieval need; implemented by ``SqliteStore`` and ``pgvector_store.PgVectorStore``."""

    def get_meta(self) -> dict[str, str]: ...
    def file_hashes(self) -> dict[str, str]: ...
    def apply(self, updates: list[FileUpdate], removed: list[str], meta: dict[str, str]) -> None: ...
    def vector_search(self, query: np.ndarray, n: int) -> list[tuple[int, float]]: ...
    def bm25_search(self, query: str, n: int) -> list[tuple[int, float]]: ...
    def chunks(self, ids: list[int]) -> dict[int, Chunk]: ...
    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


# FTS5's BM25 clamps a term's IDF, log((N - n + 0.5) / (n + 0.5)), to ~0 once it is in half the chunks (n >= N/2):
# such a term cannot change the ranking, but in an OR query it makes FTS5 score most of the index (300 ms at 100k
# chunks). ``SqliteStore.bm25_search`` leaves those terms out of the query.
MAX_TERM_SHARE = 0.5


def query_words(text: str) -> list[str]:
    """Distinct lower-case words of ``text`` worth searching for: no stop-words, no single letters."""
    words: list[str] = []
    for w in re.findall(r"\w+", text.lower()):
        if w not in _STOPWORDS and w not in words and (len(w) > 1 or w.isdigit()):
            words.append(w)
    return words


def fts_query(text: str | list[str]) -> str:
    """User text (or its ``query_words``) -> a safe FTS5 expression: quoted words joined by OR (no FTS syntax injection)."""
    words = query_words(text) if isinstance(text, str) else text
    return " OR ".join(f'"{w}"' for w in words)


def _title(path: str) -> str:
    """Searchable words of a source path: its last two components without extension (``json/decoder``)."""
    parts = Path(path).with_suffix("").parts
    return " ".join(parts[-2:]).replace("_", " ")


def _connect(path: str):
    """An apsw (preferred) or sqlite3 connection with sqlite-vec loaded."""
    try:
        import sqlite_vec
    except ImportError as err:
        raise MissingExtraError("the RAG index needs 'sqlite-vec'; install it with: pip install 'onecard[rag]'") from err
    try:
        import apsw

        conn = apsw.Connection(path)
        conn.enable_load_extension(True)
        conn.load_extension(sqlite_vec.loadable_path())
        conn.enable_load_extension(False)
        return conn
    except ImportError:
        pass
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if not hasattr(conn, "enable_load_extension"):
        raise MissingExtraError("this Python's sqlite3 cannot load extensions and apsw is missing; "
                                "install it with: pip install 'onecard[rag]'")
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.enable_load_extension(False)
    return conn


class SqliteStore:
    """One SQLite file: tables meta, files, chunks; FTS5 ``chunks_fts`` (kept in sync by triggers); vec0 ``chunks_vec``."""

    def __init__(self, path: str | Path, create: bool = False, memory_vectors: bool = False,
                 memory_bm25: bool | None = None) -> None:
        """``memory_vectors``: answer kNN from a NumPy copy of all vectors (loaded on first use, reloaded when
        the index changes) instead of sqlite-vec's scan; several times faster for processes that search often.
        ``memory_bm25`` (default: same as ``memory_vectors``): answer BM25 from an in-memory copy of the FTS5
        postings (``bm25_memory``; same ranking), built at this connection's second BM25 query, so a one-shot
        search does not pay the build (~3 s at 100k chunks) and a server or evaluation pays it once."""
        path = Path(path).expanduser()
        self.memory_vectors = memory_vectors
        self.memory_bm25 = memory_vectors if memory_bm25 is None else memory_bm25
        self._matrix: tuple[str, np.ndarray, np.ndarray] | None = None  # (generation, ids, vectors)
        self._bm25: Bm25Index | None = None
        self._bm25_queries = 0  # BM25 queries answered by FTS5 on this connection
        self._doc_freq: tuple[str, dict[str, int]] = ("", {})  # (generation, stemmed term -> chunks holding it)
        if not create and not path.is_file():
            raise BadInputError(f"no index at '{path}'; build one with: onecard rag index DIR --db {path}")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.conn = _connect(str(path))
        self.conn.execute("PRAGMA busy_timeout=10000")
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self._create_tables()
        except Exception as err:
            if "file is not a database" in str(err) or "NotADB" in type(err).__name__:
                raise BadInputError(f"'{path}' is not a onecard RAG index (not an SQLite file)") from err
            raise
        if not create and "schema" not in self.get_meta():
            raise BadInputError(f"'{path}' is an SQLite file but not a onecard RAG index; pass the --db that 'rag index' wrote")

    def _q(self, sql: str, params: Iterable = ()) -> list[tuple]:
        return list(self.conn.execute(sql, tuple(params)))

    def _create_tables(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.conn.execute("CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, "
                          "n_chunks INTEGER NOT NULL, indexed_at REAL NOT NULL)")
        self.conn.execute("CREATE TABLE IF NOT EXISTS chunks(id INTEGER PRIMARY KEY, path TEXT NOT NULL, page INTEGER, "
                          "heading TEXT NOT NULL, start INTEGER NOT NULL, end_ INTEGER NOT NULL, kind TEXT NOT NULL, "
                          "title TEXT NOT NULL, text TEXT NOT NULL)")
        self.conn.execute("CREATE INDEX IF NOT EXISTS chunks_by_path ON chunks(path)")
        self.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, heading, title, "
                          "content='chunks', content_rowid='id', tokenize='porter unicode61')")
        self.conn.execute("CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN "
                          "INSERT INTO chunks_fts(rowid, text, heading, title) VALUES (new.id, new.text, new.heading, new.title); END")
        self.conn.execute("CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN "
                          "INSERT INTO chunks_fts(chunks_fts, rowid, text, heading, title) "
                          "VALUES ('delete', old.id, old.text, old.heading, old.title); END")
        # per connection: document frequency of each indexed term, and the same tokenizer for query words
        self.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_terms USING fts5vocab(main, chunks_fts, 'row')")
        self.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_instances USING fts5vocab(main, chunks_fts, "
                          "'instance')")
        self.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_fts USING fts5(word, tokenize='porter unicode61')")
        self.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_terms USING fts5vocab(temp, query_fts, 'instance')")

    def _ensure_vec_table(self, dim: int) -> None:
        self.conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vec USING vec0(embedding float[{int(dim)}] "
                          "distance_metric=cosine)")

    def get_meta(self) -> dict[str, str]:
        return dict(self._q("SELECT key, value FROM meta"))

    def file_hashes(self) -> dict[str, str]:
        return dict(self._q("SELECT path, sha256 FROM files"))

    def count(self) -> int:
        return self._q("SELECT count(*) FROM chunks")[0][0]

    def apply(self, updates: list[FileUpdate], removed: list[str], meta: dict[str, str]) -> None:
        """Replace changed files' chunks and drop removed files, all in one transaction (all or nothing)."""
        dim = int(meta["dim"])
        self._ensure_vec_table(dim)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for path in [u.path for u in updates] + list(removed):
                ids = [r[0] for r in self._q("SELECT id FROM chunks WHERE path = ?", (path,))]
                if ids:
                    marks = ",".join("?" * len(ids))
                    self.conn.execute(f"DELETE FROM chunks_vec WHERE rowid IN ({marks})", ids)
                    self.conn.execute(f"DELETE FROM chunks WHERE id IN ({marks})", ids)
                self.conn.execute("DELETE FROM files WHERE path = ?", (path,))
            next_id = self._q("SELECT coalesce(max(id), 0) + 1 FROM chunks")[0][0]
            for u in updates:  # one executemany per file and table: ids are assigned here, inside the transaction
                if len(u.chunks) != len(u.vectors) or (len(u.vectors) and u.vectors.shape[1] != dim):
                    raise OnecardError(f"internal: {u.path} has {len(u.chunks)} chunks but vectors {u.vectors.shape}")
                title, ids = _title(u.path), range(next_id, next_id + len(u.chunks))
                next_id += len(u.chunks)
                self.conn.executemany("INSERT INTO chunks(id, path, page, heading, start, end_, kind, title, text) "
                                      "VALUES (?,?,?,?,?,?,?,?,?)",
                                      [(i, u.path, c.page, c.heading, c.start, c.end, c.kind, title, c.text)
                                       for i, c in zip(ids, u.chunks)])
                vecs = np.ascontiguousarray(u.vectors, dtype=np.float32)
                self.conn.executemany("INSERT INTO chunks_vec(rowid, embedding) VALUES (?, ?)",
                                      [(i, v.tobytes()) for i, v in zip(ids, vecs)])
                self.conn.execute("INSERT INTO files(path, sha256, n_chunks, indexed_at) VALUES (?,?,?,?)",
                                  (u.path, u.sha256, len(u.chunks), time.time()))
            n_chunks = self._q("SELECT count(*) FROM chunks")[0][0]
            for key, value in {**meta, "schema": SCHEMA_VERSION, "generation": uuid.uuid4().hex,
                               "chunks": n_chunks}.items():
                self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def vector_search(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity), best first. Exact kNN (sqlite-vec's scan, or the in-memory matrix)."""
        if not self._q("SELECT 1 FROM sqlite_master WHERE name = 'chunks_vec'"):
            return []
        if self.memory_vectors:
            return top_cosine(*self.vector_matrix(), np.asarray(query, dtype=np.float32), int(n))
        rows = self._q("SELECT rowid, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ? ORDER BY distance",
                       (np.asarray(query, dtype=np.float32).tobytes(), int(n)))
        return [(int(r), 1.0 - float(d)) for r, d in rows]

    def _generation(self) -> str:
        gen = self._q("SELECT value FROM meta WHERE key = 'generation'")
        return gen[0][0] if gen else ""

    def vector_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids ascending, unit vectors [n, dim]) held in memory, reloaded when the index's generation changes."""
        gen = self._generation()
        if self._matrix is None or self._matrix[0] != gen:
            self.conn.execute("BEGIN")  # one snapshot: a write committed meanwhile cannot pair new rows with `gen`
            try:
                gen = self._generation()
                rows = self._q("SELECT rowid, embedding FROM chunks_vec")
            finally:
                self.conn.execute("COMMIT")
            ids = np.fromiter((r for r, _ in rows), dtype=np.int64, count=len(rows))
            dim = int(self.get_meta().get("dim", 0))
            mat = np.frombuffer(b"".join(b for _, b in rows), dtype=np.float32).reshape(len(rows), -1) if rows else \
                np.zeros((0, dim), np.float32)
            if (np.diff(ids) < 0).any():  # ascending ids let ``vectors`` find rows by binary search
                order = np.argsort(ids)
                ids, mat = ids[order], mat[order]
            self._matrix = (gen, ids, mat)
        return self._matrix[1], self._matrix[2]

    def bm25_index(self) -> Bm25Index:
        """The in-memory BM25 postings (``bm25_memory``), rebuilt when the index's generation changes."""
        gen = self._generation()
        if self._bm25 is None or self._bm25.generation != gen:
            self._bm25 = None  # free the old copy before building the new one
            self.conn.execute("BEGIN")  # one snapshot of meta, chunks and the FTS5 index
            try:
                gen = self._generation()
                ids = np.array([r[0] for r in self._q("SELECT id FROM chunks")], dtype=np.int64)
                self._bm25 = build_bm25_index(gen, ids, self.conn.execute(POSTINGS_SQL))
            finally:
                self.conn.execute("COMMIT")
        return self._bm25

    def _query_terms(self, words: list[str]) -> list[list[str]]:
        """The index's tokens (stemmed terms) of each query word, by FTS5's own tokenizer: ``foo_bar`` gives two."""
        self.conn.execute("DELETE FROM temp.query_fts")
        for i, w in enumerate(words):
            self.conn.execute("INSERT INTO temp.query_fts(rowid, word) VALUES (?, ?)", (i, w))
        terms: list[list[str]] = [[] for _ in words]
        for doc, term in self._q("SELECT doc, term FROM temp.query_terms ORDER BY doc, offset"):
            terms[doc].append(term)
        return terms

    def _common_words(self, words: list[str]) -> set[str]:
        """The words whose stemmed term is in more than ``MAX_TERM_SHARE`` of the chunks (IDF ~0 in FTS5's BM25)."""
        meta = dict(self._q("SELECT key, value FROM meta WHERE key IN ('chunks', 'generation')"))
        total = int(meta["chunks"]) if "chunks" in meta else self.count()
        if self._doc_freq[0] != meta.get("generation", ""):  # counting a common term's chunks costs ~10 ms at 100k
            self._doc_freq = (meta.get("generation", ""), {})
        cache = self._doc_freq[1]
        self.conn.execute("DELETE FROM temp.query_fts")
        for i, w in enumerate(words):
            self.conn.execute("INSERT INTO temp.query_fts(rowid, word) VALUES (?, ?)", (i, w))
        stems = dict(self._q("SELECT doc, term FROM temp.query_terms"))
        common = set()
        for i, term in stems.items():
            if term not in cache:
                df = self._q("SELECT doc FROM temp.chunks_terms WHERE term = ?", (term,))
                cache[term] = int(df[0][0]) if df else 0
            if cache[term] > MAX_TERM_SHARE * total:
                common.add(words[i])
        return common

    def bm25_search(self, query: str, n: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher = better), best first; text weighs 1, heading and file title 2 each.
        Words in more than half the chunks are left out (they cannot change the order, only slow it down).
        With ``memory_bm25`` the in-memory postings answer (same scores), unless a word is several tokens
        (a phrase: needs positions, which only FTS5 has)."""
        words = query_words(query)
        if not words:
            return []
        if self.memory_bm25 and self._bm25_queries >= 1:
            terms = self._query_terms(words)
            if all(len(t) == 1 for t in terms):
                index = self.bm25_index()
                phrases = [t[0] for t in terms]
                kept = [t for t in phrases if index.doc_freq(t) <= MAX_TERM_SHARE * index.n_rows] or phrases
                return index.top(kept, int(n))
        self._bm25_queries += 1
        return self.fts5_bm25_search(words, n)

    def fts5_bm25_search(self, words: list[str], n: int) -> list[tuple[int, float]]:
        """``bm25_search`` by FTS5 itself: the reference the in-memory path must rank as."""
        if not words:
            return []
        common = self._common_words(words)
        expr = fts_query([w for w in words if w not in common] or words)
        weights = ", ".join(str(w) for w in COLUMN_WEIGHTS)
        rows = self._q(f"SELECT rowid, bm25(chunks_fts, {weights}) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                       "ORDER BY s LIMIT ?", (expr, int(n)))
        return [(int(r), -float(s)) for r, s in rows]

    def chunks(self, ids: list[int]) -> dict[int, Chunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._q(f"SELECT id, path, text, start, end_, heading, page, kind FROM chunks WHERE id IN ({marks})", ids)
        return {r[0]: Chunk(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows}

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        """From the in-memory matrix when there is one; else one lookup per id: sqlite-vec answers ``rowid = ?``
        directly but scans the whole table for ``rowid IN (...)`` (60 ms at 100k chunks)."""
        if self.memory_vectors and ids:
            all_ids, matrix = self.vector_matrix()
            at = np.minimum(np.searchsorted(all_ids, ids), max(len(all_ids) - 1, 0))
            return {int(i): matrix[j] for i, j in zip(ids, at) if len(all_ids) and all_ids[j] == i}
        out = {}
        for i in ids:
            for r, b in self._q("SELECT rowid, embedding FROM chunks_vec WHERE rowid = ?", (int(i),)):
                out[int(r)] = np.frombuffer(b, dtype=np.float32)
        return out

    def close(self) -> None:
        self.conn.close()


def top_cosine(ids: np.ndarray, matrix: np.ndarray, query: np.ndarray, n: int) -> list[tuple[int, float]]:
    """Exact kNN over unit vectors (dot product = cosine): (id, similarity) of the best ``n``, best first."""
    if not len(ids):
        return []
    sims = matrix @ query
    top = np.argpartition(-sims, n - 1)[:n] if n < len(sims) else np.arange(len(sims))
    top = top[np.argsort(-sims[top], kind="stable")]
    return [(int(ids[i]), float(sims[i])) for i in top]


def open_store(db: str | Path, create: bool = False, memory_vectors: bool = False) -> Store:
    """``postgresql://...`` -> ``PgVectorStore``; anything else is an SQLite index file."""
    if str(db).startswith(("postgresql://", "postgres://")):
        from onecard.rag.pgvector_store import PgVectorStore

        return PgVectorStore(str(db), create=create)
    return SqliteStore(db, create=create, memory_vectors=memory_vectors)


_OPEN: dict[tuple[str, int], Store] = {}


def shared_store(db: str | Path) -> Store:
    """A store kept open for this process (vectors cached in memory), so repeated searches, e.g. a server's,
    skip opening the file and loading vectors. Keyed by path and inode: a replaced file is reopened."""
    if str(db).startswith(("postgresql://", "postgres://")):
        key = (str(db), 0)
    else:
        path = Path(db).expanduser().resolve()
        if not path.is_file():
            return open_store(db)  # raises the one-line "no index at ..." error
        key = (path.as_posix(), path.stat().st_ino)
    if key not in _OPEN:
        _OPEN[key] = open_store(db, memory_vectors=True)
    return _OPEN[key]


Reranker = Callable[[str, list[Hit]], list[Hit]]


@dataclass
class SearchResult:
    hits: list[Hit]
    mode: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def minmax_fuse(scored_lists: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Score fusion: each list's scores rescaled to [0, 1] over its candidates (best 1, worst 0; a list whose
    scores are all equal gives 1), averaged over the lists with equal weights; a chunk absent from a list gets 0
    there. Why not RRF: RRF rewards chunks that both lists rank moderately and ignores how far ahead a list's
    best hit is, so an exact keyword match that the embedding misses sinks (on the packaged evaluation set RRF
    put hybrid below BM25 alone; this fusion does not). Best first, ties by id."""
    scores: dict[int, float] = {}
    for scored in scored_lists:
        if not scored:
            continue
        vals = np.array([s for _, s in scored], dtype=np.float64)
        lo, span = vals.min(), vals.max() - vals.min()
        norm = (vals - lo) / span if span > 0 else np.ones_like(vals)
        for (doc, _), z in zip(scored, norm):
            scores[doc] = scores.get(doc, 0.0) + float(z) / len(scored_lists)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def rrf_fuse(ranked_lists: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: score(d) = sum over lists of 1 / (k + rank(d)), rank 1-based; best first."""
    scores: dict[int, float] = {}
    for ranked in ranked_lists:
        for rank, doc in enumerate(ranked, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def retrieve(store: Store, query: str, query_vector: np.ndarray | None, k: int = 5, mode: str = "hybrid",
             candidates: int = 50, rerank: Reranker | None = None, fusion: str = "minmax") -> SearchResult:
    """Top-``k`` hits for ``query`` from ``store``; ``query_vector`` is the embedded query (unused for bm25 mode).
    ``fusion`` (hybrid only): ``minmax`` (default, see ``minmax_fuse``) or ``rrf``."""
    if mode not in MODES:
        raise BadInputError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
    if fusion not in FUSIONS:
        raise BadInputError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
    if k < 1:
        raise BadInputError(f"k must be >= 1, got {k}")
    n = max(candidates, k)
    t0 = time.perf_counter()
    # one thread: with BM25 in memory (~3 ms at 100k chunks) a second thread for it bought nothing measurable
    vec = store.vector_search(query_vector, n) if mode in ("hybrid", "vector") else []
    bm = store.bm25_search(query, n) if mode in ("hybrid", "bm25") else []
    t2 = time.perf_counter()
    if mode == "vector":
        ranked = vec
    elif mode == "bm25":
        ranked = bm
    elif fusion == "rrf":
        ranked = rrf_fuse([[i for i, _ in vec], [i for i, _ in bm]])
    else:
        ranked = minmax_fuse([vec, bm])
    pool = ranked if rerank is not None else ranked[:k]
    ids = [i for i, _ in pool]
    chunks = store.chunks(ids)
    sim = dict(vec)
    if query_vector is not None:
        missing = [i for i in ids if i not in sim]
        for i, v in store.vectors(missing).items():
            sim[i] = float(np.dot(v, query_vector))
    bm_score = dict(bm)
    vrank = {i: r for r, (i, _) in enumerate(vec, start=1)}
    brank = {i: r for r, (i, _) in enumerate(bm, start=1)}
    hits = [Hit(i, chunks[i], float(s), sim.get(i), bm_score.get(i), vrank.get(i), brank.get(i))
            for i, s in pool if i in chunks]
    if rerank is not None:
        hits = list(rerank(query, hits))[:k]
    t3 = time.perf_counter()
    return SearchResult(hits, mode, t3 - t0, {"lists_s": t2 - t0, "fetch_s": t3 - t2})


def check_embedder(meta: dict[str, str], embedder_name: str) -> None:
    """Vectors of different embedders are not comparable: refuse to query or extend an index with another one."""
    if meta.get("embedder") and meta["embedder"] != embedder_name:
        raise BadInputError(f"this index was built with embedder '{meta['embedder']}', not '{embedder_name}'; "
                            "leave --embedder out (the index's own is used) or build a new --db")


def search(query: str, db: str | Path, k: int = 5, mode: str = "hybrid", embedder: str | None = None,
           candidates: int = 50, rerank: Reranker | None = None, fusion: str = "minmax") -> SearchResult:
    """Retrieval only: open the index at ``db``, embed ``query`` with the index's embedder, return top-``k`` hits."""
    if not query or not query.strip():
        raise BadInputError("the query is empty; pass some words to search for")
    store = shared_store(db)
    meta = store.get_meta()
    qvec = None
    if mode != "bm25":
        from onecard.rag.embeddings import embedder_name, load_embedder

        check_embedder(meta, embedder_name(embedder or meta.get("embedder")))
        emb = load_embedder(embedder or meta.get("embedder"))
        qvec = emb.encode([query])[0]
    return retrieve(store, query, qvec, k=k, mode=mode, candidates=candidates, rerank=rerank, fusion=fusion)

