"""Index + retrieval with the real embedder: hybrid fusion, incremental re-index, crash safety, I-don't-know, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from onecard.errors import BadInputError
from onecard.rag.answer import ask, parse_citations
from onecard.rag.indexer import index_directory
from onecard.rag.splitter import Chunk
from onecard.rag.store import FileUpdate, SqliteStore, fts_query, minmax_fuse, rrf_fuse, search

SRC = str(Path(__file__).resolve().parents[1] / "src")

DOCS = {
    "garden.md": "# Tomatoes\n\nWater tomato plants deeply twice a week; mulch keeps the soil moist in summer heat.\n\n"
                 "# Roses\n\nPrune roses in late winter, cutting just above an outward-facing bud.\n",
    "network.md": "# Router\n\nIf the wifi drops, restart the router and check the WAN cable. Error code ZX-4471 means "
                  "the DSL line has no sync.\n",
    "cooking.txt": "To bake bread, knead the dough for ten minutes, let it rise for an hour, then bake at 220 C.\n",
    "physics.md": "# Orbits\n\nA satellite in low Earth orbit circles the planet roughly every ninety minutes.\n",
}


def _write(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    folder = _write(tmp_path_factory.mktemp("docs"), DOCS)
    db = folder.parent / "kb.sqlite"
    rep = index_directory(folder, db)
    assert len(rep.added) == 4 and rep.total_chunks == rep.chunks_written >= 4
    return folder, db


def test_rrf_fusion_math():
    fused = dict(rrf_fuse([[1, 2, 3], [3, 1]], k=60))
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2] == pytest.approx(1 / 62)
    assert [d for d, _ in rrf_fuse([[1, 2, 3], [3, 1]], k=60)] == [1, 3, 2]


def test_minmax_fusion_math():
    fused = dict(minmax_fuse([[(1, 0.9), (2, 0.5), (3, 0.4)], [(3, 12.0), (4, 4.0), (1, 2.0)]]))
    assert fused[1] == pytest.approx((1.0 + 0.0) / 2)
    assert fused[3] == pytest.approx((0.0 + 1.0) / 2)
    assert fused[2] == pytest.approx(0.2 / 2)
    assert fused[4] == pytest.approx(0.2 / 2)
    # a list far ahead of its runner-up carries its best hit, which RRF would rank below a two-list consensus
    vec, bm = [(5, 0.80), (6, 0.60), (7, 0.40)], [(8, 30.0), (9, 3.0), (6, 2.0)]
    mm, rrf = [d for d, _ in minmax_fuse([vec, bm])], [d for d, _ in rrf_fuse([[i for i, _ in vec], [i for i, _ in bm]])]
    assert mm.index(8) < mm.index(6) and rrf.index(6) < rrf.index(8)
    assert minmax_fuse([[(1, 3.0)], []]) == [(1, 0.5)], "an empty list still counts in the mean"


def test_fts_query_is_sanitised():
    assert fts_query('what is "ZX-4471" OR NEAR(a b)*') == '"zx" OR "4471" OR "near"'
    assert fts_query("the of and ?") == ""


def _store_of(path: Path, texts: list[str]) -> SqliteStore:
    """An index of ``texts`` (one file, random unit vectors): enough for BM25, no embedder needed."""
    import numpy as np

    vecs = np.random.default_rng(0).standard_normal((len(texts), 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    chunks = [Chunk("/d/notes.txt", t, i * 100, i * 100 + len(t)) for i, t in enumerate(texts)]
    store = SqliteStore(path, create=True)
    store.apply([FileUpdate("/d/notes.txt", "sha", chunks, vecs)], [], {"embedder": "x", "dim": "8"})
    return store


def test_bm25_leaves_out_words_in_half_the_chunks(tmp_path):
    texts = ["python snakes shed their skin", "python code runs fast", "python lists and python dicts",
             "zebra stripes confuse flies", "python zebra crossing signs", "quiet library reading room"]
    store = _store_of(tmp_path / "kb.sqlite", texts)
    assert store.get_meta()["chunks"] == "6"
    # 'python' is in 4 of 6 chunks: IDF ~0, so it is dropped; the ranking by the other words is unchanged
    assert store._common_words(["python", "zebra"]) == {"python"}
    ids = [i for i, _ in store.bm25_search("python zebra", 10)]
    assert sorted(store.chunks(ids)[i].text for i in ids) == sorted(t for t in texts if "zebra" in t)
    assert [i for i, _ in store.bm25_search("zebra", 10)] == ids
    # stemming is the index's: 'pythons' stems to 'python', the common term
    assert store._common_words(["pythons", "zebras"]) == {"pythons"}
    # a query of common words only keeps them all rather than finding nothing
    assert len(store.bm25_search("python", 10)) == 4
    store.close()


def test_each_mode_finds_its_kind_of_match(kb):
    _, db = kb
    # a rare code only BM25 can match exactly
    bm = search("ZX-4471", db, k=1, mode="bm25").hits
    assert bm and Path(bm[0].chunk.source).name == "network.md"
    # a paraphrase with no shared content words: only the embedding sees it
    vec = search("how often should I irrigate my vegetables", db, k=1, mode="vector").hits
    assert Path(vec[0].chunk.source).name == "garden.md" and vec[0].chunk.heading == "Tomatoes"
    hyb = search("how often should I irrigate my vegetables", db, k=2, mode="hybrid").hits
    assert Path(hyb[0].chunk.source).name == "garden.md"
    assert all(h.similarity is not None for h in hyb), "hybrid fills cosine similarity for every hit"


def test_hybrid_fuses_both_lists(kb):
    _, db = kb
    res = search("router ZX-4471 wifi", db, k=4, mode="hybrid")
    top = res.hits[0]
    assert Path(top.chunk.source).name == "network.md"
    assert top.vector_rank is not None and top.bm25_rank is not None
    assert [h.score for h in res.hits] == sorted((h.score for h in res.hits), reverse=True)
    assert 0.0 < res.hits[-1].score <= top.score <= 1.0, "min-max fused scores lie in [0, 1]"
    rrf = search("router ZX-4471 wifi", db, k=4, mode="hybrid", fusion="rrf").hits[0]
    assert rrf.score == pytest.approx(1 / (60 + rrf.vector_rank) + 1 / (60 + rrf.bm25_rank))


def test_rerank_hook_reorders(kb):
    _, db = kb
    res = search("router wifi", db, k=3, rerank=lambda q, hits: sorted(hits, key=lambda h: "bread" not in h.chunk.text))
    assert "bread" in res.hits[0].chunk.text


def test_i_dont_know_without_calling_the_model(kb):
    _, db = kb

    def must_not_run(prompt: str) -> str:
        raise AssertionError("the model must not be called when nothing is relevant")

    ans = ask("What is the airspeed velocity of an unladen swallow in Mesopotamian cuneiform?", db,
              generate=must_not_run, min_similarity=0.5)
    assert ans.unknown and ans.text.startswith("I don't know") and ans.citations == []


def test_answer_citations_parsed_and_mapped(kb):
    _, db = kb
    seen = {}

    def fake_model(prompt: str) -> str:  # stands in for an LLM: cites passage 1 and an invalid 9
        seen["prompt"] = prompt
        return "Restart the router [1]. Also see [1, 9]."

    ans = ask("my wifi keeps dropping, what should I do?", db, generate=fake_model, k=3)
    assert "[1] (network.md, section: Router)" in seen["prompt"] and "Question: my wifi" in seen["prompt"]
    assert [c.n for c in ans.citations] == [1] and ans.invalid_citations == 1
    assert Path(ans.citations[0].source).name == "network.md" and ans.citations[0].heading == "Router"
    assert parse_citations("[2][3] and [2, 3]", 3) == ([2, 3], 0)


def test_incremental_reindex(tmp_path):
    folder = _write(tmp_path / "docs", DOCS)
    db = tmp_path / "kb.sqlite"
    index_directory(folder, db)
    rep = index_directory(folder, db)
    assert rep.unchanged == 4 and rep.chunks_written == 0 and not (rep.added or rep.changed or rep.removed)
    (folder / "cooking.txt").write_text("To make pancakes, whisk flour, milk and eggs; fry in butter.\n")
    (folder / "physics.md").unlink()
    (folder / "new.md").write_text("# Bikes\n\nPump bicycle tyres to the pressure printed on the sidewall.\n")
    rep = index_directory(folder, db)
    assert [Path(p).name for p in rep.changed] == ["cooking.txt"]
    assert [Path(p).name for p in rep.removed] == ["physics.md"]
    assert [Path(p).name for p in rep.added] == ["new.md"] and rep.unchanged == 2
    assert rep.chunks_written == 2
    names = {Path(h.chunk.source).name for h in search("satellite orbit ninety minutes", db, k=10, mode="bm25").hits}
    assert "physics.md" not in names
    assert "pancakes" in search("pancakes", db, k=1, mode="bm25").hits[0].chunk.text
    assert "bread" not in " ".join(h.chunk.text for h in search("bread dough", db, k=10, mode="bm25").hits)


CRASHER = textwrap.dedent("""
    import os, signal, sys
    from onecard.rag import store

    real_connect = store._connect

    class Crashing:
        # wraps the connection; SIGKILLs this process at the second file's vector insert, inside the write
        # transaction (the first file's rows are already written)
        def __init__(self, conn):
            self.conn, self.inserts = conn, 0
        def _count(self, sql):
            if sql.startswith("INSERT INTO chunks_vec"):
                self.inserts += 1
                if self.inserts == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
        def execute(self, sql, *args):
            self._count(sql)
            return self.conn.execute(sql, *args)
        def executemany(self, sql, *args):
            self._count(sql)
            return self.conn.executemany(sql, *args)
        def __getattr__(self, name):
            return getattr(self.conn, name)

    store._connect = lambda path: Crashing(real_connect(path))
    from onecard.rag.indexer import index_directory
    index_directory(sys.argv[1], sys.argv[2])
