"""Sampling on the device: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

One call per step for the whole batch; the only host transfer is the chosen
tokens (and logprobs when asked). ``sample_on_device`` stops before that
transfer, so async scheduling (``llm_engine.py``) can start it without waiting
and read the tokens one step later; ``sample`` is both halves back to back. Sampling uses the exponential race
(``argmax(p / q)``, ``q ~ Exp(1)``), which draws exactly from ``p``; a request
with a seed draws its ``q`` row from its own ``torch.Generator``, so its tokens
do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onecard.engine.sampling_params import SamplingParams
from onecard.engine.sequence import PLACEHOLDER, Sequence
from onecard.engine.structured import mask_logits_


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: top-k + sampled token, or None when not asked
    sampled_logprobs: list[float]


@dataclass
class DeviceSample:
    """What the sampler chose, still where it was computed: ``tokens`` [B] int64; with logprobs asked, the
    sampled token's raw logprob [B] and the top-``max k`` logprobs and ids [B, k] (else None)."""

    tokens: torch.Tensor
    want_logprobs: list[int | None]
    chosen_logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tokens, self.chosen_logprobs, self.top_logprobs, self.top_ids) if t is not None]


def host_to_device(values: list, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A small per-step parameter tensor on ``dev`` without a host sync (a pageable copy would wait for the GPU)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], drafted: list[list[int]] | None = None,
                  pending: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's ``logit_bias`` added, its stop tokens banned while it is under ``min_tokens``, then its
    penalties (``apply_penalties``, whose arguments these are); the same tensor when no row has any."""
    if any(s.params.logit_bias for s in seqs):
        logits = apply_logit_bias(logits, seqs)
    if any(s.stop_ids for s in seqs):
        logits = ban_early_stops(logits, seqs, drafted)
    if any(s.params.uses_penalties for s in seqs):
        logits = apply_penalties(logits, seqs, drafted, pending)
    return logits


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI's ``logit_bias``: row i's biases added to its tokens' logits (a new tensor)."""
    rows, ids, values = [], [], []
    for i, s in enumerate(seqs):
        for token, bias in (s.params.logit_bias or {}).items():
            rows.append(i)
            ids.append(token)
            values.append(bias)
    dev = logits.device
    index = (host_to_device(rows, torch.long, dev), host_to_device(ids, torch.long, dev))
    return logits.index_put(index, host_to_device(values, torch.float32, dev), accumulate=True)


def ban_early_stops(logits: torch.Tensor, seqs: list[Sequence], drafted: list[list[int]] | None) -> torch.Tensor:
    """``min_tokens``: -inf for the stop tokens of each row whose token would come before its ``min_tokens``-th
    (the row's token is number len(completion) + 1, an in-flight placeholder and the row's drafts counted)."""
    rows, ids = [], []
    for i, s in enumerate(seqs):
        if s.stop_ids and s.num_completion_tokens + (len(drafted[i]) if drafted else 0) < s.params.min_tokens:
            rows += [i] * len(s.stop_ids)
            ids += s.stop_ids
    if not rows:
        return logits
    dev = logits.device
    return logits.index_put((host_to_device(rows, torch.long, dev), host_to_device(ids, torch.long, dev)),
                            torch.tensor(float("-inf"), device=dev))


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], drafted: list[list[int]] | None = None,
                    pending: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition (prompt + output, HF/vLLM rule), presence and frequency (output only) penalties, row i for
    ``seqs[i]``, without waiting for the device. ``drafted[i]``: tokens row i counts as output beyond its
    sequence's own (a speculative verify row: the draft tokens before it, as plain decoding would have generated
    them by then). ``pending`` [B] (on the device): each row's token still in flight under async scheduling,
    which the host holds as a placeholder (the vocabulary size where none), counted as output too."""
    V = logits.shape[1]
    dev = logits.device
    rep = host_to_device([s.params.repetition_penalty for s in seqs], torch.float32, dev).unsqueeze(1)
    pres = host_to_device([s.params.presence_penalty for s in seqs], torch.float32, dev).unsqueeze(1)
    freq = host_to_device([s.params.frequency_penalty for s in seqs], torch.float32, dev).unsqueeze(1)
    outputs = [[t for t in s.completion_token_ids if t != PLACEHOLDER] + (drafted[i] if drafted else [])
               for i, s in enumerate(seqs)]
    out_counts = _counts(outputs, V, dev, pending)
    prompt_seen = _counts([s.token_ids[:s.num_prompt_tokens] for s in seqs], V, dev) > 0
    seen = prompt_seen | (out_counts > 0)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def _counts(rows: list[list[int]], V: int, dev: torch.device, pending: torch.Tensor | None = None) -> torch.Tensor:
    """[len(rows), V] token counts of each row (plus its ``pending`` token: id V counts nowhere)."""
    width = max((len(r) for r in rows), default=0)
    ids = [r + [V] * (width - len(r)) for r in rows]
    counts = torch.zeros(len(rows), V + 1, device=dev)
    if width:
        index = host_to_device(ids, torch.long, dev)
        counts.scatter_add_(1, index, torch.ones(index.shape, device=dev))
    if pending is not None:
        counts.scatter_add_(1, pending.unsqueeze(1), torch.ones(len(rows), 1, device=dev))
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


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's distribution after its temperature (greedy rows: 1), top-k, top-p and min-p, penalties not
    included: what a sampled token is drawn from, and the p and q that speculative rejection sampling compares."""
    dev = logits.device
    temp = host_to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32, dev)
    scaled = logits / temp.unsqueeze(1)
    use_kp = any(p.top_k > 0 or p.top_p < 1 for p in params)
    use_min_p = any(p.min_p > 0 for p in params)
    if use_kp or use_min_p:
        scaled = filter_logits(scaled, host_to_device([p.top_k for p in params], torch.long, dev),
                               host_to_device([p.top_p for p in params], torch.float32, dev),
                               host_to_device([p.min_p for p in params], torch.float32, dev), use_kp, use_min_p)
    return scaled.softmax(-1)


