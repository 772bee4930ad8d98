"""CLI commands (index/search/ask/eval) and the packaged evaluation set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onecard.cli import app
from onecard.errors import BadInputError
from onecard.rag.evalset import QUESTIONS_FILE, STDLIB_FILES, locate
from onecard.rag.evaluate import (
    Target,
    evaluate_retrieval,
    first_relevant_rank,
    load_questions,
)

runner = CliRunner(env={"COLUMNS": "300"})


def test_packaged_question_set_is_sound():
    lines = [json.loads(x) for x in QUESTIONS_FILE.read_text().splitlines()]
    assert len(lines) >= 100
    assert len({q["question"] for q in lines}) == len(lines), "questions are distinct"
    assert all(q["file"] in STDLIB_FILES and q["question"].endswith("?") for q in lines)
    targets, missing = load_questions(QUESTIONS_FILE)
    assert len(targets) >= 100 and len(missing) <= len(lines) // 10
    p = locate("json/decoder.py", "JSONDecoder.decode")
    text = (Path(__import__("sysconfig").get_paths()["stdlib"]) / p.file).read_text()
    assert text[p.start:p.end].lstrip().startswith("def decode(self") and '"""' in text[p.start:p.end]


def test_bad_question_files(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_questions(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(BadInputError, match="locate"):
        load_questions(tmp_path / "bad.jsonl")


def test_cli_index_search_ask_and_eval(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "router.md").write_text("# Router\n\nError code ZX-4471 means the DSL line has no sync; call the provider.\n")
    (docs / "bread.md").write_text("# Bread\n\nKnead the dough for ten minutes and bake at 220 C.\n")
    (docs / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    db = tmp_path / "kb.sqlite"
    res = runner.invoke(app, ["rag", "index", str(docs), "--db", str(db)])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "2 added" in flat and "photo.png: unsupported file type" in flat
    res = runner.invoke(app, ["rag", "search", "ZX-4471", "--db", str(db), "--mode", "bm25", "--json", "--k", "1"])
    assert res.exit_code == 0, res.output
    hit = json.loads(res.output)["hits"][0]
    assert hit["source"].endswith("router.md") and hit["heading"] == "Router" and hit["bm25"] > 0
    res = runner.invoke(app, ["rag", "ask", "ZX-4471?", "--db", str(db)])
    assert isinstance(res.exception, BadInputError) and "--model" in str(res.exception)
    res = runner.invoke(app, ["rag", "index", str(tmp_path / "nope"), "--db", str(db)])
    assert isinstance(res.exception, BadInputError)
    # eval on a custom question file with explicit spans
    text = (docs / "router.md").read_text()
    start = text.index("Error code")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question": "what does ZX-4471 mean?", "source": "router.md", "start": start,
                                 "end": start + 30}) + "\n")
    out = tmp_path / "scores.json"
    res = runner.invoke(app, ["rag", "eval", "--db", str(db), "--questions", str(qfile), "--out", str(out)])
    assert res.exit_code == 0, res.output
    scores = json.loads(out.read_text())
    assert scores["bm25_recall_at_1"] == 1.0 and scores["hybrid_recall_at_5"] == 1.0 and scores["questions"] == 1
    assert {"command", "date", "cpu"} <= scores.keys()


def test_eval_metrics_on_a_real_stdlib_slice(tmp_path):
    from onecard.rag.evalset import stdlib_root
    from onecard.rag.indexer import index_directory

    db = tmp_path / "slice.sqlite"
    index_directory(stdlib_root(), db, include=["bisect.py", "json/decoder.py"], exclude=["site-packages/*", "test/*"])
    targets, _ = load_questions(QUESTIONS_FILE)
    sub = [t for t in targets if t.source_suffix in ("/bisect.py", "/json/decoder.py")]
    assert sub
    scores = evaluate_retrieval(db, sub, ks=(1, 5))
    for s in scores.values():
        assert 0.0 <= s.recall[1] <= s.recall[5] <= 1.0 and 0.0 <= s.mrr <= 1.0
        # mrr is consistent with the ranks it came from
        assert s.mrr == pytest.approx(sum(1 / r for r in s.ranks if r) / len(sub))
    assert scores["bm25"].recall[5] >= 0.5, "template questions share words with their docstring"
    # a question about a file that is not indexed never counts as found
    fake = Target("q", "/not_indexed.py", 0, 10)
    assert first_relevant_rank([], fake) is None
