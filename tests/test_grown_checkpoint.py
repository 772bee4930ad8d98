"""grow_checkpoint: a trained model grown to more layers and a larger vocabulary computes exactly what it did."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from onecard.engine import LLM, SamplingParams
from onecard.errors import BadInputError
from onecard.testing.grown import grow_checkpoint, widen_checkpoint


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_grown_model_computes_the_trained_models_logits_and_tokens(tiny_model, tmp_path):
    src = tiny_model.path
    cfg = json.loads((src / "config.json").read_text())
    layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    out = grow_checkpoint(src, tmp_path / "grown", layers + 3, vocab + 100, shard_bytes=256 * 1024)
    grown = json.loads((out / "config.json").read_text())
    assert (grown["num_hidden_layers"], grown["vocab_size"]) == (layers + 3, vocab + 100)
    assert (out / "model.safetensors.index.json").exists()  # sharded: the index path of the loaders is exercised
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    new = f"model.layers.{layers + 2}."
    with safe_open(str(out / index[new + "self_attn.q_proj.weight"]), "pt") as f:
        q = f.get_tensor(new + "self_attn.q_proj.weight")
    with safe_open(str(out / index[new + "mlp.down_proj.weight"]), "pt") as f:
        down = f.get_tensor(new + "mlp.down_proj.weight")
    assert 0.015 < q.std().item() < 0.025 and not down.any()  # the added layer works on real values, adds zero

    ids = list(range(5, 69))
    before, after = _hf_logits(src, ids), _hf_logits(out, ids)
    assert torch.equal(after[:, :vocab], before)  # an added layer adds exactly 0.0 to the residual stream
    assert torch.equal(after[:, vocab:], before[:, :1].expand(-1, 100))  # new rows tie token 0: argmax never picks
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = [LLM(str(f), dtype="float32", device="cpu", max_model_len=128, max_num_seqs=1).generate(
        [ids], params, use_tqdm=False)[0].outputs[0].token_ids for f in (src, out)]
    assert runs[0] == runs[1]


def test_grow_refuses_to_shrink(tiny_model, tmp_path):
    layers = json.loads((tiny_model.path / "config.json").read_text())["num_hidden_layers"]
    with pytest.raises(BadInputError, match="only adds"):
        grow_checkpoint(tiny_model.path, tmp_path / "g", layers - 1)


@pytest.mark.parametrize("arch, kv_heads", [("llama-2-7b", None), ("llama-3-8b", 2)], ids=["mha", "gqa"])
def test_widened_model_computes_the_narrow_models_logits(arch, kv_heads, tmp_path):
    # MHA (the benchmark's copy draft: one query head per KV head, widened into groups of 4) and GQA (2 KV heads:
    # each trained query head must keep its own)
    from onecard.testing import make_random_checkpoint

    src = make_random_checkpoint(arch, "tiny", overrides={"num_key_value_heads": kv_heads} if kv_heads else None)
    cfg = json.loads((src / "config.json").read_text())
    h, H, Hk = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = h // H
    out = widen_checkpoint(src, tmp_path / "wide", 4 * h, 2 * cfg["intermediate_size"] + 8, 4 * H, Hk,
                           shard_bytes=256 * 1024)
    wide = json.loads((out / "config.json").read_text())
    assert (wide["hidden_size"], wide["num_attention_heads"], wide["num_key_value_heads"], wide["head_dim"]) == \
        (4 * h, 4 * H, Hk, D)
    ids = list(range(5, 40))
    before, after = _hf_logits(src, ids), _hf_logits(out, ids)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = [LLM(str(f), dtype="float32", device="cpu", max_model_len=128, max_num_seqs=1).generate(
        [ids], params, use_tqdm=False)[0].outputs[0].token_ids for f in (src, out)]
    assert runs[0] == runs[1]


def test_widen_refuses_a_narrower_or_regrouped_model(random_checkpoint, tmp_path):
    src = random_checkpoint("llama-3-8b")
    cfg = json.loads((src / "config.json").read_text())
    h, i, H, Hk = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    with pytest.raises(BadInputError, match="only adds"):
        widen_checkpoint(src, tmp_path / "w", h // 2, i, H // 2, Hk)
    with pytest.raises(BadInputError, match="only adds"):
        widen_checkpoint(src, tmp_path / "w", 2 * h, i, 2 * H, 2 * Hk * 2)  # fewer query heads per KV head


def test_outlier_channels_change_the_weights_not_the_function(random_checkpoint, tmp_path):
    """Qwen2 (q/k/v biases, which the rescaling must leave alone): the picked channels' norm weights x factor, the
    reading linears' columns / factor, every other tensor as it was, and the logits bit for bit the same."""
    from safetensors.torch import load_file

    from onecard.testing.outliers import with_outlier_channels

    src = random_checkpoint("qwen2-7b")
    out = with_outlier_channels(src, tmp_path / "out", channels=3, factor=8.0, seed=1)
    picked = json.loads((out / "onecard_grown.json").read_text())["outlier_channels"]
    assert len(set(picked)) == 3
    before = {k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    after = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert before.keys() == after.keys()
    scaled = torch.ones(before["model.norm.weight"].shape[0])
    scaled[picked] = 8.0
    for name, w in before.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            expected = w * scaled
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            expected = w / scaled
        else:  # biases, o/down projections, embeddings, the final norm, the head
            expected = w
        assert torch.equal(after[name], expected), name
    ids = list(range(3, 40))
    assert torch.equal(_hf_logits(out, ids), _hf_logits(src, ids))
    with pytest.raises(BadInputError, match="power-of-two"):
        with_outlier_channels(src, tmp_path / "bad", channels=3, factor=10.0)
