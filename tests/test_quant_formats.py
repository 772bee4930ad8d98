"""Checkpoint layouts (GPTQ v1, AWQ GEMM) checked against independent, loop-based packers written
the way AutoGPTQ's ``QuantLinear.pack`` and AutoAWQ's ``WQLinear_GEMM.from_linear`` do it, and
third-party-style folders loaded by onecard."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from onecard.quant.packing import from_awq, from_gptq, to_awq, to_gptq
from onecard.quant.rtn import rtn_quantize


def gptq_pack_loops(intweight: np.ndarray, zeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """AutoGPTQ-style: intweight [in, out] uint32, zeros [G, out] (true zero points; v1 stores zero - 1)."""
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j].astype(np.uint32) << np.uint32(bits * j)
    z = (zeros - 1).astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per):
            qzeros[:, col] |= z[:, col * per + j] << np.uint32(bits * j)
    return qweight.view(np.int32), qzeros.view(np.int32)


def awq_pack_loops(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ-style: [rows, cols] -> [rows, cols/8], column 8c + order_map[i] in nibble i."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << np.uint32(i * 4)
    return out.view(np.int32)


def dequant_numpy(q_in_out: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """Plain formula every GPTQ/AWQ reader implements: W[in, out] = (q - z[g_idx]) * s[g_idx]."""
    return (q_in_out.astype(np.float32) - zeros[g_idx].astype(np.float32)) * scales[g_idx].astype(np.float32)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 64, False), (8, -1, True), (8, 32, False)])
def test_gptq_layout_matches_independent_packer(bits, group_size, sym):
    torch.manual_seed(bits + group_size)
    qw = rtn_quantize(torch.randn(48, 128), bits, group_size, sym)
    ours = to_gptq(qw)
    ref_qweight, ref_qzeros = gptq_pack_loops(qw.q.t().numpy().astype(np.uint32), qw.zeros.numpy(), bits)
    per = 32 // bits
    assert ours["qweight"].dtype == torch.int32 and ours["qweight"].shape == (128 // per, 48)
    assert ours["qzeros"].shape == (qw.scales.shape[0], 48 // per) and ours["scales"].dtype == torch.float16
    assert np.array_equal(ours["qweight"].numpy(), ref_qweight)
    assert np.array_equal(ours["qzeros"].numpy(), ref_qzeros)
    if sym and bits == 4:  # the well-known symmetric 4-bit GPTQ zeros word: 0x77777777
        assert (ours["qzeros"] == 0x77777777).all()
    back = from_gptq(ours["qweight"], ours["qzeros"], ours["scales"], ours["g_idx"], bits, group_size)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros) and torch.equal(back.g_idx, qw.g_idx)
    np.testing.assert_array_equal(back.dequantize().t().numpy(),
                                  dequant_numpy(qw.q.t().numpy(), qw.zeros.numpy(), qw.scales.numpy(), qw.g_idx.numpy()))


def test_awq_layout_matches_independent_packer():
    torch.manual_seed(1)
    qw = rtn_quantize(torch.randn(64, 128), 4, 32, sym=False)
    ours = to_awq(qw)
    assert ours["qweight"].shape == (128, 8) and ours["qzeros"].shape == (4, 8)
    assert np.array_equal(ours["qweight"].numpy(), awq_pack_loops(qw.q.t().numpy()))
    assert np.array_equal(ours["qzeros"].numpy(), awq_pack_loops(qw.zeros.numpy()))
    back = from_awq(ours["qweight"], ours["qzeros"], ours["scales"], 32)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)


def test_awq_refuses_what_it_cannot_store():
    qw = rtn_quantize(torch.randn(16, 64), 8, 32)
    with pytest.raises(ValueError, match="4-bit only"):
        to_awq(qw)


def _third_party_folder(src, out, method: str, act_order: bool = False):
    """A folder as another tool would write it: packed with the loop packers above, no onecard code."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    rng = np.random.default_rng(0)
    gs, bits = 32, 4
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        w = tensors.pop(name).numpy()                      # [out, in]
        out_f, in_f = w.shape
        G = in_f // gs
        perm = rng.permutation(in_f) if act_order else np.arange(in_f)
        g_idx = np.empty(in_f, dtype=np.int32)
        g_idx[perm] = np.arange(in_f) // gs
        scales = np.zeros((G, out_f), dtype=np.float16)
        zeros = np.zeros((G, out_f), dtype=np.int64)
        q = np.zeros((in_f, out_f), dtype=np.int64)
        for g in range(G):
            rows = np.where(g_idx == g)[0]
            wg = w[:, rows].T                              # [gs, out]
            lo, hi = np.minimum(wg.min(0), 0), np.maximum(wg.max(0), 0)
            s = ((hi - lo) / 15).astype(np.float16)
            z = np.clip(np.round(-lo / s.astype(np.float32)), 1, 15)
            q[rows] = np.clip(np.round(wg / s.astype(np.float32)) + z, 0, 15)
            scales[g], zeros[g] = s, z
        base = name[: -len(".weight")]
        if method == "gptq":
            qweight, qzeros = gptq_pack_loops(q.astype(np.uint32), zeros, bits)
            tensors[f"{base}.g_idx"] = torch.from_numpy(g_idx)
        else:
            qweight, qzeros = awq_pack_loops(q.astype(np.uint32)), awq_pack_loops(zeros.astype(np.uint32))
        tensors[f"{base}.qweight"] = torch.from_numpy(qweight)
        tensors[f"{base}.qzeros"] = torch.from_numpy(qzeros)
        tensors[f"{base}.scales"] = torch.from_numpy(scales)
        tensors[f"{base}.__dequant"] = torch.from_numpy(dequant_numpy(q, zeros, scales, g_idx).T.copy())
    deq = {k[: -len(".__dequant")]: tensors.pop(k) for k in list(tensors) if k.endswith(".__dequant")}
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": act_order,
                                   "sym": False, "checkpoint_format": "gptq"} if method == "gptq" else
                                  {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True,
                                   "version": "gemm"})
    (out / "config.json").write_text(json.dumps(cfg))
    return deq


