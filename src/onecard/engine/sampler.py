"""Sampling on the device: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

One call per step for the whole batch; the only host transfer is the chosen
tokens (and logprobs when asked). Sampling uses the exponential race
(``argmax(p / q)``, ``q ~ Exp(1)``), which draws exactly from ``p``; a request
with a seed draws its ``q`` row from its own ``torch.Generator``, so its tokens
do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onecard.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: top-k + sampled token, or None when not asked
    sampled_logprobs: list[float]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (prompt + output, HF/vLLM rule), presence and frequency (output only) penalties."""
    V = logits.shape[1]
    dev = logits.device
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev).unsqueeze(1)
    pres = torch.tensor([s.params.presence_penalty for s in seqs], device=dev).unsqueeze(1)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev).unsqueeze(1)
    out_counts = _counts([s.completion_token_ids for s in seqs], V, dev)
    prompt_seen = _counts([s.token_ids[:s.num_prompt_tokens] for s in seqs], V, dev) > 0
    seen = prompt_seen | (out_counts > 0)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def _counts(rows: list[list[int]], V: int, dev: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), max(width, 1)), V, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r)
    counts = torch.zeros(len(rows), V + 1, device=dev)
    counts.scatter_add_(1, ids.to(dev), torch.ones(ids.shape, device=dev))
    return counts[:, :V]


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  use_top_k_p: bool, use_min_p: bool) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k / top-p nucleus / min-p floor; always keeps the argmax."""
    if use_top_k_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        V = logits.shape[-1]
        rank = torch.arange(V, device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, V).unsqueeze(1)
        drop = rank >= k
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly better tokens
        drop |= before >= top_p.unsqueeze(1)
        drop[:, 0] = False
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if use_min_p:
        probs = logits.softmax(-1)
        floor = min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


@torch.no_grad()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
    """Choose one token per row of ``logits`` [B, V] (float32) for ``seqs``."""
    dev = logits.device
    params = [s.params for s in seqs]
    want_lp = [p.logprobs for p in params]
    raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in want_lp) else None
    if any(p.uses_penalties for p in params):
        logits = apply_penalties(logits, seqs)
    if all(p.greedy for p in params):
        tokens = logits.argmax(-1)
    else:
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
        scaled = logits / temp.unsqueeze(1)
        use_kp = any(p.top_k > 0 or p.top_p < 1 for p in params)
        use_min_p = any(p.min_p > 0 for p in params)
        if use_kp or use_min_p:
            scaled = filter_logits(
                scaled, torch.tensor([p.top_k for p in params], device=dev),
                torch.tensor([p.top_p for p in params], device=dev),
                torch.tensor([p.min_p for p in params], device=dev), use_kp, use_min_p)
        probs = scaled.softmax(-1)
        q = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                q[i] = torch.empty(probs.shape[1], device=dev).exponential_(generator=s.generator)
        sampled = (probs / q).argmax(-1)
        tokens = torch.where(greedy, logits.argmax(-1), sampled)
    token_list = tokens.tolist()
    lps: list[dict[int, float] | None] = [None] * len(seqs)
    sampled_lp = [0.0] * len(seqs)
    if raw_logprobs is not None:
        kmax = max(k for k in want_lp if k is not None)
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        top_v, top_i = raw_logprobs.topk(max(kmax, 1), dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for i, k in enumerate(want_lp):
            sampled_lp[i] = chosen[i]
            if k is not None:
                d = {top_i[i][j]: top_v[i][j] for j in range(k)}
                d[token_list[i]] = chosen[i]
                lps[i] = d
    return SamplerOutput(token_list, lps, sampled_lp)
