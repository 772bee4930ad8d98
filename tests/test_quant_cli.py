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


def _invoke(*args: str):
    """In-process (no interpreter start-up): the typed error the CLI would print as one line."""
    from typer.testing import CliRunner

    from onecard.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args,message", [
    (["--bits", "3"], "--bits 3 is not supported"),
    (["--group-size", "100"], "--group-size 100 is not supported"),
    (["--method", "awq", "--bits", "8"], "AWQ"),
    (["--method", "fp8", "--bits", "4"], "fp8 stores e4m3 weights"),
])
def test_cli_bad_input(random_checkpoint, tmp_path, args, message):
    from onecard.errors import BadInputError

    res = _invoke("quantize", str(random_checkpoint("llama-2-7b")), "--out", str(tmp_path / "o"), *args)
    assert isinstance(res.exception, BadInputError) and message in str(res.exception)
    assert not (tmp_path / "o").exists()


def test_cli_error_is_one_line_exit_2(random_checkpoint, tmp_path):
    r = _run("quantize", str(random_checkpoint("llama-2-7b")), "--out", str(tmp_path / "o"), "--bits", "3")
    assert r.returncode == 2
    assert "--bits 3 is not supported" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_refuses_non_empty_out_and_requantizing(rtn_dir, random_checkpoint, tmp_path):
    res = _invoke("quantize", str(random_checkpoint("llama-2-7b")), "--method", "rtn", "--out", str(rtn_dir))
    assert "--overwrite" in str(res.exception)
    res = _invoke("quantize", str(rtn_dir), "--method", "rtn", "--out", str(tmp_path / "again"))
    assert "already quantized" in str(res.exception)


def test_cli_eval_rejects_missing_data_and_long_context(rtn_dir, tmp_path):
    res = _invoke("eval", "ppl", str(rtn_dir), "--data", str(tmp_path / "nope.txt"))
    assert "is not a file" in str(res.exception)
    data = tmp_path / "t.txt"
    data.write_text("x = 1\n" * 10)
    res = _invoke("eval", "ppl", str(rtn_dir), "--data", str(data), "--context", "100000")
    assert "max_position_embeddings" in str(res.exception)


def test_cli_quantize_fp8_writes_compressed_tensors_that_load_as_on_the_fly_fp8(random_checkpoint, tmp_path):
    """--method fp8 (bits and group size default to 8 and -1): the folder loads into exactly the model that
    quantization='fp8' builds from the source on the fly (fp32 source: scales stored in fp32)."""
    import torch

    from onecard.quant import load_quantized_model, load_rtn_model

    src = random_checkpoint("llama-2-7b")
    res = _invoke("quantize", str(src), "--method", "fp8", "--out", str(tmp_path / "f8"))
    assert res.exit_code == 0, res.output
    assert "compressed-tensors fp8" in res.output
    qc = json.loads((tmp_path / "f8" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    ours, fly = load_quantized_model(tmp_path / "f8", torch.float32, "cpu"), load_rtn_model(src, "fp8", torch.float32,
                                                                                           "cpu")
    ids = torch.arange(3, 30)
    assert torch.equal(ours.logits(ids), fly.logits(ids))
