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
from onecard.engine.sampler import (
    SamplerOutput,
    adjust_logits,
    host_to_device,
    logprobs_of,
    sampling_probs,
)
from onecard.engine.sequence import Sequence

# The engine options that put plain decoding on the kernels a speculative engine runs (it turns the bs=1 GEMV and
# one-launch decode attention off: a verify step's k+1 rows go through cuBLAS, and through the three-launch
# attention, since one launch would read a sibling row's keys/values before they are stored). Greedy speculation is
# token-identical to plain decoding on these kernels; other kernels round differently, and a near-tie can flip.
VERIFIER_KERNELS = {"decode_gemv": False, "fused_decode_attention": False}


class NgramIndex:
    """A sequence's prompt-lookup drafter: the latest end position of each of its 1..``ngram_size``-grams, kept up
    to date as the sequence grows, so a draft costs ``ngram_size`` dict lookups plus indexing the tokens appended
    since the last call, not a pass over the whole context.

    Why: it runs on the host inside every speculative step, where nothing overlaps it. Scanning the context
    instead took 37 us a step at 1k tokens and 1.1 ms at 32k, against 8.2 us and 70 us with the index (its
    one-off build over the prompt included; ``docs/results/engine_ngram_draft.json``); a verify step of the ~1B
    copy model takes ~0.8 ms (``benchmarks/engine_speculative.py``).
    """

    def __init__(self, ngram_size: int, min_size: int = 1) -> None:
        self.ngram_size, self.min_size = ngram_size, min_size
        self.latest: list[dict[tuple[int, ...], int]] = [{} for _ in range(min_size, ngram_size + 1)]  # [n - min]
        self.indexed = 0  # n-grams ending before this position are in ``latest``

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` tokens that followed the most recent earlier match of the longest suffix n-gram
        (``ngram_size`` down to ``min_size``); [] when nothing matches. Earlier: ending before the last token, so
        the suffix never matches itself. Only the last token may change between calls (async scheduling's
        placeholder), and it is never indexed."""
        L = len(token_ids)
        for n, latest in enumerate(self.latest, start=self.min_size):  # n-grams ending at indexed .. L - 2, C loops
            lo = max(self.indexed, n - 1)
            grams = zip(*(token_ids[lo - n + 1 + i:L - n + i] for i in range(n)))
            latest.update(zip(grams, range(lo, L - 1)))  # later ends overwrite earlier ones: the latest stays
        self.indexed = max(self.indexed, L - 1)
        if num_tokens <= 0:
            return []
        for n in range(min(self.ngram_size, L - 1), self.min_size - 1, -1):
            end = self.latest[n - self.min_size].get(tuple(token_ids[L - n:]))
            if end is not None:
                return token_ids[end + 1:end + 1 + num_tokens]
        return []


def accept_greedy(draft: list[int], targets: list[int]) -> list[int]:
    """The tokens to append: the draft's prefix that matches the model's argmax, then the model's next token."""
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return targets[:n + 1]


def accept_drafts(seqs: list[Sequence], logits: torch.Tensor, draft_probs: dict[int, torch.Tensor]) -> list[list[int]]:
    """The tokens each sequence keeps from a verify step: ``logits`` [sum(k_i + 1), V] (float32) are the target's
    rows ``[last token, *draft]`` of each sequence in order; ``draft_probs`` holds the draft model's q [k, V] by
    ``seq_id`` for sampled sequences (absent: an n-gram draft, a point mass). One host transfer for the batch.

    Logit biases and penalties apply per row as plain decoding would apply them at that position: with the
    draft tokens before the row counted as output (a rejected draft's later rows are never used, so counting them
    is exact)."""
    sizes = [1 + len(s.draft_tokens) for s in seqs]
    logits = adjust_logits(logits, [s for s, n in zip(seqs, sizes) for _ in range(n)],
                           [s.draft_tokens[:i] for s, n in zip(seqs, sizes) for i in range(n)])
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


def verified_outputs(seqs: list[Sequence], logits: torch.Tensor, kept: list[list[int]]) -> list[SamplerOutput]:
    """Each sequence's kept tokens as a ``SamplerOutput``, with the logprobs its request asks for: a kept
    token's logprobs are its verify row's, which is the row plain decoding computes for that position (the
    rows of ``logits`` as in ``accept_drafts``). One host transfer for the batch, none without logprobs."""
    rows, tokens, want = [], [], []
    start = 0
    for seq, toks in zip(seqs, kept):
        if seq.params.logprobs is not None:
            rows += range(start, start + len(toks))
            tokens += toks
            want += [seq.params.logprobs] * len(toks)
        start += 1 + len(seq.draft_tokens)
    flat = None
    if rows:
        flat = logprobs_of(logits[host_to_device(rows, torch.long, logits.device)].log_softmax(-1), tokens, want)
    outs, at = [], 0
    for seq, toks in zip(seqs, kept):
        if seq.params.logprobs is None:
            outs.append(SamplerOutput(toks, [None] * len(toks), [0.0] * len(toks)))
        else:
            outs.append(SamplerOutput(toks, flat.logprobs[at:at + len(toks)], flat.sampled_logprobs[at:at + len(toks)]))
            at += len(toks)
    return outs
