"""Model folders: HF and onecard both load every fixture architecture; every bad folder is one clear line.

Library: ``open_model_folder`` raises the typed error. CLI: ``onecard inspect`` (through the real
``onecard.cli.main``) prints exactly one ``error:`` line, no traceback, and exits 2.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

from onecard.errors import ModelFolderError, OnecardError, UnsupportedModelError
from onecard.models import SUPPORTED_ARCHITECTURES, open_model_folder
from onecard.testing import make_random_checkpoint

ARCHS = ["llama-2-7b", "llama-3-8b", "llama-3.1-8b", "mistral-7b", "qwen2-7b", "qwen2-0.5b"]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_and_onecard_load_each_fixture_architecture(arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_random_checkpoint(arch, "tiny")
    folder = open_model_folder(path)
    args = folder.model_args()
    assert folder.architecture in SUPPORTED_ARCHITECTURES and folder.has_tokenizer
    assert folder.weight_dtype() == "float32" and len(folder.weight_files) == 1

    model = AutoModelForCausalLM.from_pretrained(str(path))
    hf_params = sum(p.numel() for p in model.parameters())
    assert hf_params == args.num_parameters()
    stored = sum(t.numel() for _, t in folder.iter_tensors())
    assert stored == hf_params  # tied embeddings (qwen2-0.5b) are stored once
    assert args.tie_word_embeddings is (arch == "qwen2-0.5b")
    assert model.config.num_key_value_heads == args.num_kv_heads < args.num_heads or arch == "llama-2-7b"

    tok = AutoTokenizer.from_pretrained(str(path))
    assert type(folder.load_tokenizer()) is type(tok)
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    assert int(ids.max()) < args.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], args.vocab_size) and torch.isfinite(logits).all()


def test_llama31_rope_scaling_survives_the_folder():
    args = open_model_folder(make_random_checkpoint("llama-3.1-8b", "tiny")).model_args()
    assert args.rope_scaling["rope_type"] == "llama3" and args.rope_scaling["factor"] == 8.0
    assert args.rope_theta == 500000.0


@pytest.fixture(scope="module")
def good_folder() -> Path:
    return make_random_checkpoint("llama-2-7b", "tiny")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def sharded_folder(good_folder, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "model"
    model = AutoModelForCausalLM.from_pretrained(str(good_folder))
    model.save_pretrained(str(out), max_shard_size="400KB")
    cfg = json.loads((good_folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(good_folder / f, out / f)
    return out


def test_sharded_checkpoint_loads_in_hf_and_onecard(sharded_folder, good_folder):
    from transformers import AutoModelForCausalLM

    assert (sharded_folder / "model.safetensors.index.json").exists()
    folder = open_model_folder(sharded_folder)
    assert len(folder.weight_files) >= 3
    assert set(folder.tensors) == set(open_model_folder(good_folder).tensors)
    hf = AutoModelForCausalLM.from_pretrained(str(sharded_folder))
    assert sum(p.numel() for p in hf.parameters()) == folder.model_args().num_parameters()
    summary = folder.summary()
    assert summary["shards"] == len(folder.weight_files) and summary["parameters"] == summary["stored_elements"]


# ---- every bad folder: (builder(tmp, good, sharded) -> path argument, error class, words the message must hold)

def _missing_folder(tmp, good, sharded):
    return str(tmp / "no-such-model")


def _hub_id(tmp, good, sharded):
    return "meta-llama/Llama-2-7b-hf"


def _a_file(tmp, good, sharded):
    return str(_copy(good, tmp / "m") / "config.json")


def _gguf_file(tmp, good, sharded):
    f = tmp / "llama-2-7b.Q4_K_M.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    return str(f)


def _gguf_folder(tmp, good, sharded):
    d = tmp / "ggufdir"
    d.mkdir()
    shutil.copy(good / "config.json", d / "config.json")
    (d / "model.Q4_K_M.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    return str(d)


def _missing_config(tmp, good, sharded):
    d = _copy(good, tmp / "m")
    (d / "config.json").unlink()
    return str(d)


def _invalid_json(tmp, good, sharded):
    d = _copy(good, tmp / "m")
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    return str(d)


def _edit_config(tmp, good, **changes):
    d = _copy(good, tmp / "m")
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _unsupported_arch(tmp, good, sharded):
    return _edit_config(tmp, good, architectures=["GPT2LMHeadModel"], model_type="gpt2")


def _no_architectures(tmp, good, sharded):
    return _edit_config(tmp, good, architectures=None)


def _config_lacks_hidden_size(tmp, good, sharded):
    return _edit_config(tmp, good, hidden_size=None)


def _config_from_other_model(tmp, good, sharded):
    return _edit_config(tmp, good, num_hidden_layers=3)


def _no_safetensors(tmp, good, sharded):
    d = _copy(good, tmp / "m")
    (d / "model.safetensors").unlink()
    return str(d)


def _only_bin(tmp, good, sharded):
    d = _copy(good, tmp / "m")
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    return str(d)


def _missing_shard(tmp, good, sharded):
    d = _copy(sharded, tmp / "m")
    sorted(d.glob("model-*.safetensors"))[1].unlink()
    return str(d)


def _index_shard_mismatch(tmp, good, sharded):
    d = _copy(sharded, tmp / "m")
    shards = sorted(d.glob("model-*.safetensors"))
    shutil.copy(shards[0], shards[1])  # a stale/swapped shard: right name, wrong tensors
    return str(d)


def _corrupt_header_length(tmp, good, sharded):
    d = _copy(good, tmp / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = b"\xff" * 8
    f.write_bytes(bytes(data))
    return str(d)


def _corrupt_header_json(tmp, good, sharded):
    d = _copy(good, tmp / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#not-json###"
    f.write_bytes(bytes(data))
    return str(d)


def _truncated_shard(tmp, good, sharded):
    d = _copy(good, tmp / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return str(d)


def _dtype_mismatch(tmp, good, sharded):
    d = _copy(make_random_checkpoint("llama-2-7b", "tiny", dtype="float16"), tmp / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _integer_weights(tmp, good, sharded):
    from safetensors.torch import load_file, save_file

    d = _copy(good, tmp / "m")
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def _tokenizer_missing(tmp, good, sharded):
    d = _copy(good, tmp / "m")
    (d / "tokenizer.json").unlink()
    return str(d)


BAD = [
    (_missing_folder, ModelFolderError, ["does not exist"]),
    (_hub_id, ModelFolderError, ["hub id", "huggingface-cli download meta-llama/Llama-2-7b-hf"]),
    (_a_file, ModelFolderError, ["is a file", "config.json"]),
    (_gguf_file, UnsupportedModelError, ["GGUF", "safetensors"]),
    (_gguf_folder, UnsupportedModelError, ["GGUF", "safetensors"]),
    (_missing_config, ModelFolderError, ["no config.json"]),
    (_invalid_json, ModelFolderError, ["not valid JSON"]),
    (_unsupported_arch, UnsupportedModelError, ["GPT2LMHeadModel", *SUPPORTED_ARCHITECTURES]),
    (_no_architectures, ModelFolderError, ["architectures", "LlamaForCausalLM"]),
    (_config_lacks_hidden_size, ModelFolderError, ["hidden_size"]),
    (_config_from_other_model, ModelFolderError, ["3 layers", "hold 2"]),
    (_no_safetensors, ModelFolderError, ["no *.safetensors"]),
    (_only_bin, ModelFolderError, [".bin", "save_pretrained"]),
    (_missing_shard, ModelFolderError, ["missing", "of"]),
    (_index_shard_mismatch, ModelFolderError, ["does not hold", "download them again"]),
    (_corrupt_header_length, ModelFolderError, ["corrupt", "model.safetensors"]),
    (_corrupt_header_json, ModelFolderError, ["corrupt", "model.safetensors"]),
    (_truncated_shard, ModelFolderError, ["truncated", "model.safetensors"]),
    (_dtype_mismatch, ModelFolderError, ["torch_dtype=bfloat16", "float16"]),
    (_integer_weights, ModelFolderError, ["integer weights", "quantization_config"]),
    (_tokenizer_missing, ModelFolderError, ["no tokenizer", "tokenizer.json"]),
]
IDS = [b[0].__name__.lstrip("_") for b in BAD]


@pytest.mark.parametrize("build,error,words", BAD, ids=IDS)
def test_bad_folder_gives_its_one_line_error(build, error, words, tmp_path, good_folder, sharded_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arg = build(tmp_path, good_folder, sharded_folder)
    with pytest.raises(error) as exc:
        open_model_folder(arg)
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 400, msg
    for w in words:
        assert w in msg, (w, msg)


def _cli_app():
    """The real app if the lead has registered ``inspect``, else the real app's error handling around it."""
    typer = pytest.importorskip("typer")

    import onecard.cli as cli
    from onecard.commands import inspect

    if any(c.name == "inspect" for c in cli.app.registered_commands):
        return cli.app
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)

    @app.callback()
    def _root() -> None:
        pass

    inspect.register(app)
    return app


