"""Answering: context budget, and a real end-to-end answer from the tiny model through onecard's engine."""

from __future__ import annotations

from pathlib import Path

from onecard.rag.answer import ask, build_prompt, fit_passages
from onecard.rag.indexer import index_directory
from onecard.rag.splitter import Chunk
from onecard.rag.store import Hit


def _hit(i: int, text: str) -> Hit:
    return Hit(i, Chunk(f"/d/{i}.md", text, 0, len(text), "H"), 1.0 / (60 + i), 0.5)


def test_fit_passages_drops_lowest_ranked_then_shortens():
    hits = [_hit(i, "word " * 100) for i in range(1, 5)]
    count = lambda s: len(s.split())
    fitted = fit_passages("q?", hits, count, budget=250)
    assert [h.id for h in fitted] == [1, 2] and count(build_prompt("q?", fitted)) <= 250
    one = fit_passages("q?", hits, count, budget=80)
    assert [h.id for h in one] == [1] and count(build_prompt("q?", one)) <= 80
    assert one[0].chunk.end - one[0].chunk.start == len(one[0].chunk.text) < len(hits[0].chunk.text)


def test_ask_with_the_tiny_model_end_to_end(tiny_model, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "pump.md").write_text("# Pump\n\nThe water pump must be primed before the first start. Open the bleed "
                                  "valve until water flows, then close it.\n\n# Filter\n\nClean the filter monthly.\n")
    (docs / "manual.md").write_text("# Warranty\n\nThe warranty lasts two years from the date of purchase.\n")
    db = tmp_path / "kb.sqlite"
    index_directory(docs, db)
    ans = ask("How do I prime the water pump before the first start?", db, model=str(tiny_model.path), k=3,
              max_tokens=16)
    assert not ans.unknown and ans.best_similarity >= 0.35
    assert Path(ans.context[0].source).name == "pump.md" and ans.context[0].heading == "Pump"
    assert "[1] (pump.md, section: Pump)" in ans.prompt
    from onecard.rag.answer import EngineWriter

    # the answer is the model's own greedy continuation of that prompt (a 5M model may write only whitespace)
    assert ans.text == EngineWriter(tiny_model.path)(ans.prompt, max_tokens=16)
    # whatever the weak model wrote, every citation we report maps to a retrieved passage
    assert all(1 <= c.n <= len(ans.chunks) for c in ans.citations)
