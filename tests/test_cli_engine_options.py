"""``onecard generate`` / ``onecard serve``: every engine option reaches EngineConfig through one flag table.

The options are checked where users meet them: typer's parser (CliRunner), the
engine they build (the tiny random model on CPU), the real server's
``/v1/models`` and ``/metrics``, and ``onecard``'s main (exit 2, one line, for
the engine's own errors on bad combinations).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from typer.testing import CliRunner

from onecard.cli import app
from onecard.commands.engine_options import ENGINE_FLAGS
from onecard.engine.config import EngineConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# EngineConfig fields deliberately without a flag (engine_options.py says why).
INTERNAL = {"model", "seed", "num_kv_blocks", "cuda_graph_max_batch", "fused_rope_store", "fused_prefill_rope",
            "fused_decode_attention", "programmatic_launch"}
ARGS = ["--device", "cpu", "--max-model-len", "64", "--max-tokens", "12", "--json"]


@pytest.fixture(scope="module")
def model_dir(random_checkpoint):
    return str(random_checkpoint("llama-2-7b"))


def test_every_engine_field_has_a_flag_or_is_internal():
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    flagged = [f.field for f in ENGINE_FLAGS]
    assert len(flagged) == len(set(flagged)) and set(flagged) <= fields
    assert fields - set(flagged) == INTERNAL


@pytest.fixture
def built(monkeypatch):
    """The EngineConfig of every LLM the command builds (the real engine still runs)."""
    import onecard.engine as engine_pkg

    configs = []

    class Recording(engine_pkg.LLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            configs.append(self.config)

    monkeypatch.setattr(engine_pkg, "LLM", Recording)
    return configs


def generate(model_dir: str, *extra: str) -> list[dict]:
    res = CliRunner().invoke(app, ["generate", model_dir, "def f(x):\n    return x", *ARGS, *extra])
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]  # not the log lines


def test_generate_options_reach_the_engine_and_speculation_keeps_greedy_output(model_dir, built):
    plain = generate(model_dir)
    spec = generate(model_dir, "--num-speculative-tokens", "3", "--ngram-size", "2", "--kv-cache-dtype", "auto",
                    "--no-enable-prefix-caching", "--max-num-seqs", "4", "--block-size", "8", "--enforce-eager",
                    "--no-enable-chunked-prefill", "--offload-layers", "0")
    assert spec[0]["text"] == plain[0]["text"] and spec[0]["completion_tokens"] == plain[0]["completion_tokens"]
    c = built[-1]
    assert (c.num_speculative_tokens, c.ngram_size, c.enable_prefix_caching, c.max_num_seqs, c.block_size,
            c.enforce_eager, c.enable_chunked_prefill, c.device, c.max_model_len) == (3, 2, False, 4, 8, True, False,
                                                                                     "cpu", 64)
    assert built[0].num_speculative_tokens == 0 and built[0].enable_prefix_caching  # defaults are EngineConfig's
    generate(model_dir, "--kv-cache-dtype", "int8", "--offload-layers", "auto", "--long-prefill-chunk", "16")
    assert (built[-1].kv_cache_dtype, built[-1].offload_layers, built[-1].long_prefill_chunk) == ("int8", "auto", 16)


def test_generate_with_a_draft_model_keeps_greedy_output(model_dir, built):
    plain = generate(model_dir)
    drafted = generate(model_dir, "--speculative-model", model_dir, "--num-speculative-tokens", "2")
    assert drafted == plain and built[-1].speculative_model == model_dir  # the model drafts for itself: same tokenizer


def run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    from onecard import cli

    monkeypatch.setattr(sys, "argv", ["onecard", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("options, says", [
    (["--speculative-model", "draft"], "needs num_speculative_tokens"),
    (["--no-enable-chunked-prefill", "--long-prefill-chunk", "32"], "only applies with enable_chunked_prefill"),
    (["--kv-cache-dtype", "fp4"], "kv_cache_dtype='fp4'"),
    (["--offload-layers", "some"], "offload_layers='some'"),
    (["--num-speculative-tokens", "99"], "num_speculative_tokens"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["--tp", "0"], "tensor_parallel_size"),
])
def test_bad_combinations_are_the_engines_one_line_errors(model_dir, monkeypatch, capsys, command, options, says):
    argv = [command, model_dir, *(["x"] if command == "generate" else []), "--device", "cpu", *options]
    code, err = run_main(monkeypatch, capsys, argv)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_config_names_unknown_engine_options():
    from onecard.errors import BadInputError
    from onecard.serve.server import ServeConfig

    with pytest.raises(BadInputError, match="'kv_cache_dtyp'.*not EngineConfig options"):
        ServeConfig("m", engine={"kv_cache_dtyp": "int8"})
    assert ServeConfig("m", engine={"kv_cache_dtype": "int8"}).engine == {"kv_cache_dtype": "int8"}
    with pytest.raises(BadInputError, match="--tool-call-parser mistral: choose one of hermes, llama3_json"):
        ServeConfig("m", tool_call_parser="mistral")


def test_llava_folder_refuses_options_it_would_ignore(monkeypatch, capsys):
    from onecard.vision.testing import make_llava_checkpoint

    llava = str(make_llava_checkpoint(image_size=112, init_std=0.2))
    code, err = run_main(monkeypatch, capsys, ["serve", llava, "--kv-cache-dtype", "int8", "--num-speculative-tokens",
                                               "2", "--port", "0"])
    assert code == 2 and "kv_cache_dtype, num_speculative_tokens not supported when serving a LLaVA folder" in err


def test_server_reports_its_options(model_dir):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("openai")
    from onecard.serve.launch import start_server

    args = ("--max-model-len", "96", "--kv-cache-dtype", "int8", "--num-speculative-tokens", "2",
            "--no-enable-prefix-caching", "--max-num-seqs", "8", "--shutdown-timeout", "3")
    with start_server(model_dir, args, cpu=True) as srv:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        r = httpx.post(srv.url + "/v1/completions", json={"model": card["id"], "prompt": "def f(", "max_tokens": 4,
                                                          "temperature": 0}, timeout=60)
        metrics = httpx.get(srv.url + "/metrics").text
    assert r.status_code == 200, r.text
    o = card["options"]
    assert (o["kv_cache_dtype"], o["speculative_method"], o["num_speculative_tokens"], o["enable_prefix_caching"],
            o["max_num_seqs"], o["max_model_len"]) == ("int8", "ngram", 2, False, 8, 96)
    info = next(line for line in metrics.splitlines() if line.startswith("onecard_engine_info{"))
    assert 'kv_cache_dtype="int8"' in info and 'speculative_method="ngram"' in info and info.endswith(" 1.0")
    assert srv.returncode == 0, srv.log_tail()