@pytest.mark.parametrize("build,error,words", BAD, ids=IDS)
def test_cli_prints_one_line_and_exits_2(build, error, words, tmp_path, good_folder, sharded_folder, monkeypatch,
                                         capsys):
    import onecard.cli as cli

    monkeypatch.chdir(tmp_path)
    arg = build(tmp_path, good_folder, sharded_folder)
    monkeypatch.setattr(cli, "app", _cli_app())
    monkeypatch.setattr(sys, "argv", ["onecard", "inspect", arg])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    assert exc.value.code == 2
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out and words[0] in lines[0]


def test_cli_inspect_good_folder(good_folder, monkeypatch, capsys):
    import onecard.cli as cli

    monkeypatch.setattr(cli, "app", _cli_app())
    monkeypatch.setattr(sys, "argv", ["onecard", "inspect", str(good_folder), "--json"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "LlamaForCausalLM" and data["weight_dtype"] == "float32"
    assert data["parameters"] == data["stored_elements"] > 0 and data["tokenizer"] == ["tokenizer.json"]


def test_folder_errors_are_onecard_errors():
    assert issubclass(ModelFolderError, OnecardError) and issubclass(UnsupportedModelError, OnecardError)


def test_header_parser_rejects_short_file(tmp_path, good_folder):
    d = _copy(good_folder, tmp_path / "m")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10)[:5])
    with pytest.raises(ModelFolderError, match="corrupt"):
        open_model_folder(d)
