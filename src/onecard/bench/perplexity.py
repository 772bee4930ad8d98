"""Sliding-window perplexity (the protocol HF documents for fixed-length models).

The text's token stream is scored in windows of ``context`` tokens moved by
``stride``; each window scores only its last ``stride`` tokens (the first
window scores all), so every token is predicted with at least
``context - stride`` tokens of history. Report context and stride with the number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from onecard.errors import BadInputError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    tokens_scored: int
    context: int
    stride: int

    def protocol(self) -> str:
        return f"sliding window, context {self.context}, stride {self.stride}, {self.tokens_scored} tokens scored"


@torch.no_grad()
def sliding_window_perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], token_ids: torch.Tensor,
                              context: int = 512, stride: int = 256, max_tokens: int | None = None) -> PerplexityResult:
    """``logits_fn(ids[1, T]) -> logits[1, T, V]``; ``token_ids`` is 1-D."""
    if stride <= 0 or stride > context:
        raise BadInputError(f"stride must be in 1..context ({context}), got {stride}")
    ids = token_ids.flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise BadInputError("text too short for perplexity: need at least 2 tokens")
    total_nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + context, ids.numel())
        window = ids[begin:end].unsqueeze(0)
        logits = logits_fn(window).float()
        n_new = end - prev_end if begin else end
        targets = window[0, 1:].to(logits.device)  # the model may live on the GPU, the ids on the CPU
        lp = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        take = min(n_new, lp.numel())
        total_nll -= lp[-take:].sum().item()
        scored += take
        prev_end = end
        if end == ids.numel():
            break
    nll = total_nll / scored
    return PerplexityResult(math.exp(nll), nll, scored, context, stride)


def hf_logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Adapter for a transformers causal LM."""
    device = next(model.parameters()).device
    return lambda ids: model(input_ids=ids.to(device)).logits
