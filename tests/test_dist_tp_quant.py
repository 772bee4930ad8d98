"""Sharding quantized linears (``QuantLinear.keep_out_features_`` / ``keep_in_features_``) without processes: two
ranks' column slices are the full layer's output columns, two ranks' row-slice partial outputs sum to the full
output, and splits that would cut a quantization group (or an act-order group across ranks) are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onecard.dist.tp import check_tp_groups, keep_in_features_, keep_out_features_
from onecard.errors import BadInputError
from onecard.models import ModelArgs, arch_config, scale_config
from onecard.quant.linear import ConcatLinear, QuantLinear
from onecard.quant.rtn import QuantizedWeight, rtn_quantize

TP = 2
SPECS = {"int8": (8, -1, True), "int4-g32": (4, 32, False), "int4-g128": (4, 128, False)}


def _quant(out_f: int, in_f: int, spec: str, bias: bool = False, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    bits, gs, sym = SPECS[spec]
    return QuantLinear.from_linear(lin, bits, gs, sym)


def _act_order(out_f: int, in_f: int, gs: int, g_idx: torch.Tensor) -> QuantLinear:
    """A QuantLinear whose groups follow ``g_idx`` (GPTQ act-order), codes and scales random."""
    g = torch.Generator().manual_seed(1)
    groups = in_f // gs
    qw = QuantizedWeight(torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8),
                         (torch.rand(groups, out_f, generator=g) + 0.5).half(),
                         torch.randint(1, 15, (groups, out_f), generator=g, dtype=torch.int32),
                         g_idx.to(torch.int32), 4, gs)
    return QuantLinear.from_quantized(qw)


def _copy(q: QuantLinear) -> QuantLinear:
    out = QuantLinear(q.in_features, q.out_features, q.bits, q.group_size, q.bias is not None, q.perm is not None)
    out.load_state_dict(q.state_dict())
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_column_slices_are_the_full_output_columns(spec):
    q = _quant(48, 256, spec, bias=True)
    x = torch.randn(5, 256)
    full = q(x)
    for rank in range(TP):
        rows = torch.arange(rank * 24, (rank + 1) * 24)
        shard = _copy(q)
        keep_out_features_(shard, rows)
        assert (shard.out_features, tuple(shard.qweight.shape)) == (24, (256 * q.bits // 32, 24))
        torch.testing.assert_close(shard(x), full[:, rows], rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_row_slices_sum_to_the_full_output(spec):
    q = _quant(40, 256, spec)
    x = torch.randn(5, 256)
    parts = []
    for rank in range(TP):
        shard = _copy(q)
        keep_in_features_(shard, rank * 128, 128)
        assert shard.in_features == 128 and shard.perm is None
        assert shard.scales.shape[0] == (1 if q.scales.shape[0] == 1 else 128 // q.group_size)
        parts.append(shard(x[:, rank * 128:(rank + 1) * 128]))
    torch.testing.assert_close(parts[0] + parts[1], q(x), rtol=1e-5, atol=1e-4)


def test_act_order_splits_when_each_group_stays_on_one_rank():
    in_f, gs = 128, 32
    # groups 0..3 over scattered channels, but channels < 64 use only groups {1, 3} and channels >= 64 only {0, 2}
    g_idx = torch.empty(in_f, dtype=torch.long)
    g_idx[:64] = torch.tensor([1, 3]).repeat_interleave(32)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    g_idx[64:] = torch.tensor([0, 2]).repeat_interleave(32)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    q = _act_order(16, in_f, gs, g_idx)
    assert q.perm is not None
    x = torch.randn(3, in_f)
    parts = []
    for rank in range(TP):
        shard = _copy(q)
        keep_in_features_(shard, rank * 64, 64)
        assert shard.perm is not None and sorted(shard.perm.tolist()) == list(range(64))
        parts.append(shard(x[:, rank * 64:(rank + 1) * 64]))
    torch.testing.assert_close(parts[0] + parts[1], q(x), rtol=1e-5, atol=1e-4)
    column = _copy(q)  # column-parallel keeps the whole input permutation
    keep_out_features_(column, torch.arange(8, 16))
    torch.testing.assert_close(column(x), q(x)[:, 8:], rtol=0, atol=0)


def test_refuses_splits_that_cut_a_group():
    mixed = _act_order(16, 128, 32, torch.arange(128) % 4)  # every group spans both halves
    with pytest.raises(BadInputError, match="act-order"):
        keep_in_features_(mixed, 0, 64)
    grouped = _quant(16, 192, "int4-g32")  # 96 per rank: 3 whole groups of 32, fine; of 64, not
    keep_in_features_(_copy(grouped), 96, 96)
    g64 = QuantLinear.from_quantized(rtn_quantize(torch.randn(16, 192), 4, 64, False))
    with pytest.raises(BadInputError, match="not a multiple of the group size 64"):
        keep_in_features_(g64, 96, 96)
    args = ModelArgs.from_hf_config(scale_config(arch_config("llama-2-7b"), "tiny"))
    i = args.intermediate_size  # tiny Llama-2: 704, so 352 per rank: whole groups of 32, not of 128
    assert (i // TP) % 32 == 0 and (i // TP) % 128
    check_tp_groups(args, TP, 32)
    check_tp_groups(args, TP, -1)
    with pytest.raises(BadInputError, match=f"down_proj's {i} input features over 2 GPUs"):
        check_tp_groups(args, TP, 128)
    with pytest.raises(BadInputError, match=f"o_proj's {args.q_size} input features over 8 GPUs"):
        check_tp_groups(args, 8, 64)


def test_concat_linear_splits_rows_among_its_parts():
    parts = [_quant(32, 64, "int4-g32", seed=s) for s in range(3)]
    cat = ConcatLinear([_copy(p) for p in parts])
    x = torch.randn(2, 64)
    full = cat(x)
    rows = torch.cat([torch.arange(0, 16), torch.arange(48, 56), torch.arange(80, 88)])
    keep_out_features_(cat, rows)
    assert [p.out_features for p in cat.parts] == [16, 8, 8]
    torch.testing.assert_close(cat(x), full[:, rows], rtol=0, atol=0)


def test_act_order_gptq_folder_is_refused_when_its_groups_mix_ranks(tmp_path):
    from onecard.dist.tp import shard_model_
    from onecard.quant import QuantConfig, load_quantized_model, quantize_model_folder
    from onecard.testing import make_random_checkpoint

    src = make_random_checkpoint("llama-2-7b", "tiny")
    cfg = QuantConfig("gptq", 4, 32, act_order=True, nsamples=2, seqlen=32)
    out = quantize_model_folder(src, tmp_path / "g", cfg, progress=False).out_dir
    model = load_quantized_model(out, torch.float32, "cpu")
    assert model.layers[0].self_attn.o_proj.perm is not None
    with pytest.raises(BadInputError, match="act-order"):
        shard_model_(model, 0, TP)
