"""An in-memory copy of the FTS5 index that ranks exactly as FTS5's ``bm25()`` does, in a few milliseconds.

Why: FTS5 calls its ``bm25()`` for every chunk holding any query word (~30k of
100k chunks for a typical question, ~1.2 us each) and cannot stop early, so a
BM25 query cost 46 / 86 ms (p50 / p95) at 100k chunks. Here the postings are
NumPy arrays (per term: chunk positions and weighted term frequencies), a
query is a few gathers and adds over its terms' postings and one
``argpartition``.

Same ranking, by construction: the postings are read from the FTS5 index
itself (its ``fts5vocab`` instance table: same tokenizer, same stems), and the
score is FTS5's formula (``fts5_aux.c``, ``fts5Bm25Function``) evaluated with
the same operations in the same order in float64:

    idf(t)   = log((N - n_t + 0.5) / (n_t + 0.5)), clamped to 1e-6 when <= 0
    f(t, d)  = sum over the occurrences of t in d of its column's weight
    score(d) = sum over query phrases of idf * (f * (k1 + 1)) / (f + k1 * (1 - b + b * |d| / avgdl))

with k1 = 1.2, b = 0.75 (FTS5's constants), |d| the chunk's token count over
all columns (unweighted), avgdl the mean of |d| over the N rows. Only one-token
query words are answered here; a word that FTS5 tokenises into several tokens
(``foo_bar`` is the phrase "foo bar") needs positions, and the caller sends
that query to FTS5. SQLite stays the source of truth: nothing is persisted,
the copy is rebuilt when the index's generation changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from onecard.errors import OnecardError

# FTS5's bm25() constants (fts5_aux.c); the column weights are the ones SqliteStore passes to bm25().
K1 = 1.2
B = 0.75
COLUMNS = ("text", "heading", "title")
COLUMN_WEIGHTS = (1.0, 2.0, 2.0)

# One row per term, in term order (fts5vocab delivers that order, so SQLite streams the GROUP BY without sorting):
# the term, its occurrence count, the chunk id of each occurrence (comma-separated) and each occurrence's
# column as one digit. Strings, because parsing one big string in NumPy is ~20x faster than 9M Python tuples.
POSTINGS_SQL = ("SELECT term, count(*), group_concat(doc), group_concat(CASE col "
                + " ".join(f"WHEN '{c}' THEN '{i}'" for i, c in enumerate(COLUMNS))
                + " ELSE '?' END, '') FROM temp.chunks_instances GROUP BY term")


@dataclass(frozen=True)
class Bm25Index:
    """Postings of every term (CSR layout) plus what BM25 needs per chunk; ``generation`` is the index's."""

    generation: str
    ids: np.ndarray        # [N] int64 chunk ids (rowids), ascending; positions below index into it
    norm: np.ndarray       # [N] float64 k1 * (1 - b + b * |d| / avgdl), FTS5's length normalisation per chunk
    terms: dict[str, int]  # stemmed term -> row in offsets
    offsets: np.ndarray    # [T + 1] int64: term t's postings are [offsets[t], offsets[t + 1])
    docs: np.ndarray       # [P] int32 chunk positions, ascending within a term
    freqs: np.ndarray      # [P] float32 weighted term frequency f(t, d) (sums of the small column weights: exact)

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    def doc_freq(self, term: str) -> int:
        """Chunks holding ``term`` (FTS5's nHit for a one-token phrase)."""
        t = self.terms.get(term)
        return 0 if t is None else int(self.offsets[t + 1] - self.offsets[t])

    def nbytes(self) -> int:
        """Bytes held in arrays (the term dict's strings are not counted)."""
        return sum(a.nbytes for a in (self.ids, self.norm, self.offsets, self.docs, self.freqs))

    def top(self, phrases: Sequence[str], n: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) of the best ``n`` chunks holding any of ``phrases`` (stemmed one-token terms,
        one per query phrase, repeats counted as FTS5 counts them), best first, ties by id."""
        scores = np.zeros(self.n_rows, dtype=np.float64)
        for term in phrases:
            t = self.terms.get(term)
            if t is None:
                continue  # no chunk holds it: it adds nothing to any score
            lo, hi = int(self.offsets[t]), int(self.offsets[t + 1])
            docs, f = self.docs[lo:hi], self.freqs[lo:hi].astype(np.float64)
            idf = math.log((self.n_rows - (hi - lo) + 0.5) / ((hi - lo) + 0.5))
            idf = idf if idf > 0.0 else 1e-6
            scores[docs] += idf * ((f * (K1 + 1.0)) / (f + self.norm[docs]))
        matched = np.flatnonzero(scores)  # every matching chunk scores > 0 (idf >= 1e-6, f >= its column weight)
        if len(matched) > n:
            kth = np.partition(scores[matched], len(matched) - n)[len(matched) - n]
            matched = matched[scores[matched] >= kth]  # ties at the cut all kept, then cut by id below
        order = np.lexsort((self.ids[matched], -scores[matched]))[:n]
        return [(int(self.ids[i]), float(scores[i])) for i in matched[order]]


def build_bm25_index(generation: str, chunk_ids: np.ndarray, rows: Iterable[tuple[str, int, str, str]]) -> Bm25Index:
    """The in-memory index from ``POSTINGS_SQL``'s rows over the chunks ``chunk_ids`` (all rows of the FTS5 table)."""
    terms: dict[str, int] = {}
    counts, doc_parts, col_parts = [], [], []
    for term, count, docs, cols in rows:
        terms[term] = len(counts)
        counts.append(count)
        doc_parts.append(docs)
        col_parts.append(cols)
    ids = np.sort(np.asarray(chunk_ids, dtype=np.int64))
    if not counts or not len(ids):
        return Bm25Index(generation, ids, np.zeros(len(ids)), terms, np.zeros(len(counts) + 1, np.int64),
                         np.zeros(0, np.int32), np.zeros(0, np.float32))
    counts = np.asarray(counts, dtype=np.int64)
    inst_doc = np.fromstring(",".join(doc_parts), dtype=np.int64, sep=",")  # no 9M Python strings on the way
    del doc_parts
    inst_col = np.frombuffer("".join(col_parts).encode("ascii"), dtype=np.uint8) - ord("0")
    if len(inst_doc) != len(inst_col) or len(inst_doc) != sum(counts) or inst_col.max() >= len(COLUMNS):
        raise OnecardError("internal: the FTS5 postings read back inconsistent; rebuild the index with: onecard rag index")
    lut = np.full(int(max(ids.max(), inst_doc.max())) + 1, -1, dtype=np.int32)
    lut[ids] = np.arange(len(ids), dtype=np.int32)
    pos = lut[inst_doc]
    del inst_doc, lut
    if (pos < 0).any():
        raise OnecardError("internal: the FTS5 index holds chunks missing from the chunks table; "
                           "rebuild the index with: onecard rag index")
    term_starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=term_starts[1:])
    back = np.diff(pos) < 0
    back[term_starts[1:] - 1] = False
    if back.any():  # fts5vocab yields term, then rowid order; sort if a SQLite version does not
        order = np.lexsort((pos, np.repeat(np.arange(len(counts)), counts)))
        pos, inst_col = pos[order], inst_col[order]
    del back
    new_run = np.empty(len(pos), dtype=bool)  # a posting starts at each new (term, chunk)
    new_run[0] = True
    np.not_equal(pos[1:], pos[:-1], out=new_run[1:])
    new_run[term_starts] = True
    starts = np.flatnonzero(new_run)
    del new_run
    freqs = np.add.reduceat(np.asarray(COLUMN_WEIGHTS, dtype=np.float32)[inst_col], starts)  # small sums: exact
    offsets = np.append(np.searchsorted(starts, term_starts), len(starts)).astype(np.int64)
    length = np.bincount(pos, minlength=len(ids)).astype(np.float64)  # |d|: tokens in all columns
    avgdl = float(len(pos)) / float(len(ids))
    norm = K1 * ((1.0 - B) + (B * length) / avgdl)
    return Bm25Index(generation, ids, norm, terms, offsets, pos[starts], freqs)
