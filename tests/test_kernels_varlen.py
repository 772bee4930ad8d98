"""Packed varlen attention (FlashAttention through PyTorch) vs the per-sequence SDPA reference loops."""

from __future__ import annotations

import pytest
import torch

from onecard.kernels.varlen_attention import (cumulative, flash_varlen_usable, prefix_attention, prefix_groups,
                                              varlen_causal)
from onecard.models.llama import prefill_attention, prefill_attention_with_prefix


def _paged(ctx_lens: list[int], block_size: int, hkv: int, d: int, dtype, device, seed: int = 0):
    """A shuffled paged cache holding random K/V for each context, and its block table."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [(c + block_size - 1) // block_size for c in ctx_lens]
    perm = torch.randperm(sum(nblocks) + 3, generator=g)
    tables, i = [], 0
    for n in nblocks:
        tables.append(perm[i:i + n].tolist())
        i += n
    width = max(nblocks)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    shape = (len(perm), block_size, hkv, d)
    kc = torch.randn(shape, generator=g).to(device, dtype)
    vc = torch.randn(shape, generator=g).to(device, dtype)
    return kc, vc, bt


def test_prefix_groups_slots_follow_block_tables_and_respect_the_budget():
    seq_lens, prefix_lens, bs = [3, 5, 2, 7], [10, 0, 33, 4], 8
    _, _, bt = _paged([n + p for n, p in zip(seq_lens, prefix_lens)], bs, 1, 8, torch.float32, "cpu")
    groups = prefix_groups(seq_lens, prefix_lens, bt, bs, token_budget=20)
    assert [(g.q_start, g.q_end) for g in groups] == [(0, 8), (8, 10), (10, 17)]  # 13+5 fit, 35 alone
    b = 0
    for g in groups:
        expect = []
        for j in range(len(g.cu_q) - 1):
            ctx = seq_lens[b] + prefix_lens[b]
            expect += [int(bt[b, p // bs]) * bs + p % bs for p in range(ctx)]
            b += 1
        assert g.slots.tolist() == expect
        assert g.cu_k[-1].item() == len(expect) and g.max_k == max(
            seq_lens[i] + prefix_lens[i] for i in range(b - len(g.cu_q) + 1, b))
    assert cumulative([2, 3], torch.device("cpu")).tolist() == [0, 2, 5]


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_gpu_varlen_equals_per_sequence_sdpa(hq, hkv):
    dev = torch.device("cuda")
    seq_lens = [1, 17, 128, 300, 5]
    T, d = sum(seq_lens), 64
    q, k, v = (torch.randn(T, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    assert flash_varlen_usable(q)
    cu = cumulative(seq_lens, dev)
    out = varlen_causal(q, k, v, cu, cu, max(seq_lens), max(seq_lens), d ** -0.5)
    ref = prefill_attention(q, k, v, seq_lens, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_gpu_prefix_attention_equals_reference(hq, hkv):
    dev = torch.device("cuda")
    seq_lens, prefix_lens, bs, d = [4, 64, 1, 200], [37, 0, 300, 16], 16, 64
    kc, vc, bt = _paged([n + p for n, p in zip(seq_lens, prefix_lens)], bs, hkv, d, torch.bfloat16, dev)
    q = torch.randn(sum(seq_lens), hq, d, device=dev, dtype=torch.bfloat16)
    ref = prefill_attention_with_prefix(q, kc, vc, seq_lens, prefix_lens, bt, d ** -0.5)
    for budget in (10_000, 100):  # one group; one sequence per group
        groups = prefix_groups(seq_lens, prefix_lens, bt, bs, budget)
        out = prefix_attention(q, kc, vc, groups, d ** -0.5)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
