"""Our Llama-family forward vs HF transformers, fp32 on CPU (max abs diff < 1e-4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from onecard.errors import ModelFolderError
from onecard.models import open_model_folder
from onecard.models.loader import hf_to_ours, load_model

ARCHS = ["llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen2-7b", "qwen2-0.5b"]


def _logits(path, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ours, HF transformers', the token ids) for ``tokens`` random ids through the folder at ``path``, fp32."""
    from transformers import AutoModelForCausalLM

    folder = open_model_folder(path)
    ours = load_model(folder, torch.float32, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.randint(3, folder.model_args().vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return ours.logits(ids), hf(ids[None]).logits[0], ids


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(arch, random_checkpoint):
    got, ref, _ = _logits(random_checkpoint(arch), 40, 1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_llama3_rope_scaling_is_applied(random_checkpoint):
    from onecard.models.llama import rope_parameters

    args = open_model_folder(random_checkpoint("llama-3.1-8b")).model_args()
    plain = rope_parameters(type(args)(**{**args.__dict__, "rope_scaling": None}))[0]
    assert not torch.allclose(rope_parameters(args)[0], plain)  # low frequencies are divided by the factor


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},  # Qwen2.5's long-context form
    {"rope_type": "dynamic", "factor": 2.0},  # within max_position_embeddings: plain RoPE, in HF too
    {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 48, "beta_fast": 16, "mscale": 0.7,
     "mscale_all_dim": 0.5},
])
def test_scaled_rope_logits_match_hf(scaling, random_checkpoint, tmp_path):
    """YaRN changes both the frequencies and the size of cos/sin: logits equal HF's at positions beyond the
    original context, where the scaling matters; dynamic NTK equals plain RoPE up to max_position_embeddings."""
    path = random_checkpoint("qwen2-0.5b")
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(rope_scaling=scaling, max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    got, ref, ids = _logits(tmp_path, 120, 2)
    assert (got - ref).abs().max().item() < 1e-4
    if scaling.get("rope_type", scaling.get("type")) == "yarn":
        plain = load_model(open_model_folder(path), torch.float32, "cpu")
        assert (plain.logits(ids) - ref).abs().max().item() > 1e-3  # without the scaling they differ


def test_tied_embeddings_share_storage(random_checkpoint):
    model = load_model(open_model_folder(random_checkpoint("qwen2-0.5b")), torch.float32, "cpu")
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert model.layers[0].self_attn.qkv_proj.bias is not None


def test_name_map_fuses_projections():
    assert hf_to_ours("model.layers.3.self_attn.k_proj.weight") == ("layers.3.self_attn.qkv_proj.weight", 1)
    assert hf_to_ours("model.layers.0.mlp.up_proj.qweight") == ("layers.0.mlp.gate_up_proj.qweight", 1)
    assert hf_to_ours("model.norm.weight") == ("norm.weight", None)
    assert hf_to_ours("vision_tower.x") is None


def test_missing_weights_are_an_error(tmp_path, random_checkpoint):
    import shutil

    from safetensors.torch import load_file, save_file

    src = random_checkpoint("llama-2-7b")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match="missing"):
        load_model(open_model_folder(dst), torch.float32, "cpu")


def test_yarn_extends_the_usable_context():
    """Qwen2.5's documented YaRN setting (32k trained, factor 4) serves 128k tokens, as vLLM derives it; a config
    that already states the extended length keeps it."""
    from onecard.models import ModelArgs, arch_config

    cfg = arch_config("qwen2-7b")
    qwen = ModelArgs.from_hf_config({**cfg, "max_position_embeddings": 32768,
                                     "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert qwen.max_position_embeddings == 131072
    assert qwen.rope_scaling["original_max_position_embeddings"] == 32768
    stated = ModelArgs.from_hf_config({**cfg, "max_position_embeddings": 163840, "rope_scaling": {
        "rope_type": "yarn", "original_max_position_embeddings": 4096}})
    assert stated.max_position_embeddings == 163840 and stated.rope_scaling["factor"] == 40.0
