"""End-to-end quantization of a random-weight checkpoint: folder layout, refusals, atomic writes,
GPTQ's defining property, and the engine-side loaders (our model, on-the-fly RTN, LLM)."""

from __future__ import annotations

import json

import pytest
import torch

from onecard.errors import BadInputError
from onecard.quant import QuantConfig, load_quantized_hf, load_quantized_model, quantize_model_, quantize_model_folder
from onecard.quant.gptq import HessianAccumulator, gptq_quantize
from onecard.quant.rtn import rtn_quantize

FAST = dict(nsamples=2, seqlen=32)


@pytest.fixture(scope="module")
def src(random_checkpoint):
    return random_checkpoint("llama-2-7b")


@pytest.fixture(scope="module")
def gptq_dir(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "gptq"
    quantize_model_folder(src, out, QuantConfig("gptq", 4, 32, act_order=True, **FAST), progress=False)
    return out


def test_gptq_folder_layout(src, gptq_dir):
    from safetensors import safe_open

    cfg = json.loads((gptq_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc.items() >= {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True,
                          "checkpoint_format": "gptq"}.items()
    qfile = json.loads((gptq_dir / "quantize_config.json").read_text())
    assert qfile["bits"] == 4 and qfile["group_size"] == 32 and qfile["desc_act"] is True
    assert (gptq_dir / "tokenizer.json").exists()
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    with safe_open(str(gptq_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        p = "model.layers.0.mlp.down_proj."
        assert f.get_tensor(p + "qweight").shape == (inter // 8, hidden)
        assert f.get_tensor(p + "qweight").dtype == torch.int32
        assert f.get_tensor(p + "qzeros").shape == (inter // 32, hidden // 8)
        assert f.get_tensor(p + "scales").dtype == torch.float16
        g_idx = f.get_tensor(p + "g_idx")
        assert g_idx.dtype == torch.int32 and g_idx.shape == (inter,)
        assert torch.bincount(g_idx.long()).eq(32).all()  # act-order: permuted, but every group full
        assert not any(n.endswith("proj.weight") for n in names)
        assert "model.embed_tokens.weight" in names and "lm_head.weight" in names


def test_quantized_model_is_close_and_loaders_agree(src, gptq_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = torch.randint(3, 1000, (1, 20))
    with torch.no_grad():
        fp = ref(ids).logits[0]
        hf = load_quantized_hf(gptq_dir)(ids).logits[0]
    ours = load_quantized_model(gptq_dir, torch.float32, "cpu").logits(ids[0])
    torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-4)   # same weights, two forwards
    rel = (hf - fp).norm() / fp.norm()
    assert 0 < rel < 0.5, rel  # quantized, but still the same model


def test_gptq_beats_rtn_on_its_objective():
    """GPTQ minimizes ||X W^T - X Q^T||: on correlated inputs it must beat round-to-nearest."""
    torch.manual_seed(0)
    X = torch.randn(2048, 64) @ torch.randn(64, 64)  # correlated features
    W = torch.randn(48, 64)
    acc = HessianAccumulator(64, "cpu")
    acc.add(X)
    for act_order in (False, True):
        qg, _ = gptq_quantize(W, acc.H, 4, 32, sym=True, act_order=act_order)
        qr = rtn_quantize(W, 4, 32, sym=True)
        err_g = (X @ (W - qg.dequantize()).t()).pow(2).mean()
        err_r = (X @ (W - qr.dequantize()).t()).pow(2).mean()
        assert err_g < 0.7 * err_r, (act_order, err_g, err_r)


def test_rtn_int8_and_awq_folders(src, tmp_path):
    rtn = quantize_model_folder(src, tmp_path / "r8", QuantConfig("rtn", 8, -1), progress=False)
    qc = json.loads((rtn.out_dir / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 8 and qc["group_size"] == -1
    awq = quantize_model_folder(src, tmp_path / "awq", QuantConfig("awq", 4, 32, **FAST), progress=False)
    qc = json.loads((awq.out_dir / "config.json").read_text())["quantization_config"]
    assert qc.items() >= {"quant_method": "awq", "version": "gemm", "zero_point": True, "bits": 4}.items()
    from safetensors import safe_open

    with safe_open(str(awq.out_dir / "model.safetensors"), "pt") as f:
        cfg = json.loads((awq.out_dir / "config.json").read_text())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").shape == (cfg["hidden_size"], cfg["hidden_size"] // 8)
    ids = torch.randint(3, 1000, (1, 16))
    for d in (rtn.out_dir, awq.out_dir):
        assert torch.isfinite(load_quantized_hf(d)(ids).logits).all()


def test_refusals(src, gptq_dir, tmp_path):
    with pytest.raises(BadInputError, match="not empty"):
        quantize_model_folder(src, gptq_dir, QuantConfig("rtn", 4, 32), progress=False)
    with pytest.raises(BadInputError, match="already quantized"):
        quantize_model_folder(gptq_dir, tmp_path / "x", QuantConfig("rtn", 4, 32), progress=False)
    with pytest.raises(BadInputError, match="source model folder"):
        quantize_model_folder(src, src / "sub", QuantConfig("rtn", 4, 32), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    with pytest.raises(BadInputError, match="too short"):
        quantize_model_folder(src, tmp_path / "y", QuantConfig("gptq", 4, 32, calib=short, **FAST), progress=False)
    with pytest.raises(BadInputError, match="--bits 3"):
        QuantConfig("gptq", 3, 128)
    with pytest.raises(BadInputError, match="--group-size 100"):
        QuantConfig("gptq", 4, 100)
    with pytest.raises(BadInputError, match="AWQ"):
        QuantConfig("awq", 8, 128)
    with pytest.raises(BadInputError, match="act-order"):
        QuantConfig("rtn", 4, 128, act_order=True)


def test_interrupted_run_leaves_nothing(src, tmp_path, monkeypatch):
    """A failure while writing leaves neither the destination nor the temp folder."""
    import onecard.quant.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        quantize_model_folder(src, out, QuantConfig("rtn", 4, 32), progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert ck.SHARD_BYTES > 0


def test_overwrite_replaces(src, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    quantize_model_folder(src, out, QuantConfig("rtn", 4, 32), overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_quantize_model_in_place_on_our_model(src):
    from onecard.models.folder import open_model_folder
    from onecard.models.loader import load_model
    from onecard.quant.linear import QuantLinear

    folder = open_model_folder(src)
    model = load_model(folder, torch.float32, "cpu")
    ids = torch.randint(3, 1000, (16,))
    fp = model.logits(ids)
    dense = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
    quantize_model_(model, "rtn-int4")
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(swapped) == set(dense) and len(swapped) == 4 * folder.model_args().num_layers
    for n, m in swapped.items():  # exactly RTN of each fused weight
        torch.testing.assert_close(m.dequantized_weight(), rtn_quantize(dense[n], 4, 128, sym=False).dequantize())
    q = model.logits(ids)
    assert 0 < (q - fp).norm() / fp.norm() < 0.5
    with pytest.raises(BadInputError, match="not supported"):
        quantize_model_(model, "int3")


def test_llm_runs_quantized(src, gptq_dir):
    from onecard.engine import LLM, SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0)
    for llm in (LLM(str(gptq_dir), device="cpu", max_model_len=64),
                LLM(str(src), device="cpu", max_model_len=64, quantization="int8")):
        out = llm.generate(["def f(x):"], params, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.gpu
def test_gpu_quantized_engine_matches_reference_path(src, gptq_dir):
    """On CUDA the Triton kernels run inside the engine (CUDA graphs on); logits match the reference path."""
    from onecard.engine import LLM, SamplingParams
    from onecard.quant.linear import QuantLinear

    model = load_quantized_model(gptq_dir, torch.bfloat16, "cuda")
    ids = torch.randint(3, 1000, (33,), device="cuda")
    fast = model.logits(ids).float()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.forward = lambda x, m=m: torch.nn.functional.linear(x, m.dequantized_weight(x.dtype), m.bias)
    ref = model.logits(ids).float()
    torch.testing.assert_close(fast, ref, rtol=5e-2, atol=5e-2)
    llm = LLM(str(gptq_dir), max_model_len=128)
    out = llm.generate(["def f(x):"] * 3, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)


def test_awq_searches_handle_a_partial_last_group():
    """in_features 688 (the tiny model's intermediate size) = 10 groups of 64 + 48."""
    from onecard.quant.awq import ScaleGroup, clip_groups, linear_outputs, search_clip, search_scales

    torch.manual_seed(0)
    x, w = torch.randn(64, 688), torch.randn(32, 688)
    s = search_scales(x, ScaleGroup("down", [w], linear_outputs), 4, 64)
    assert s.shape == (688,) and torch.isfinite(s).all() and (s > 0).all()
    bound = search_clip(x, w, 4, 64)
    absmax = torch.nn.functional.pad(w.abs(), (0, 16)).reshape(32, 11, 64).amax(-1)
    assert bound.shape == (32, 11) and ((bound >= 0.5 * absmax - 1e-6) & (bound <= absmax)).all()
    clipped = clip_groups(w, bound, 64)
    assert clipped.shape == w.shape and rtn_quantize(clipped, 4, 64, sym=False).scales.shape == (11, 32)


def test_awq_clip_never_raises_a_groups_output_error():
    """The search scores the bound it returns against no clipping (bound = max|w| is on its grid), so per
    (row, group) the chosen clamp's rounded output error is at most plain RTN's; on heavy-tailed weights it
    clips some groups (the search is not a no-op), and the clamp moves only the side past the bound."""
    from onecard.quant.awq import clip_groups, fake_quantize_groups, search_clip

    torch.manual_seed(0)
    x = torch.randn(256, 256)
    w = torch.distributions.StudentT(2.0).sample((48, 256))
    bound = search_clip(x, w, 4, 64)
    clipped = clip_groups(w, bound, 64)

    def group_err(wq):
        return ((x.view(256, 1, 4, 64) * (wq - w).view(1, 48, 4, 64)).sum(-1)).pow(2).mean(0)   # [out, G]

    assert (group_err(fake_quantize_groups(clipped, 4, 64)) <= group_err(fake_quantize_groups(w, 4, 64)) + 1e-6).all()
    assert (clipped != w).any()
    inside = w.abs() <= bound.repeat_interleave(64, dim=1)
    assert torch.equal(clipped[inside], w[inside])


@pytest.mark.parametrize("arch", ["llama-2-7b", "llama-3.1-8b", "qwen2-7b"])  # MHA; GQA; GQA with q/k/v biases
def test_awq_attention_score_is_the_hf_attention_output(random_checkpoint, arch):
    """AWQ scores q/k/v candidates by the attention block's output: with the float weights it must be exactly
    what transformers' ``self_attn`` computes (RoPE, causal softmax, GQA, biases, o_proj)."""
    from onecard.models import open_model_folder
    from onecard.quant.awq import AttentionShape, attention_outputs
    from onecard.quant.layerwise import _HFLayers

    folder = open_model_folder(random_checkpoint(arch))
    hf = _HFLayers(folder, torch.device("cpu"), torch.float32)
    layer = hf.layer(0)
    attn = layer.self_attn
    T = 12
    pe = hf.position_embeddings(T)
    torch.manual_seed(0)
    x = torch.randn(2, T, attn.config.hidden_size)
    with torch.no_grad():
        ref, _ = attn(x, position_embeddings=pe, attention_mask=None)
    shape = AttentionShape(attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim,
                           pe[0][0], pe[1][0], tuple(getattr(attn, n).bias for n in ("q_proj", "k_proj", "v_proj")),
                           attn.o_proj.weight.data)
    weights = [getattr(attn, n).weight.data for n in ("q_proj", "k_proj", "v_proj")]
    with torch.no_grad():
        ours = attention_outputs(shape)(x.reshape(-1, x.shape[-1]), weights)
    torch.testing.assert_close(ours, ref.reshape(-1, ref.shape[-1]), rtol=1e-4, atol=1e-5)
