"""Sampler on its own: top-k / top-p / min-p masks, penalties, greedy, seeded draws follow the distribution."""

from __future__ import annotations

import torch

from onecard.engine.sampler import apply_penalties, filter_logits, sample
from onecard.engine.sampling_params import SamplingParams
from onecard.engine.sequence import Sequence


def _seq(params, prompt=(1, 2, 3), out=(), seed=None):
    s = Sequence("r", 0, list(prompt), params, torch.Generator().manual_seed(seed) if seed is not None else None)
    s.token_ids += list(out)
    return s


def test_top_k_keeps_exactly_k_best():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    out = filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]), True, False)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert out[0, 1] == 3.0 and out[0, 3] == 2.0


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), torch.tensor([0]), torch.tensor([0.7]), torch.tensor([0.0]), True, False)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.8 >= 0.7
    out = filter_logits(probs.log(), torch.tensor([0]), torch.tensor([0.1]), torch.tensor([0.0]), True, False)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]  # the top token always survives


def test_min_p_floor():
    probs = torch.tensor([[0.6, 0.3, 0.06, 0.04]])
    out = filter_logits(probs.log(), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.1]), False, True)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


def test_penalties_follow_the_hf_vllm_rules():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0, 1.0]])
    s = _seq(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25), prompt=[0, 1], out=[2, 2])
    got = apply_penalties(logits, [s])[0].tolist()
    assert got == [1.0, -4.0, 0.5 - 0.5 - 0.5, 1.0, 1.0]


def test_greedy_and_mixed_batch():
    logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
    out = sample(logits, [_seq(SamplingParams(temperature=0)), _seq(SamplingParams(temperature=1e-4, seed=0))])
    assert out.token_ids == [1, 0]


def test_seeded_draws_match_the_distribution_and_reproduce():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().unsqueeze(0)
    s = _seq(SamplingParams(temperature=1.0, seed=42), seed=42)
    draws = [sample(logits, [s]).token_ids[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)
    s2 = _seq(SamplingParams(temperature=1.0, seed=42), seed=42)
    assert [sample(logits, [s2]).token_ids[0] for _ in range(50)] == draws[:50]


def test_top_k_sampling_never_leaves_the_top_k():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    allowed = set(logits[0].topk(5).indices.tolist())
    s = _seq(SamplingParams(temperature=2.0, top_k=5, seed=3), seed=3)
    assert {sample(logits, [s]).token_ids[0] for _ in range(300)} <= allowed
