"""One sequence being generated (a request with n>1 has n of them) and the request that groups them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum, auto

import torch

from onecard.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()
# Async scheduling: the token of a decode step still running on the GPU. At most one, always last in token_ids,
# so lengths, positions and cache slots are right for the next step; the engine writes the real id once it is
# known (a step later) and never shows a placeholder to the caller.
PLACEHOLDER = -1


class Sequence:
    """Token ids (prompt + generated), where its KV lives (``block_table``) and its decoding state.

    ``num_cached_tokens`` counts leading tokens whose KV is in the cache (or is
    being written by the step just scheduled): shared prefix blocks, earlier
    prefill chunks, decoded tokens. ``num_scheduled_tokens`` is how many tokens
    the current step computes for it (a prefill chunk, or 1 when decoding).
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0
        self.block_hashes: list[int] = []  # prefix-cache hashes of its leading full, computed blocks
        self.draft_tokens: list[int] = []  # speculative decoding: guesses checked by this step
        self.num_draft_cached_tokens = 0  # draft-model speculation: leading tokens with valid draft KV
        self.matcher = None  # structured outputs: its xgrammar GrammarMatcher (structured.py)
        self.stop_ids: list[int] = []  # min_tokens: the tokens that would end it (EOS, stop_token_ids), set by the engine
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # prompt_logprobs: entry p for prompt token p, None for the first (nothing predicts it); filled by prefill
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.cumulative_logprob = 0.0
        # incremental detokenization state (see detokenizer.py)
        self.text = ""
        self.read_offset = self.num_prompt_tokens
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def drop_placeholder(self) -> None:
        """Forget an in-flight token (the sequence was aborted while a step for it was still running)."""
        if self.token_ids and self.token_ids[-1] == PLACEHOLDER:
            self.token_ids.pop()

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def needs_prefill(self) -> bool:
        """More than the last token still lacks KV (a waiting prompt, or one part-way through chunked prefill).
        With exactly one token left, a decode step computes it and samples, the same as a 1-token prefill."""
        return len(self.token_ids) - self.num_cached_tokens > 1

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
