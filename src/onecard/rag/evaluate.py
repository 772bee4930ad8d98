"""Retrieval quality (recall@k, MRR) per mode, and answer citation accuracy, on a question set with known passages.

A question's target is a passage: (file, character span). A retrieved chunk is
*relevant* when it comes from that file and its span overlaps the passage.
recall@k = share of questions with a relevant chunk in the top k; MRR = mean
of 1/rank of the first relevant chunk (0 when none in the candidate depth).

Question files are JSONL. Each line has ``question`` and either
``file`` + ``symbol`` (stdlib set: the passage is relocated with ``ast``) or
``source`` + ``start`` + ``end`` (any corpus: a path suffix and a span).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onecard.errors import BadInputError
from onecard.rag.store import Hit, check_embedder, open_store, retrieve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    question: str
    source_suffix: str   # matched against the end of the indexed absolute path
    start: int
    end: int
    id: str = ""


def load_questions(path: str | Path) -> tuple[list[Target], list[str]]:
    """Targets from a JSONL file, and the ids of questions whose passage could not be found (reported)."""
    from onecard.rag.evalset import locate

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"question file '{path}' does not exist; pass a JSONL file (see docs/rag.md)")
    targets, missing = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInputError(f"{path}:{n} is not JSON ({err.msg}); one JSON object per line") from err
        if "question" not in q:
            raise BadInputError(f"{path}:{n} has no 'question' field")
        qid = str(q.get("id", n))
        if "symbol" in q:
            p = locate(q["file"], q["symbol"])
            if p is None:
                missing.append(qid)
                continue
            targets.append(Target(q["question"], "/" + q["file"], p.start, p.end, qid))
        elif {"source", "start", "end"} <= q.keys():
            targets.append(Target(q["question"], "/" + q["source"].lstrip("/"), int(q["start"]), int(q["end"]), qid))
        else:
            raise BadInputError(f"{path}:{n} needs 'file'+'symbol' or 'source'+'start'+'end' to locate its passage")
    if not targets:
        raise BadInputError(f"no usable questions in '{path}'")
    return targets, missing


def is_relevant(hit: Hit, t: Target) -> bool:
    c = hit.chunk
    return c.source.endswith(t.source_suffix) and c.start < t.end and t.start < c.end


def first_relevant_rank(hits: list[Hit], t: Target) -> int | None:
    for rank, h in enumerate(hits, start=1):
        if is_relevant(h, t):
            return rank
    return None


@dataclass
class ModeScores:
    mode: str
    recall: dict[int, float]
    mrr: float
    p95_ms: float
    ranks: list[int | None] = field(repr=False, default_factory=list)


# what ``rag eval`` compares: the three modes, and hybrid with reciprocal-rank fusion instead of the default
EVAL_MODES = {"hybrid": ("hybrid", "minmax"), "vector": ("vector", "minmax"), "bm25": ("bm25", "minmax"),
              "hybrid_rrf": ("hybrid", "rrf")}


def evaluate_retrieval(db: str | Path, targets: list[Target], ks: tuple[int, ...] = (1, 5, 10),
                       modes: tuple[str, ...] = tuple(EVAL_MODES), depth: int = 50, embedder: str | None = None,
                       progress: bool = False) -> dict[str, ModeScores]:
    """recall@k for each k, MRR@depth and per-query retrieval latency for each of ``EVAL_MODES`` (query
    embedding excluded)."""
    from onecard.rag.embeddings import embedder_name, load_embedder

    store = open_store(db, memory_vectors=True)
    try:
        meta = store.get_meta()
        check_embedder(meta, embedder_name(embedder or meta.get("embedder")))
        emb = load_embedder(embedder or meta.get("embedder"))
        qvecs = emb.encode([t.question for t in targets], progress=progress)
        out: dict[str, ModeScores] = {}
        for name in modes:
            mode, fusion = EVAL_MODES[name]
            ranks, times = [], []
            for t, qv in zip(targets, qvecs):
                t0 = time.perf_counter()
                res = retrieve(store, t.question, qv, k=depth, mode=mode, candidates=depth, fusion=fusion)
                times.append(time.perf_counter() - t0)
                ranks.append(first_relevant_rank(res.hits, t))
            recall = {k: float(np.mean([r is not None and r <= k for r in ranks])) for k in ks}
            mrr = float(np.mean([1.0 / r if r else 0.0 for r in ranks]))
            out[name] = ModeScores(name, recall, mrr, float(np.percentile(times, 95) * 1e3), ranks)
        return out
    finally:
        store.close()


OFFTOPIC_FILE = Path(__file__).resolve().parent / "eval" / "offtopic_questions.txt"


@dataclass
class RefusalScores:
    threshold: float
    in_domain_refused: float     # share of real questions that would get "I don't know" (should be ~0)
    off_topic_refused: float     # share of off-topic questions that would get "I don't know" (should be ~1)
    in_domain_min_similarity: float
    off_topic_max_similarity: float


def evaluate_refusals(db: str | Path, targets: list[Target], off_topic: list[str], threshold: float,
                      embedder: str | None = None) -> RefusalScores:
    """How the "I don't know" threshold splits real questions from off-topic ones (``best_similarity`` of the
    hybrid top 5, as ``ask`` computes it)."""
    from onecard.rag.answer import best_similarity
    from onecard.rag.embeddings import embedder_name, load_embedder

    store = open_store(db, memory_vectors=True)
    try:
        meta = store.get_meta()
        check_embedder(meta, embedder_name(embedder or meta.get("embedder")))
        emb = load_embedder(embedder or meta.get("embedder"))
        qs = [t.question for t in targets] + list(off_topic)
        best = []
        for q, v in zip(qs, emb.encode(qs)):
            hits = retrieve(store, q, v, k=5, mode="hybrid").hits
            best.append(best_similarity(q, hits, emb.name) or 0.0)
    finally:
        store.close()
    a, b = np.array(best[: len(targets)]), np.array(best[len(targets):])
    return RefusalScores(threshold, float((a < threshold).mean()), float((b < threshold).mean()) if len(b) else 0.0,
                         float(a.min()), float(b.max()) if len(b) else 0.0)


@dataclass
class CitationScores:
    questions: int
    answered: int            # answers that are not "I don't know"
    with_citation: int       # answers citing at least one valid [n]
    correct_citation: int    # answers citing at least one relevant chunk
    invalid_citations: int   # [n] outside 1..len(context)

    @property
    def accuracy(self) -> float:
        """Share of questions whose answer cites a chunk that holds the target passage."""
        return self.correct_citation / self.questions if self.questions else 0.0


def evaluate_citations(db: str | Path, targets: list[Target], model: str, k: int = 5, max_tokens: int = 128,
                       progress: bool = False) -> CitationScores:
    """Generate an answer per question with ``model`` and check what its [n] citations point at."""
    from rich.progress import track

    from onecard.rag.answer import ask

    scores = CitationScores(len(targets), 0, 0, 0, 0)
    it = track(targets, description="answering") if progress else targets
    for t in it:
        ans = ask(t.question, db, model=model, k=k, max_tokens=max_tokens)
        if ans.unknown:
            continue
        scores.answered += 1
        scores.invalid_citations += ans.invalid_citations
        if ans.citations:
            scores.with_citation += 1
            if any(is_relevant(ans.chunks[c.n - 1], t) for c in ans.citations):
                scores.correct_citation += 1
    return scores