@pytest.mark.parametrize("method,act_order", [("gptq", False), ("gptq", True), ("awq", False)])
def test_third_party_checkpoint_loads(random_checkpoint, tmp_path, method, act_order):
    """onecard (HF path and engine path) runs a checkpoint packed by independent code, exactly."""
    from transformers import AutoModelForCausalLM

    from onecard.quant import load_quantized_hf, load_quantized_model

    src = random_checkpoint("llama-2-7b")
    out = tmp_path / "third"
    deq = _third_party_folder(src, out, method, act_order)
    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    with torch.no_grad():
        for base, w in deq.items():
            ref.get_submodule(base).weight.copy_(w)
    ids = torch.randint(3, 1000, (1, 24))
    with torch.no_grad():
        expected = ref(ids).logits[0]
        hf = load_quantized_hf(out)(ids).logits[0]
    torch.testing.assert_close(hf, expected, rtol=1e-4, atol=1e-4)
    ours = load_quantized_model(out, torch.float32, "cpu")
    torch.testing.assert_close(ours.logits(ids[0]), expected, rtol=1e-4, atol=1e-4)


def test_rejects_unsupported_quant_configs():
    from onecard.errors import UnsupportedModelError
    from onecard.quant.checkpoint import QuantFormat

    with pytest.raises(UnsupportedModelError, match="3-bit"):
        QuantFormat.from_config({"quant_method": "gptq", "bits": 3, "group_size": 128})
    with pytest.raises(UnsupportedModelError, match="gptq_v2"):
        QuantFormat.from_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"})
    with pytest.raises(UnsupportedModelError, match="gemv"):
        QuantFormat.from_config({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})
    with pytest.raises(UnsupportedModelError, match="bitsandbytes"):
        QuantFormat.from_config({"quant_method": "bitsandbytes"})
    with pytest.raises(UnsupportedModelError, match="16-bit model with quantization='fp8'"):
        QuantFormat.from_config({"quant_method": "compressed-tensors", "format": "float-quantized"})
