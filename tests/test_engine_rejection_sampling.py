"""Rejection sampling alone (speculative sampling for temperature > 0): every emitted token is distributed as the
target's p, whatever the draft's q — a random q, a point mass (n-gram drafts) and q = p (always accepted)."""

from __future__ import annotations

import torch

from onecard.engine.rejection_sampler import rejection_sample

V, K, TRIALS = 8, 2, 6000


def _emitted(p: torch.Tensor, q: torch.Tensor | None, fixed_draft: torch.Tensor | None) -> list[list[int]]:
    """Per position, the tokens emitted there over ``TRIALS`` runs (drafts drawn from q, or the fixed point mass)."""
    g = torch.Generator().manual_seed(0)
    at: list[list[int]] = [[] for _ in range(K + 1)]
    for _ in range(TRIALS):
        draft = fixed_draft if q is None else torch.multinomial(q, 1, generator=g).squeeze(1)
        n, token = rejection_sample(p, draft, q, g).tolist()
        for i in range(n):
            at[i].append(int(draft[i]))
        at[n].append(token)
    return at


def _tv(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=V).double()
    return 0.5 * (counts / counts.sum() - probs.double()).abs().sum().item()


def _random_probs(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, V, generator=g) * 1.5).softmax(-1)


def test_emitted_tokens_follow_p_for_a_random_draft():
    p, q = _random_probs(K + 1, 1), _random_probs(K, 2)
    assert _tv(torch.multinomial(q[0], TRIALS, replacement=True).tolist(), p[0]) > 0.15  # q alone would fail
    at = _emitted(p, q, None)
    for i in range(K + 1):  # position i is reached only after i accepted tokens; given that, it still follows p[i]
        assert len(at[i]) > 500
        assert _tv(at[i], p[i]) < 0.06, i


def test_emitted_tokens_follow_p_for_a_point_mass_draft():
    p = _random_probs(K + 1, 3)
    draft = torch.stack([p[0].argmin(), p[1].argmax()])  # an unlikely guess, then a likely one
    at = _emitted(p, None, draft)
    assert abs(len(at[1]) / TRIALS - p[0, draft[0]].item()) < 0.02  # accepted with probability p(x)
    for i in range(K + 1):
        if len(at[i]) > 200:
            assert _tv(at[i], p[i]) < 0.08, i
    assert _tv(at[0], p[0]) < 0.04


def test_draft_equal_to_target_is_always_accepted():
    p = _random_probs(K + 1, 4)
    at = _emitted(p, p[:K].clone(), None)
    assert len(at[K]) == TRIALS  # every run reached the bonus token
    assert _tv(at[K], p[K]) < 0.05


def test_same_generator_seed_gives_the_same_decision():
    p, q = _random_probs(K + 1, 5), _random_probs(K, 6)
    draft = torch.tensor([1, 2])
    runs = {tuple(rejection_sample(p, draft, q, torch.Generator().manual_seed(7)).tolist()) for _ in range(3)}
    assert len(runs) == 1
