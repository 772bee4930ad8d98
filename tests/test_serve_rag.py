"""POST /v1/rag/ask: retrieval from a real onecard rag index, the answer written by the served engine (fake here)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # the GPU machine lacks the serve extras: skip, don't error
from fastapi.testclient import TestClient  # noqa: E402
from serve_fake_engine import FakeEngine


@pytest.fixture(scope="module")
def rag_db(tmp_path_factory):
    from onecard.rag.indexer import index_directory

    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    docs.mkdir()
    (docs / "pump.md").write_text("# Pump\n\nThe water pump must be primed before the first start. Open the bleed "
                                  "valve until water flows, then close it.\n")
    (docs / "manual.md").write_text("# Warranty\n\nThe warranty lasts two years from the date of purchase.\n")
    db = root / "kb.sqlite"
    index_directory(docs, db)
    return db


@pytest.fixture(scope="module")
def tokenizer(random_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(random_checkpoint("llama-2-7b"))


def test_rag_ask_answers_with_retrieved_context(rag_db, tokenizer):
    from onecard.serve.app import build_app

    engine = FakeEngine(tokenizer, max_model_len=2048)
    with TestClient(build_app(engine, "tiny", gpu_metrics=False, rag_db=rag_db)) as c:
        r = c.post("/v1/rag/ask", json={"question": "How do I prime the water pump?", "k": 2, "max_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "rag.answer" and not body["unknown"] and body["answer"]
        assert Path(body["context"][0]["source"]).name == "pump.md"
        assert all(1 <= cit["n"] <= len(body["context"]) for cit in body["citations"])
        params = engine.seen_params[-1]
        assert (params.temperature, params.max_tokens, params.repetition_penalty) == (0.0, 8, 1.1)
        off = c.post("/v1/rag/ask", json={"question": "quantum chromodynamics of neutron stars", "max_tokens": 8})
        assert off.status_code == 200 and off.json()["unknown"] and len(engine.seen_params) == 1  # no generation
        assert c.post("/v1/rag/ask", json={"question": "x", "k": 0}).status_code == 400
        tight = FakeEngine(tokenizer, max_model_len=16)
        c.app.state.engine = tight
        r = c.post("/v1/rag/ask", json={"question": "How do I prime the water pump?", "max_tokens": 8})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_rag_ask_disabled_without_index(tokenizer):
    from onecard.serve.app import build_app

    with TestClient(build_app(FakeEngine(tokenizer), "tiny", gpu_metrics=False)) as c:
        r = c.post("/v1/rag/ask", json={"question": "anything"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "rag_not_enabled"
