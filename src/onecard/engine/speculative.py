"""Prompt-lookup (n-gram) drafting for speculative decoding: no draft model, the context itself proposes.

When the last ``n`` tokens appeared earlier in the sequence (prompt or output),
the tokens that followed them then are a cheap guess of what follows now — the
common case when a model edits code, quotes a document or repeats a list. One
forward over ``[last token, draft...]`` checks every guess at once; under greedy
decoding the accepted tokens are exactly what step-by-step decoding would give.
"""

from __future__ import annotations

import torch

from onecard.engine.rejection_sampler import rejection_sample
from onecard.engine.sampler import host_to_device, sampling_probs
from onecard.engine.sampling_params import SamplingParams
from onecard.engine.sequence import Sequence

# The engine options that put plain decoding on the kernels a speculative engine runs (it turns the bs=1 GEMV and
# one-launch decode attention off: a verify step's k+1 rows go through cuBLAS, and through the three-launch
# attention, since one launch would read a sibling row's keys/values before they are stored). Greedy speculation is
# token-identical to plain decoding on these kernels; other kernels round differently, and a near-tie can flip.
VERIFIER_KERNELS = {"decode_gemv": False, "fused_decode_attention": False}


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
    """What keeps a request off speculative decoding (None: nothing). Greedy requests accept the draft prefix
    that equals the argmax at each position, sampled ones rejection-sample (``rejection_sampler.py``); both give
    exactly what non-speculative decoding gives (in distribution, for sampling). Penalties and logprobs are not
    built into verification (penalties would change with every accepted token), so those requests decode plainly."""
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


def accept_drafts(seqs: list[Sequence], logits: torch.Tensor, draft_probs: dict[int, torch.Tensor]) -> list[list[int]]:
    """The tokens each sequence keeps from a verify step: ``logits`` [sum(k_i + 1), V] (float32) are the target's
    rows ``[last token, *draft]`` of each sequence in order; ``draft_probs`` holds the draft model's q [k, V] by
    ``seq_id`` for sampled sequences (absent: an n-gram draft, a point mass). One host transfer for the batch."""
    sizes = [1 + len(s.draft_tokens) for s in seqs]
    greedy = [s.params.greedy for s in seqs]
    targets = logits.argmax(-1).tolist() if any(greedy) else []  # as the sampler picks greedy tokens
    per_seq = logits.split(sizes)
    sampled = []
    for seq, rows, g in zip(seqs, per_seq, greedy):
        if not g:
            p = sampling_probs(rows, [seq.params] * rows.shape[0])
            draft = host_to_device(seq.draft_tokens, torch.long, logits.device)
            sampled.append(rejection_sample(p, draft, draft_probs.get(seq.seq_id), seq.generator))
    decided = iter(torch.stack(sampled).tolist() if sampled else [])
    out, start = [], 0
    for seq, n, g in zip(seqs, sizes, greedy):
        if g:
            out.append(accept_greedy(seq.draft_tokens, targets[start:start + n]))
        else:
            num_accepted, token = next(decided)
            out.append(seq.draft_tokens[:num_accepted] + [token])
        start += n
    return out
