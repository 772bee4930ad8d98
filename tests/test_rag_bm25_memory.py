"""The in-memory BM25 postings rank exactly as FTS5's bm25() does, and follow the index when it changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onecard.rag.splitter import Chunk
from onecard.rag.store import FileUpdate, SqliteStore, query_words

FILES = {
    "/kb/garden/tomatoes.md": [
        ("Watering", "Water tomato plants deeply twice a week; tomatoes crack when watering is irregular."),
        ("Watering", "Mulch keeps the soil moist. Running drip lines run water to the roots."),
        ("Pests", "Aphids and whitefly attack tomato leaves; spray soapy water on the leaves."),
    ],
    "/kb/garden/roses.md": [
        ("Pruning", "Prune roses in late winter, cutting just above an outward facing bud."),
        ("Pests", "Greenfly and aphids love roses; ladybirds eat aphids."),
    ],
    "/kb/net/router.md": [
        ("Router", "If the wifi drops, restart the router and check the WAN cable and the DSL line."),
        ("Router tomato", "Error code ZX-4471 means the DSL line has no sync; the router logs the error code."),
        ("Modem", "The modem firmware updates itself at 3 am; a running update blinks the lights."),
    ],
    "/kb/kitchen/bread.txt": [
        ("", "Knead the dough for ten minutes, let it rise for an hour, then bake at 220 C."),
        ("", "Water, flour, salt and yeast: bread needs nothing else. Water temperature matters for yeast."),
    ],
}
QUERIES = [
    "how often to water tomato plants", "aphids on roses", "router error code ZX-4471", "running runs run",
    "water water tomatoes tomato", "bread yeast temperature", "modem firmware update at 3 am", "garden pests",
    "nothing matches xylophone", "prune", "kitchen", "the", "get_token parent_path",
]


def _update(path: str, pieces: list[tuple[str, str]], seed: int) -> FileUpdate:
    chunks = [Chunk(path, text, i * 100, i * 100 + len(text), heading) for i, (heading, text) in enumerate(pieces)]
    vecs = np.random.default_rng(seed).standard_normal((len(chunks), 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return FileUpdate(path, f"sha{seed}", chunks, vecs)


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "kb.sqlite", create=True, memory_vectors=True)
    store.apply([_update(p, pieces, i) for i, (p, pieces) in enumerate(FILES.items())], [], {"embedder": "x", "dim": "8"})
    yield store
    store.close()


def _memory(store: SqliteStore, query: str, n: int) -> list[tuple[int, float]]:
    store._bm25_queries = 1  # past the one-shot query: the in-memory path answers
    return store.bm25_search(query, n)


@pytest.mark.parametrize("n", [50, 3])
def test_same_scores_and_ranking_as_fts5(store, n):
    for q in QUERIES:
        ref, got = store.fts5_bm25_search(query_words(q), n), _memory(store, q, n)
        assert [s for _, s in got] == pytest.approx([s for _, s in ref], rel=1e-12, abs=0), q
        ref_at = dict(ref)
        for i, s in got:  # the same chunk at each score; within a tie FTS5's order is its own, ours is by id
            assert i in ref_at and ref_at[i] == pytest.approx(s, rel=1e-12) or s in [x for _, x in ref], q
        if len(ref) < n:  # every match returned: the same chunks exactly
            assert sorted(ref_at) == sorted(dict(got)), q
    assert store._bm25 is not None, "the in-memory postings were used"
    assert [s for _, s in _memory(store, "router error code", 50)] == sorted(
        [s for _, s in _memory(store, "router error code", 50)], reverse=True)


def test_postings_count_like_fts5(store):
    index = store.bm25_index()
    df = dict(store._q("SELECT term, doc FROM temp.chunks_terms"))
    assert {t: index.doc_freq(t) for t in df} == df
    assert index.n_rows == store.count() == sum(len(p) for p in FILES.values())
    # 'water' is in a heading-less chunk twice and in the title of none: f counts occurrences x column weight
    t = index.terms["water"]
    docs, f = index.docs[index.offsets[t]:index.offsets[t + 1]], index.freqs[index.offsets[t]:index.offsets[t + 1]]
    by_text = {store.chunks([int(index.ids[d])])[int(index.ids[d])].text: float(x) for d, x in zip(docs, f)}
    assert by_text["Water, flour, salt and yeast: bread needs nothing else. Water temperature matters for yeast."] == 2.0
    # 'tomato' in the heading "Router tomato" weighs 2; in the title (tomatoes.md) 2 per chunk on top of the text
    t = index.terms["tomato"]
    f = dict(zip(index.ids[index.docs[index.offsets[t]:index.offsets[t + 1]]].tolist(),
                 index.freqs[index.offsets[t]:index.offsets[t + 1]].tolist()))
    texts = store.chunks(list(f))
    by_text = {texts[i].text[:20]: x for i, x in f.items()}
    assert by_text == {"Error code ZX-4471 m": 2.0,   # heading only
                       "Mulch keeps the soil": 2.0,   # title only
                       "Aphids and whitefly ": 3.0,   # title + text once
                       "Water tomato plants ": 4.0}   # title + text twice ('tomato', 'tomatoes')


def test_phrase_words_go_to_fts5(store):
    # 'get_token' is the phrase "get token" to FTS5: positions needed, so FTS5 answers, with the same result
    assert store._query_terms(["get_token", "water"]) == [["get", "token"], ["water"]]
    assert _memory(store, "get_token water", 50) == store.fts5_bm25_search(["get_token", "water"], 50)


def test_built_at_second_query_then_follows_reindex(tmp_path, store):
    store._bm25_queries = 0
    first = store.bm25_search("aphids", 10)
    assert store._bm25 is None, "a one-shot search does not pay the build"
    assert store.bm25_search("aphids", 10) == first and store._bm25 is not None
    built = store._bm25
    # another process re-indexes: roses.md changes, bread.txt goes away
    other = SqliteStore(store.path)
    other.apply([_update("/kb/garden/roses.md", [("Pests", "Sawfly larvae strip rose leaves in June.")], 9)],
                ["/kb/kitchen/bread.txt"], {"embedder": "x", "dim": "8"})
    other.close()
    texts = lambda hits: [c.text for c in store.chunks([i for i, _ in hits]).values()]  # noqa: E731
    assert texts(store.bm25_search("sawfly larvae", 10)) == ["Sawfly larvae strip rose leaves in June."]
    assert store._bm25 is not built and store._bm25.generation == store.get_meta()["generation"]
    assert store.bm25_search("bread yeast", 10) == [] == store.fts5_bm25_search(["bread", "yeast"], 10)
    assert len(store.bm25_search("aphids", 10)) == 1
    for q in QUERIES + ["sawfly rose"]:
        assert [s for _, s in store.bm25_search(q, 50)] == pytest.approx(
            [s for _, s in store.fts5_bm25_search(query_words(q), 50)], rel=1e-12, abs=0), q


def test_vectors_from_memory_match_sqlite(store):
    ids = [i for i, _ in _memory(store, "water tomato aphids", 50)] + [10_000]
    mem = store.vectors(ids)
    store.memory_vectors = False
    disk = store.vectors(ids)
    assert sorted(mem) == sorted(disk) == sorted(ids[:-1])
    assert all(np.array_equal(mem[i], disk[i]) for i in disk)
