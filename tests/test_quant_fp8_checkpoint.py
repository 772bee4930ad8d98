"""fp8 checkpoints (compressed-tensors "float-quantized" and AutoFP8's quant_method "fp8") load into ``Fp8Linear``.

The folders are written here in each format's layout from a random tiny model: per-channel scales must give
exactly the on-the-fly ``quantization="fp8"`` model, a per-tensor scale a model close to the float one."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from onecard.errors import NotBuiltYetError, UnsupportedModelError
from onecard.kernels.fp8_quant import FP8, FP8_MAX, quantize_rows_reference
from onecard.models import open_model_folder
from onecard.models.loader import load_model
from onecard.quant import Fp8Linear, load_quantized_hf, load_quantized_model, load_rtn_model

COMPRESSED_TENSORS = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True}}},
}
AUTOFP8_STATIC = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}


def write_fp8_folder(src, out, quantization_config: dict, per_tensor: bool = False,
                     scale_dtype: torch.dtype = torch.float32):
    """``src`` with every decoder linear stored as e4m3 codes + ``weight_scale`` in ``scale_dtype`` (``[out, 1]``,
    or a scalar and an ``input_scale`` when ``per_tensor``), the rest as it was."""
    out.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            shutil.copy(p, out / p.name)
    tensors = {}
    for name, t in open_model_folder(src).iter_tensors():
        if ".layers." in name and name.endswith("_proj.weight"):
            module = name[: -len(".weight")]
            if per_tensor:
                scale = (t.float().abs().max() / FP8_MAX).reshape(())
                tensors[name] = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
                tensors[f"{module}.input_scale"] = torch.tensor(0.05)
            else:
                tensors[name], scale = quantize_rows_reference(t.float())
            tensors[f"{module}.weight_scale"] = scale.to(scale_dtype)
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_compressed_tensors_channel_fp8_equals_on_the_fly_fp8(random_checkpoint, tmp_path):
    """fp32 channel scales of the model's own rows: exactly the on-the-fly quantization='fp8' model (codes, scales,
    logits), in our model and in the HF reference path. llm-compressor stores scales in bf16: those load within
    bf16's rounding of the same scales."""
    src = random_checkpoint("qwen2-7b")  # qkv bias: fused bias rows beside fp8 weights
    ours = load_quantized_model(write_fp8_folder(src, tmp_path / "ct", COMPRESSED_TENSORS), torch.float32, "cpu")
    fly = load_rtn_model(src, "fp8", torch.float32, "cpu")
    assert sum(isinstance(m, Fp8Linear) for m in ours.modules()) == 4 * ours.args.num_layers
    assert ours.state_dict().keys() == fly.state_dict().keys()
    for name, t in fly.state_dict().items():
        assert torch.equal(ours.state_dict()[name].view(torch.uint8), t.view(torch.uint8)), name
    ids = torch.arange(3, 30)
    assert torch.equal(ours.logits(ids), fly.logits(ids))
    hf = load_quantized_hf(tmp_path / "ct", torch.float32, "cpu")
    torch.testing.assert_close(hf(ids[None]).logits[0], ours.logits(ids), rtol=1e-4, atol=1e-4)
    bf = load_quantized_model(write_fp8_folder(src, tmp_path / "bf", COMPRESSED_TENSORS, scale_dtype=torch.bfloat16),
                              torch.float32, "cpu")
    a, b = bf.layers[0].mlp.down_proj, fly.layers[0].mlp.down_proj
    assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
    torch.testing.assert_close(a.weight_scale, b.weight_scale, rtol=2 ** -8, atol=0)


def test_autofp8_per_tensor_static_checkpoint_runs_in_the_engine(random_checkpoint, tmp_path, caplog):
    from onecard.engine import LLM, SamplingParams
    from onecard.plan import resolve_model
    from onecard.plan.preflight import engine_weight_format

    src = random_checkpoint("llama-2-7b")
    folder = write_fp8_folder(src, tmp_path / "a8", AUTOFP8_STATIC, per_tensor=True)
    with caplog.at_level(logging.WARNING):
        model = load_quantized_model(folder, torch.float32, "cpu")
    assert "input_scale, if any, is not used" in caplog.text  # said, not silently ignored
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and len(set(qkv.weight_scale.flatten().tolist())) == 3  # q, k, v scales
    ids = torch.arange(3, 30)
    dense = load_model(open_model_folder(src), torch.float32, "cpu").logits(ids)
    assert (model.logits(ids) - dense).norm() / dense.norm() < 0.2
    assert engine_weight_format(resolve_model(str(folder)), None, 2) == "fp8"
    llm = LLM(str(folder), max_model_len=64, max_num_seqs=2, device="cpu")
    out = llm.generate("def f():", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_fp8_checkpoints_it_does_not_read_are_refused(random_checkpoint, tmp_path):
    from onecard.quant.fp8_checkpoint import fp8_checkpoint_format

    with pytest.raises(NotBuiltYetError, match="block-wise.*quantization='fp8'"):
        fp8_checkpoint_format({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(UnsupportedModelError, match="pack-quantized"):
        fp8_checkpoint_format({"quant_method": "compressed-tensors", "format": "pack-quantized",
                               "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}})
    assert fp8_checkpoint_format({"quant_method": "gptq"}) is None
    src = random_checkpoint("llama-2-7b")
    folder = write_fp8_folder(src, tmp_path / "e5", COMPRESSED_TENSORS)
    cfg = json.loads((folder / "config.json").read_text())
    tensors = dict(open_model_folder(folder).iter_tensors())
    tensors = {n: t.to(torch.float8_e5m2) if t.dtype == FP8 else t for n, t in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="float8_e5m2"):
        load_quantized_model(folder, torch.float32, "cpu")
