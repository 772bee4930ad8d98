"""Prompt-lookup (n-gram) drafting for speculative decoding: no draft model, the context itself proposes.

When the last ``n`` tokens appeared earlier in the sequence (prompt or output),
the tokens that followed them then are a cheap guess of what follows now — the
common case when a model edits code, quotes a document or repeats a list. One
forward over ``[last token, draft...]`` checks every guess at once; under greedy
decoding the accepted tokens are exactly what step-by-step decoding would give.
"""

from __future__ import annotations

from onecard.engine.sampling_params import SamplingParams
from onecard.engine.sequence import Sequence


def propose_ngram(token_ids: list[int], ngram_size: int, num_tokens: int) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the most recent earlier match of the longest suffix n-gram
    (``ngram_size`` down to 1); [] when nothing matches.

    Runs on the host every decode step, so it first lists the earlier positions of the last token (one cheap
    pass) and compares whole n-grams only there: at 900 tokens of context ~75 us instead of ~800 us for slicing
    at every position (measured on a busy CPU), which is as long as a bs=1 decode step of a ~1B model."""
    if num_tokens <= 0 or len(token_ids) < 2:
        return []
    L = len(token_ids)
    last = token_ids[-1]
    ends = [i for i, t in enumerate(token_ids[:-1]) if t == last]  # where an earlier match could end
    for n in range(min(ngram_size, L - 1), 0, -1):
        pattern = token_ids[L - n:]
        for end in reversed(ends):  # most recent earlier occurrence first
            if end >= n - 1 and token_ids[end - n + 1:end + 1] == pattern:
                return token_ids[end + 1:end + 1 + num_tokens]
    return []


def why_not_speculative(params: SamplingParams) -> str | None:
    """What keeps a request off speculative decoding (None: nothing). Only greedy requests without penalties or
    logprobs speculate: for them accepting the draft prefix that equals the argmax at each position is exactly
    non-speculative decoding (sampled requests would need rejection sampling, which is not built)."""
    if not params.greedy:
        return f"temperature={params.temperature}"
    if params.uses_penalties:
        return "repetition/presence/frequency penalties"
    if params.logprobs is not None:
        return f"logprobs={params.logprobs}"
    return None


def can_speculate(seq: Sequence) -> bool:
    return why_not_speculative(seq.params) is None


def accept_greedy(draft: list[int], targets: list[int]) -> list[int]:
    """The tokens to append: the draft's prefix that matches the model's argmax, then the model's next token."""
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return targets[:n + 1]