@torch.no_grad()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
    """Choose one token per row of ``logits`` [B, V] (float32) for ``seqs``; waits for the device."""
    return to_host(sample_on_device(logits, seqs))


@torch.no_grad()
def sample_on_device(logits: torch.Tensor, seqs: list[Sequence], pending: torch.Tensor | None = None) -> DeviceSample:
    """Choose one token per row of ``logits`` [B, V] (float32) for ``seqs``, leaving the result on the device:
    nothing here waits for the GPU. ``pending``: the rows' in-flight tokens, for penalties (``apply_penalties``)."""
    dev = logits.device
    params = [s.params for s in seqs]
    want_lp = [p.logprobs for p in params]
    raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in want_lp) else None
    logits = adjust_logits(logits, seqs, pending=pending)
    mask_logits_(logits, seqs)  # structured outputs' grammars (in place; no-op without them)
    if all(p.greedy for p in params):
        tokens = logits.argmax(-1)
    else:
        greedy = host_to_device([p.greedy for p in params], torch.bool, dev)
        probs = sampling_probs(logits, params)
        q = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                q[i] = torch.empty(probs.shape[1], device=dev).exponential_(generator=s.generator)
        sampled = (probs / q).argmax(-1)
        tokens = torch.where(greedy, logits.argmax(-1), sampled)
    out = DeviceSample(tokens, want_lp)
    return with_logprobs(out, raw_logprobs) if raw_logprobs is not None else out


def with_logprobs(ds: DeviceSample, raw_logprobs: torch.Tensor) -> DeviceSample:
    """``ds`` with the chosen tokens' logprobs and the top-``max k`` of ``raw_logprobs`` [B, V] (the model's
    log-softmax, before penalties and temperature, as vLLM reports them)."""
    kmax = max(k for k in ds.want_logprobs if k is not None)
    ds.chosen_logprobs = raw_logprobs.gather(1, ds.tokens.unsqueeze(1)).squeeze(1)
    ds.top_logprobs, ds.top_ids = raw_logprobs.topk(max(kmax, 1), dim=-1)
    return ds


def logprobs_of(raw_logprobs: torch.Tensor, tokens: list[int], want: list[int]) -> SamplerOutput:
    """The host logprobs (top-``want[i]`` and its own) of given ``tokens[i]`` under row i of ``raw_logprobs``:
    scoring tokens that were not sampled here (prompt tokens, verified drafts). One host transfer."""
    ds = DeviceSample(host_to_device(tokens, torch.long, raw_logprobs.device), want)
    return to_host(with_logprobs(ds, raw_logprobs))


def to_host(ds: DeviceSample) -> SamplerOutput:
    """The host lists of a ``DeviceSample`` (a sync unless its tensors were already copied to the host)."""
    token_list = ds.tokens.tolist()
    n = len(token_list)
    lps: list[dict[int, float] | None] = [None] * n
    sampled_lp = [0.0] * n
    if ds.chosen_logprobs is not None:
        chosen = ds.chosen_logprobs.tolist()
        top_v, top_i = ds.top_logprobs.tolist(), ds.top_ids.tolist()
        for i, k in enumerate(ds.want_logprobs):
            sampled_lp[i] = chosen[i]
            if k is not None:
                d = {top_i[i][j]: top_v[i][j] for j in range(k)}
                d[token_list[i]] = chosen[i]
                lps[i] = d
    return SamplerOutput(token_list, lps, sampled_lp)


@dataclass
class PendingSample:
    """A step's sample on its way to the host: the copies were queued behind the step without waiting for it.
    ``result()`` waits for that step alone (its event), not for anything queued after it."""

    host: DeviceSample
    event: torch.cuda.Event | None

    @classmethod
    def start(cls, ds: DeviceSample) -> PendingSample:
        """Queue non-blocking copies of ``ds`` into pinned host memory and an event after them (CPU: as is)."""
        if ds.tokens.device.type != "cuda":
            return cls(ds, None)
        copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                  for t in ds.tensors()]
        it = iter(copies)
        host = DeviceSample(next(it), ds.want_logprobs)
        if ds.chosen_logprobs is not None:
            host.chosen_logprobs, host.top_logprobs, host.top_ids = next(it), next(it), next(it)
        event = torch.cuda.Event()
        event.record()
        return cls(host, event)

    def result(self) -> SamplerOutput:
        if self.event is not None:
            self.event.synchronize()
        return to_host(self.host)
