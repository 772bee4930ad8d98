"""Speculative sampling for temperature > 0: rejection sampling of draft tokens (Leviathan et al. 2023, Chen et
al. 2023; vLLM's ``RejectionSampler``).

With the target's distribution ``p`` and the draft's ``q`` at each draft position (both after the request's
temperature / top-k / top-p / min-p, ``sampler.sampling_probs``; ``p`` after its penalties too), draft token ``x`` is accepted with probability
``min(1, p(x) / q(x))``; at the first rejection the token is drawn from ``normalize(max(0, p - q))``, and when
all k are accepted a bonus token is drawn from ``p`` at position k + 1. Every emitted token is then distributed
exactly as plain sampling from ``p`` would give. An n-gram draft is a point mass (``q = one_hot(x)``): accept with
probability ``p(x)``, else draw from ``p`` without ``x``.

All draws of a sequence come from its own ``torch.Generator`` when it has a seed (k uniforms, then one
exponential-race row per position), so the same seed and the same k give the same tokens.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def rejection_sample(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None) -> torch.Tensor:
    """``[num accepted draft tokens n, token at position n]`` (int64, on the device; no host sync) for one
    sequence: ``target_probs`` [k + 1, V], ``draft_tokens`` [k], ``draft_probs`` [k, V] (None: point masses)."""
    k, V = draft_tokens.shape[0], target_probs.shape[1]
    dev = target_probs.device
    q = draft_probs if draft_probs is not None else torch.nn.functional.one_hot(draft_tokens, V).to(target_probs.dtype)
    p_x = target_probs[:k].gather(1, draft_tokens.unsqueeze(1)).squeeze(1)
    q_x = q.gather(1, draft_tokens.unsqueeze(1)).squeeze(1)
    u = torch.rand(k, device=dev, generator=generator)
    accepted = (u * q_x < p_x).long()  # u < p/q without dividing by a q that rounds to 0
    n = accepted.cumprod(0).sum()
    residual = (target_probs[:k] - q).clamp_min(0)
    # p == q leaves no residual, but then no draft token can be rejected; the fallback only avoids an empty row
    residual = torch.where(residual.sum(1, keepdim=True) > 0, residual, target_probs[:k])
    rows = torch.cat([residual, target_probs[k:k + 1]])
    race = torch.empty(k + 1, V, device=dev).exponential_(generator=generator)
    candidates = (rows / race).argmax(1)  # exponential race: draws each row's (unnormalized) distribution exactly
    return torch.stack([n, candidates[n]])
