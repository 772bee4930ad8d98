"""Flash-decoding paged attention (``paged_decode_attention_split``) vs the PyTorch reference, under
TRITON_INTERPRET=1 on CPU: MHA and GQA, fp32/bf16 queries, fp16-scaled fp8/int8 caches, contexts that are not
multiples of the block or partition, sequences of very different lengths (one of length 1), the CUDA-graph
contract that the launch depends on the block-table width only, and the engine's decode through it."""

from __future__ import annotations

import pytest
import torch
from test_engine_kv_quant import (
    _paged,  # scattered-block paged cache builder (optionally quantized)
)

from onecard.errors import BadInputError
from onecard.models import llama
from onecard.kernels.paged_attention import (
    SPLIT_BIG_BATCH_SPLITS,
    SPLIT_MAX_PARTITION,
    SPLIT_MAX_PROGRAMS,
    SPLIT_MIN_PARTITION,
    SPLIT_TARGET_PROGRAMS,
    paged_decode_attention_fused,
    paged_decode_attention_reference,
    paged_decode_attention_split,
    split_plan,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")
FP8, INT8 = torch.float8_e4m3fn, torch.int8
CTX = [1, 150, 37]  # 150 tokens: three 64-token partitions, the last partial; 1 and 37 leave partitions idle


@pytest.mark.parametrize("fmt", [None, FP8, INT8])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "group4", "group8"])
@pytest.mark.parametrize("partition", [64, None], ids=["split64", "planned"])
def test_split_kernel_matches_reference(fmt, heads, partition):
    Hq, Hkv = heads
    q, kc, vc, ks, vs, bt, ctx, *_ = _paged(CTX, fmt, Hq=Hq, Hkv=Hkv, num_blocks=32)
    got = paged_decode_attention_split(q, kc, vc, bt, ctx, 0.25, ks, vs, partition=partition)
    want = paged_decode_attention_reference(q, kc, vc, bt, ctx, 0.25, ks, vs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", [None, FP8])
def test_split_kernel_bf16(fmt):
    q, kc, vc, ks, vs, bt, ctx, *_ = _paged(CTX, fmt, Hq=8, Hkv=2, num_blocks=32)
    q = q.bfloat16()
    if fmt is None:
        kc, vc = kc.bfloat16(), vc.bfloat16()
    got = paged_decode_attention_split(q, kc, vc, bt, ctx, 0.25, ks, vs, partition=64)
    want = paged_decode_attention_reference(q, kc, vc, bt, ctx, 0.25, ks, vs)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() < 2e-2  # bf16 probabilities into the P @ V dot


def test_launch_depends_on_table_width_only():
    # a captured graph's block table is max_model_len wide (padded with the scratch block): same answer, and
    # int64 context lengths (the graph's packed buffer) read like int32
    q, kc, vc, _, _, bt, ctx, *_ = _paged(CTX, None, Hq=8, Hkv=2, num_blocks=32)
    wide = torch.cat([bt, torch.full((bt.shape[0], 3 * bt.shape[1]), 31, dtype=bt.dtype)], dim=1)
    narrow = paged_decode_attention_split(q, kc, vc, bt, ctx, 0.25, partition=64)
    torch.testing.assert_close(paged_decode_attention_split(q, kc, vc, wide, ctx.long(), 0.25, partition=64), narrow,
                               atol=1e-6, rtol=1e-6)


def test_split_plan_covers_the_context_within_the_bounds():
    for batch, hkv, ctx, tile in [(1, 8, 32768, 64), (8, 8, 32768, 64), (1, 8, 1024, 64), (64, 8, 131072, 64),
                                  (256, 8, 32768, 64), (1, 1, 64, 64), (3, 2, 1, 64), (1, 8, 4096, 256)]:
        partition, splits = split_plan(batch, hkv, ctx, tile)
        assert partition % tile == 0 and partition * splits >= ctx > partition * (splits - 1)
        assert partition >= min(SPLIT_MIN_PARTITION, splits * partition)
        if batch * hkv >= SPLIT_TARGET_PROGRAMS:
            assert splits <= SPLIT_BIG_BATCH_SPLITS and partition >= min(SPLIT_MAX_PARTITION, ctx)
        else:
            assert batch * hkv * splits <= SPLIT_MAX_PROGRAMS or splits == 1
    assert split_plan(1, 8, 32768, 64) == (256, 128)  # bs=1 long context: 1024 programs, not 32
    assert split_plan(1, 8, 131072, 64) == (SPLIT_MAX_PARTITION, 131072 // SPLIT_MAX_PARTITION)
    assert split_plan(64, 8, 32768, 64) == (4096, 8)  # the program cap bounds the workspace
    # the batch alone fills the GPU: only its long sequences split, into a few partitions
    assert split_plan(256, 8, 32768, 64) == (8192, SPLIT_BIG_BATCH_SPLITS)
    assert split_plan(256, 32, 2048, 64) == (SPLIT_MAX_PARTITION, 2048 // SPLIT_MAX_PARTITION)
    assert split_plan(256, 32, 256, 64) == (256, 1)
    assert split_plan(1, 8, 64, 64) == (64, 1)  # one partition: the kernel writes the output itself


def test_plan_rows_makes_a_row_independent_of_its_batch():
    # speculative verify: k + 1 rows of one sequence in an 8-row graph must sum as plain bs=1 decode does, or a
    # bf16 near-tie flips; on a wide (max_model_len) table the 8-row plan picks longer partitions than bs=1's
    q, kc, vc, _, _, bt, ctx, *_ = _paged([300] * 8, None, Hq=8, Hkv=2, block_size=64, num_blocks=48)
    wide = torch.cat([bt, torch.full((8, 256 - bt.shape[1]), 47, dtype=bt.dtype)], dim=1)  # 16,384 tokens wide
    assert split_plan(8, 2, 256 * 64, 64) != split_plan(1, 2, 256 * 64, 64)
    alone = paged_decode_attention_split(q[:1], kc, vc, wide[:1], ctx[:1], 0.25)
    in_batch = paged_decode_attention_split(q, kc, vc, wide, ctx, 0.25, plan_rows=1)
    assert torch.equal(in_batch[:1], alone)


def test_engine_plans_one_sequences_verify_graph_as_bs1():
    from types import SimpleNamespace

    from onecard.engine.config import EngineConfig
    from onecard.engine.model_runner import ModelRunner

    def rows(k, bs):
        cfg = EngineConfig(model="m", num_speculative_tokens=k, max_num_seqs=8)
        return ModelRunner.split_rows(SimpleNamespace(config=cfg), bs)

    assert [rows(4, b) for b in (1, 2, 4, 8, 16)] == [1, 1, 1, 1, None]  # 5 verify rows replay the 8-row graph
    assert [rows(8, b) for b in (8, 16, 32)] == [1, 1, None]
    assert rows(0, 1) is None  # no speculation: every graph plans for its own rows


def test_partition_must_be_whole_tiles():
    q, kc, vc, _, _, bt, ctx, *_ = _paged([5], None)
    with pytest.raises(BadInputError, match="multiple"):
        paged_decode_attention_split(q, kc, vc, bt, ctx, 0.25, partition=96)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [None, FP8])
def test_split_kernel_llama_heads_on_gpu(fmt):
    # bf16 dots (CUDA only), Llama-3-8B head shapes, the planned partition and a forced multi-split one
    q, kc, vc, ks, vs, bt, ctx, *_ = _paged([1, 17, 3000, 640], fmt, Hq=32, Hkv=8, D=128, block_size=16,
                                            num_blocks=256)
    dev = "cuda"
    q = q.to(dev).bfloat16()
    kc, vc = (c.to(dev) if fmt is not None else c.to(dev).bfloat16() for c in (kc, vc))
    ks, vs = (s.to(dev) if s is not None else None for s in (ks, vs))
    bt, ctx = bt.to(dev), ctx.to(dev)
    want = paged_decode_attention_reference(q, kc, vc, bt, ctx, 128 ** -0.5, ks, vs).float()
    for partition in (None, 256):
        got = paged_decode_attention_split(q, kc, vc, bt, ctx, 128 ** -0.5, ks, vs, partition=partition).float()
        assert (got - want).abs().max() < 2e-2


def test_engine_decode_through_the_split_kernel(tiny_model, monkeypatch):
    # the engine's call sites (llama.Attention -> paged_decode_attention with use_triton, and with the fused RoPE +
    # store on, the one-launch paged_decode_attention_fused): on CPU the runner picks the reference; switched to
    # the Triton paths, greedy tokens and logprobs stay those of the reference
    from onecard.engine import LLM, SamplingParams

    llm = LLM(tiny_model.path, max_model_len=256, max_num_seqs=2, block_size=8)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    prompts = ["def read_config(path):\n    ", "The os module provides the functions that"]
    want = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
    llm.engine.runner.decode_attention = "triton"
    split = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
    llm.engine.runner.fused_rope_store = True
    calls = []
    monkeypatch.setattr(llama, "paged_decode_attention_fused",
                        lambda *a, **k: calls.append(1) or paged_decode_attention_fused(*a, **k))
    fused = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
    for a, b in zip(want * 2, split + fused):
        assert a.token_ids == b.token_ids
        for t, la, lb in zip(a.token_ids, a.logprobs, b.logprobs):
            assert abs(la[t] - lb[t]) < 1e-4
    assert calls  # the fused run went through the one-launch kernel


@pytest.mark.parametrize("fmt", [FP8, INT8])
def test_mha_quantized_cuda_core_walk_matches_tile_dots(fmt):
    # MHA over a quantized cache walks on CUDA cores by default (one query row: tile dots would be 1/16 useful);
    # forcing the tile-dot walk gives the same answer, and forcing CUDA cores on grouped heads is refused
    q, kc, vc, ks, vs, bt, ctx, *_ = _paged(CTX, fmt, Hq=4, Hkv=4, num_blocks=32)
    rows = paged_decode_attention_split(q, kc, vc, bt, ctx, 0.25, ks, vs, partition=64)
    tiles = paged_decode_attention_split(q, kc, vc, bt, ctx, 0.25, ks, vs, partition=64, cuda_cores=False)
    torch.testing.assert_close(rows, tiles, atol=1e-5, rtol=1e-5)
    q, kc, vc, ks, vs, bt, ctx, *_ = _paged(CTX, fmt, Hq=8, Hkv=2, num_blocks=32)
    with pytest.raises(BadInputError, match="cuda_cores=True"):
        paged_decode_attention_split(q, kc, vc, bt, ctx, 0.25, ks, vs, cuda_cores=True)
