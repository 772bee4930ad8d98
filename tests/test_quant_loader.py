"""On-the-fly RTN while loading (``load_rtn_model``): same model as load-then-quantize, one dense layer at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onecard.models.folder import open_model_folder
from onecard.models.loader import load_model
from onecard.quant import Fp8Linear, load_rtn_model, quantize_model_
from onecard.quant.linear import QuantLinear


@pytest.fixture(scope="module")
def folder(random_checkpoint):
    return open_model_folder(random_checkpoint("llama-2-7b"))


def _dense_layers(model) -> int:
    """Decoder layers holding a materialized (not meta) dense ``nn.Linear``."""
    return sum(any(type(m) is nn.Linear and m.weight.device.type != "meta" for m in layer.modules())
               for layer in model.layers)


@pytest.fixture(scope="module")
def tied_bias_folder(random_checkpoint, tmp_path_factory):
    """Qwen2 (q/k/v biases) with a tied head: the two layouts the streaming must also get right."""
    from onecard.testing import make_random_checkpoint

    path = make_random_checkpoint("qwen2-7b", "tiny", tmp_path_factory.mktemp("qwen") / "m",
                                  overrides={"tie_word_embeddings": True})
    return open_model_folder(path)


@pytest.mark.parametrize("which,spec", [("folder", "rtn-int4"), ("folder", "int8"), ("tied_bias_folder", "rtn-int4"),
                                        ("folder", "fp8"), ("tied_bias_folder", "fp8")])
def test_streamed_rtn_equals_load_then_quantize(which, spec, request, monkeypatch):
    folder = request.getfixturevalue(which)
    import onecard.models.loader as loader_mod

    seen: list[int] = []
    real = loader_mod.load_weights

    def counting_load(model, *a, **kw):  # after each layer's weights land, count the dense layers resident
        real(model, *a, **kw)
        seen.append(_dense_layers(model))

    monkeypatch.setattr(loader_mod, "load_weights", counting_load)
    streamed = load_rtn_model(folder, spec, torch.float32, "cpu")
    monkeypatch.setattr(loader_mod, "load_weights", real)

    n_layers = folder.model_args().num_layers
    assert seen == [0] + [1] * n_layers  # the outer weights, then each layer alone
    assert _dense_layers(streamed) == 0
    assert sum(isinstance(m, (QuantLinear, Fp8Linear)) for m in streamed.modules()) == 4 * n_layers

    reference = quantize_model_(load_model(folder, torch.float32, "cpu"), spec)
    ref_state, got_state = reference.state_dict(), streamed.state_dict()
    assert ref_state.keys() == got_state.keys()
    for name, t in ref_state.items():
        assert got_state[name].dtype == t.dtype and torch.equal(got_state[name], t), name
    assert torch.equal(streamed.rotary.cos_sin, reference.rotary.cos_sin)
    if folder.model_args().tie_word_embeddings:
        assert streamed.lm_head.weight is streamed.embed_tokens.weight
        assert streamed.layers[0].self_attn.qkv_proj.bias is not None
    ids = torch.randint(3, 1000, (12,))
    assert torch.equal(streamed.logits(ids), reference.logits(ids))


def test_streamed_rtn_keeps_the_model_dtype(folder):
    model = load_rtn_model(folder, "rtn-int4", torch.bfloat16, "cpu")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert model.rotary.cos_sin.dtype == torch.float32
