"""``onecard quantize`` and ``onecard eval ppl`` through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onecard.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def rtn_dir(random_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "rtn4"
    r = _run("quantize", str(random_checkpoint("llama-2-7b")), "--method", "rtn", "--bits", "4", "--group-size", "32",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "GPTQ layout" in r.stdout
    return out


def test_cli_quantize_writes_folder(rtn_dir):
    qc = json.loads((rtn_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32


def test_cli_eval_ppl_prints_protocol(rtn_dir, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("def add(a, b):\n    return a + b\n" * 40)
    r = _run("eval", "ppl", str(rtn_dir), "--data", str(data), "--context", "64", "--stride", "32")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "context 64, stride 32" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--bits", "3"], "--bits 3 is not supported"),
    (["--group-size", "100"], "--group-size 100 is not supported"),
    (["--method", "awq", "--bits", "8"], "AWQ"),
])
def test_cli_bad_input_is_one_line(random_checkpoint, tmp_path, args, message):
    r = _run("quantize", str(random_checkpoint("llama-2-7b")), "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_refuses_non_empty_out_and_requantizing(rtn_dir, random_checkpoint, tmp_path):
    r = _run("quantize", str(random_checkpoint("llama-2-7b")), "--method", "rtn", "--out", str(rtn_dir))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = _run("quantize", str(rtn_dir), "--method", "rtn", "--out", str(tmp_path / "again"))
    assert r.returncode == 2 and "already quantized" in r.stderr


def test_cli_eval_rejects_missing_data_and_long_context(rtn_dir, tmp_path):
    r = _run("eval", "ppl", str(rtn_dir), "--data", str(tmp_path / "nope.txt"))
    assert r.returncode == 2 and "is not a file" in r.stderr
    data = tmp_path / "t.txt"
    data.write_text("x = 1\n" * 10)
    r = _run("eval", "ppl", str(rtn_dir), "--data", str(data), "--context", "100000")
    assert r.returncode == 2 and "max_position_embeddings" in r.stderr
