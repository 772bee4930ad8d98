"""The fast random-checkpoint writer: same folder as ``save_pretrained`` (keys, shapes, config, files), loads in HF
and in onecard, right kinds of values, correct sharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from onecard.errors import UnsupportedModelError
from onecard.models.folder import open_model_folder
from onecard.testing import make_random_checkpoint
from onecard.testing.checkpoints import fast_random_checkpoint
from onecard.testing.fast_checkpoint import tensor_specs

# qwen2-0.5b ties its embeddings; qwen2-7b does not.
ARCHS = ["llama-2-7b", "qwen2-0.5b", "qwen2-7b", "mistral-7b", "llava-1.5-7b"]


def stored(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return out


def load_hf(path: Path):
    if json.loads((path / "config.json").read_text())["model_type"] == "llava":
        from transformers import LlavaForConditionalGeneration as cls
    else:
        from transformers import AutoModelForCausalLM as cls
    return cls.from_pretrained(str(path), output_loading_info=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_folder_matches_save_pretrained_and_loads(arch, tmp_path):
    ref = make_random_checkpoint(arch, "tiny")
    fast = fast_random_checkpoint(arch, "tiny", tmp_path / arch, dtype="float32")
    assert sorted(p.name for p in fast.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert json.loads((fast / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    a, b = stored(ref), stored(fast)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(v.dtype == torch.float32 for v in b.values())

    _, info = load_hf(fast)  # nothing missing means nothing "newly initialized"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    for name, t in b.items():
        if name.endswith("norm.weight") or ("layer_norm" in name or "layrnorm" in name) and name.endswith(".weight"):
            assert torch.all(t == 1), name
        elif name.endswith(".bias"):
            assert torch.all(t == 0), name
        elif t.numel() >= 1000:  # weights and embeddings: normal(0, initializer_range)
            assert 0.015 < t.std().item() < 0.025 and abs(t.mean().item()) < 0.005, name
    if arch == "llava-1.5-7b":
        from onecard.vision.loader import open_llava_folder
        from onecard.vision.testing import add_processor_files, llava_tiny_config

        cfg = llava_tiny_config(arch)  # onecard's LLaVA folders also need the processor files and <image> in the vocab
        keep = ("image_token_index", "text_config", "vision_config", "image_seq_length")
        folder = fast_random_checkpoint(arch, "tiny", tmp_path / "vision", dtype="float32",
                                        overrides={k: v for k, v in cfg.items() if k in keep})
        add_processor_files(folder, cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"],
                            cfg["image_token_index"])
        assert set(open_llava_folder(folder).folder.tensors) == set(b)
    else:
        from onecard.models.loader import load_model

        folder = open_model_folder(fast)
        model = load_model(folder, torch.float32, "cpu")  # raises on any missing weight
        assert sum(p.numel() for p in model.parameters()) >= folder.model_args().num_parameters() > 0


def test_tiny_shard_limit_writes_an_index(tmp_path):
    path = fast_random_checkpoint("llama-2-7b", "tiny", tmp_path / "s", dtype="bfloat16", shard_bytes=64 * 1024)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = stored(path)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for fname in shards:
        with safe_open(str(path / fname), "pt") as h:
            keys = list(h.keys())
            assert all(index["weight_map"][k] == fname for k in keys)
            nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
            assert nbytes <= 64 * 1024 or len(keys) == 1  # a tensor over the limit sits alone
    _, info = load_hf(path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert open_model_folder(path).weight_dtype() == "bfloat16"


def test_same_seed_same_weights(tmp_path):
    a = stored(fast_random_checkpoint("llama-2-7b", "tiny", tmp_path / "a", dtype="float32", tokenizer=False))
    b = stored(fast_random_checkpoint("llama-2-7b", "tiny", tmp_path / "b", dtype="float32", tokenizer=False))
    c = stored(fast_random_checkpoint("llama-2-7b", "tiny", tmp_path / "c", dtype="float32", tokenizer=False, seed=1))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_persistent_buffer_is_refused():
    m = torch.nn.Linear(2, 2)
    m.register_buffer("table", torch.zeros(3))
    with pytest.raises(UnsupportedModelError, match="persistent buffer 'table'"):
        tensor_specs(m)