""")


def test_crash_mid_index_leaves_previous_index_usable(tmp_path):
    folder = _write(tmp_path / "docs", DOCS)
    db = tmp_path / "kb.sqlite"
    index_directory(folder, db)
    before = SqliteStore(db)
    hashes, count = before.file_hashes(), before.count()
    before.close()
    (folder / "network.md").write_text("# Modem\n\nThe modem firmware updates itself at 3 am.\n")
    (folder / "extra.md").write_text("# Extra\n\nCompletely new text about glaciers and ice ages.\n")
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(folder), str(db)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC}, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    after = SqliteStore(db)
    assert after.file_hashes() == hashes and after.count() == count, "the killed write must roll back entirely"
    after.close()
    hit = search("ZX-4471 router", db, k=1).hits[0]
    assert "ZX-4471" in hit.chunk.text, "the old content still answers"
    rep = index_directory(folder, db)  # and the next run completes the update
    assert sorted(Path(p).name for p in rep.added + rep.changed) == ["extra.md", "network.md"]


def test_bad_inputs(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        index_directory(tmp_path / "missing", tmp_path / "kb.sqlite")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="empty"):
        index_directory(tmp_path / "empty", tmp_path / "kb.sqlite")
    with pytest.raises(BadInputError, match="no index"):
        search("anything", tmp_path / "nope.sqlite")
    (tmp_path / "junk.sqlite").write_text("this is not sqlite" * 100)
    with pytest.raises(BadInputError, match="not a onecard RAG index"):
        search("anything", tmp_path / "junk.sqlite")
    with pytest.raises(BadInputError, match="mode"):
        search("x", _index_one(tmp_path), mode="fuzzy")
    with pytest.raises(BadInputError, match="empty"):
        search("   ", tmp_path / "kb1.sqlite")
    with pytest.raises(BadInputError, match="model"):
        ask("q", tmp_path / "kb1.sqlite")


def _index_one(tmp_path: Path) -> Path:
    _write(tmp_path / "one", {"a.md": "# A\n\nhello\n"})
    index_directory(tmp_path / "one", tmp_path / "kb1.sqlite")
    return tmp_path / "kb1.sqlite"
