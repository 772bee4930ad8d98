"""Splitter invariants: exact offsets, full coverage, size limit, bounded overlap, heading paths."""

from __future__ import annotations

import random

import pytest

from onecard.errors import BadInputError
from onecard.rag.loaders import Document
from onecard.rag.splitter import SplitConfig, split_document


def _random_markdown(seed: int) -> str:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    parts = []
    for s in range(rng.randint(2, 5)):
        parts.append(f"{'#' * rng.randint(1, 3)} Section {s}\n")
        for _ in range(rng.randint(1, 6)):
            sents = [" ".join(rng.choices(words, k=rng.randint(3, 40))).capitalize() + "." for _ in range(rng.randint(1, 12))]
            parts.append(" ".join(sents) + "\n")
        if rng.random() < 0.3:
            parts.append("x" * rng.randint(100, 900) + "\n")  # a long unbreakable token
    return "\n".join(parts)


def _check(doc: Document, cfg: SplitConfig):
    chunks = split_document(doc, cfg)
    covered = [False] * len(doc.text)
    for c in chunks:
        assert doc.text[c.start:c.end] == c.text, "offsets must point at the chunk's exact text"
        assert len(c.text) <= cfg.chunk_size
        for i in range(c.start, c.end):
            covered[i] = True
    missed = [i for i, ch in enumerate(doc.text) if not ch.isspace() and not covered[i]]
    assert not missed, f"characters not in any chunk: {missed[:10]}"
    for a, b in zip(chunks, chunks[1:]):
        assert b.start > a.start, "chunks advance"
        assert max(0, a.end - b.start) <= cfg.chunk_overlap, "overlap bounded by chunk_overlap"
    return chunks


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("size,overlap", [(1000, 200), (300, 50), (120, 0)])
def test_invariants_on_random_markdown(seed, size, overlap):
    _check(Document("/x.md", _random_markdown(seed), "markdown"), SplitConfig(size, overlap))


def test_long_paragraph_gets_overlap_at_sentence_boundaries():
    text = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(120))
    chunks = _check(Document("/p.txt", text, "text"), SplitConfig(400, 100))
    assert len(chunks) > 5
    overlaps = [a.end - b.start for a, b in zip(chunks, chunks[1:])]
    assert all(0 < o <= 100 for o in overlaps), overlaps
    assert all(c.text.endswith(".") for c in chunks), "cut at sentence ends, not mid-sentence"


def test_heading_paths_markdown_and_code():
    md = "# Guide\n\nintro\n\n## Install\n\nstep one\n\n### Linux\n\napt install\n\n## Usage\n\nrun it\n\n```\n# not a heading\n```\n"
    chunks = split_document(Document("/g.md", md, "markdown"), SplitConfig(100, 0))
    by_text = {c.text.splitlines()[-1]: c.heading for c in chunks}
    assert by_text["apt install"] == "Guide > Install > Linux"
    assert by_text["```"] == "Guide > Usage", "a # line inside a code fence is not a heading"
    code = "import os\n\nclass Box:\n    def open(self):\n        return 1\n\n    def close(self):\n        return 2\n\ndef helper():\n    pass\n"
    chunks = split_document(Document("/b.py", code, "code"), SplitConfig(40, 0))
    heads = [c.heading for c in chunks]
    assert "class Box > def close" in heads and heads[-1] == "def helper"


def test_token_unit_uses_the_given_length():
    text = " ".join(["word"] * 500)
    chunks = split_document(Document("/t.txt", text, "text"), SplitConfig(50, 10, unit="tokens"),
                            token_length=lambda s: len(s.split()))
    assert all(len(c.text.split()) <= 50 for c in chunks)
    assert len(chunks) >= 10
    with pytest.raises(BadInputError, match="token_length"):
        split_document(Document("/t.txt", text, "text"), SplitConfig(50, 10, unit="tokens"))


@pytest.mark.parametrize("kwargs", [dict(chunk_size=8), dict(chunk_overlap=1000), dict(chunk_overlap=-1), dict(unit="pages")])
def test_bad_config(kwargs):
    with pytest.raises(BadInputError):
        SplitConfig(**kwargs)
