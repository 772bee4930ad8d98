"""``onecard generate`` CLI on a random checkpoint (CPU)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from onecard.cli import app


pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_json_and_file(random_checkpoint, tmp_path):
    path = random_checkpoint("llama-2-7b")
    f = tmp_path / "prompts.txt"
    f.write_text("def f():\\n    return\n\nimport os\n")
    res = CliRunner().invoke(app, ["generate", str(path), "class A:", "--file", str(f), "--max-tokens", "5",
                                   "--max-model-len", "64", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["class A:", "def f():\n    return", "import os"]
    assert all(r["completion_tokens"] <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)


def test_generate_with_a_json_schema_or_regex(random_checkpoint, tmp_path, monkeypatch, capsys):
    pytest.importorskip("xgrammar")
    path = random_checkpoint("llama-2-7b")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                  "additionalProperties": False}))
    res = CliRunner().invoke(app, ["generate", str(path), "x", "--json-schema", str(schema), "--max-tokens", "40",
                                   "--max-model-len", "64", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(json.loads(res.output)["text"]) in ({"ok": True}, {"ok": False})
    res = CliRunner().invoke(app, ["generate", str(path), "x", "--regex", "[0-9]{4}", "--max-tokens", "10",
                                   "--max-model-len", "64", "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)["text"]) == 4 and json.loads(res.output)["text"].isdigit()
    schema.write_text("{not json")
    code, _, err = _run_main(monkeypatch, capsys, ["generate", str(path), "x", "--json-schema", str(schema)])
    assert code == 2 and "is not JSON" in err and len(err.strip().splitlines()) == 1


def _run_main(monkeypatch, capsys, argv):
    import sys

    import pytest

    from onecard import cli

    monkeypatch.setattr(sys, "argv", ["onecard", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_generate_bad_input_is_one_line_exit_2(random_checkpoint, monkeypatch, capsys):
    path = random_checkpoint("llama-2-7b")
    code, _, err = _run_main(monkeypatch, capsys, ["generate", str(path), "x", "--top-p", "0", "--max-model-len", "64"])
    assert code == 2 and "top_p" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run_main(monkeypatch, capsys, ["generate", str(path)])
    assert code == 2 and "no prompt" in err
