"""``LLMEngine``: requests in, one scheduler step at a time, cumulative ``RequestOutput``s out.

Not thread-safe by itself: ``LLM`` drives it from one thread; ``AsyncEngine``
drives it from its background thread and hands requests over under a lock.

Async scheduling (``EngineConfig.async_scheduling``): in a decode step the
host launches step t+1 before it has read step t's tokens. Step t+1's rows take
their input token on the device from step t's sample (``ModelRunner.launch_decode``);
the host holds a placeholder meanwhile (``sequence.PLACEHOLDER``), then reads step
t's tokens from pinned memory, and does the stop checks, detokenization and
outputs for them while the GPU computes step t+1. So outputs lag one step, and a
sequence that stops at step t has already been computed once more in step t+1:
that token is discarded, never shown. Penalties count a row's in-flight token
on the device (``sampler.apply_penalties(pending=...)``). Only decode steps
overlap; any other step runs as before, after the
step in flight has been read back (a prefill step is queued first, as its
sequences are never in flight, but it still waits for its own sample).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from onecard.engine.block_manager import BlockManager
from onecard.engine.config import EngineConfig
from onecard.engine.detokenizer import append_text, find_stop
from onecard.engine.draft_model import DraftProposer
from onecard.engine.model_runner import ModelRunner
from onecard.engine.outputs import CompletionOutput, RequestOutput
from onecard.engine.sampler import PendingSample, SamplerOutput
from onecard.engine.sampling_params import SamplingParams
from onecard.engine.scheduler import Scheduler
from onecard.engine.sequence import PLACEHOLDER, Request, Sequence
from onecard.engine.structured import Grammars, accept, matcher
from onecard.errors import BadInputError


@dataclass
class InFlight:
    """A decode step launched but not yet read back: its sequences in row order and its pending sample."""

    seqs: list[Sequence]
    sample: PendingSample

    def rows(self) -> dict[int, int]:
        return {s.seq_id: i for i, s in enumerate(self.seqs)}


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner, tokenizer, eos_token_ids: set[int],
                 drafter: DraftProposer | None = None) -> None:
        """``drafter``: the draft model's proposer when ``config.speculative_model`` is set (else n-gram drafts)."""
        self.config = config
        self.runner = runner
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.long_prefill_chunk if config.enable_chunked_prefill else None,
                                   config.num_speculative_tokens, config.ngram_size, config.max_model_len,
                                   drafter.propose if drafter is not None else None, config.admit_batch_size,
                                   config.ngram_min_size)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.requests: dict[str, Request] = {}
        self.vocab_size = runner.model.args.vocab_size
        self.num_generated_tokens = 0
        # Streaming callers (AsyncEngine) need the text as it grows; offline callers only need it at the end,
        # which saves two tokenizer calls per sequence per step (unless a request has stop strings).
        self.incremental_text = False
        self.overlap = config.overlaps(runner.is_cuda)  # async scheduling of decode steps
        self.grammars = Grammars(tokenizer, self.vocab_size, eos_token_ids)
        self.in_flight: InFlight | None = None

    # ---- requests ----------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise BadInputError("prompt is empty; pass at least one character or token id")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise BadInputError("prompt is empty; pass at least one character or token id")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise BadInputError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            return None, list(prompt)
        raise BadInputError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")

    def validate(self, prompt: str | list[int], params: SamplingParams | None) -> tuple[str | None, list[int], SamplingParams]:
        """Check a request without queueing it (no engine state touched): (prompt text, token ids, params)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise BadInputError(f"sampling_params must be a SamplingParams, not {type(params).__name__}")
        text, ids = self.encode(prompt)
        out_of_vocab = [t for t in params.logit_bias or {} if t >= self.vocab_size]
        if out_of_vocab:
            raise BadInputError(f"logit_bias token id {out_of_vocab[0]} is outside the vocabulary [0, {self.vocab_size})")
        if params.structured is not None:
            self.grammars.compile(params)  # a schema or regex xgrammar rejects fails here, before queueing
        if len(ids) >= self.config.max_model_len:
            raise BadInputError(f"prompt is {len(ids)} tokens but max_model_len={self.config.max_model_len} leaves no "
                                "room to generate; shorten the prompt or raise max_model_len")
        return text, ids, params

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Request:
        """Validate and queue a request; raises ``BadInputError`` without touching other requests."""
        if request_id in self.requests:
            raise BadInputError(f"request_id '{request_id}' is already in use; pass a unique id")
        text, ids, params = self.validate(prompt, params)
        grammar = self.grammars.compile(params) if params.structured is not None else None  # xgrammar's cache hit
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seqs.append(Sequence(request_id, i, ids, params, gen))
            if grammar is not None:
                seqs[-1].matcher = matcher(grammar)
            if params.min_tokens:
                seqs[-1].stop_ids = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else
                                                                         self.eos_token_ids))
        req = Request(request_id, text, ids, params, seqs, arrival_time or time.time())
        self.requests[request_id] = req
        for s in seqs:
            self.scheduler.add(s)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (finish_reason 'abort')."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.seqs:
            if not s.is_finished:
                s.drop_placeholder()
                s.finish_reason = "abort"
                self.scheduler.finish(s)
        req.finished_time = time.time()
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ----------------------------------------------------------------------------------------------
    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of every request that advanced (finished ones are removed).

        ``stream=False`` returns only the requests that finished in this step.
        """
        seqs, is_prefill = self.scheduler.schedule()
        in_flight, self.in_flight = self.in_flight, None
        touched: dict[str, Request] = {}
        if not is_prefill and seqs and self.overlap and all(s.matcher is None for s in seqs):
            rows = in_flight.rows() if in_flight is not None else {}
            launched = self.runner.launch_decode(seqs, [rows.get(s.seq_id, -1) for s in seqs])
            if in_flight is not None:  # the GPU runs the step just launched while the host reads the one before
                self._read_back(in_flight, touched)
            outputs = self._collect(touched, time.time(), stream)
            self.in_flight = InFlight(seqs, launched)
            for s in seqs:
                if not s.is_finished:  # one that stopped at the step read back: this step's token is discarded
                    s.token_ids.append(PLACEHOLDER)
            return outputs
        if in_flight is not None and not is_prefill:  # a decode batch may hold in-flight sequences: tokens first
            self._read_back(in_flight, touched)
            in_flight = None
            seqs = [s for s in seqs if not s.is_finished]
        if not seqs:
            return self._collect(touched, time.time(), stream)
        if not is_prefill and any(s.draft_tokens for s in seqs):
            return self._speculative_step(seqs, stream)
        out = self.runner.run(seqs, is_prefill)
        if in_flight is not None:  # a prefill never holds an in-flight sequence, so it was launched before this wait
            self._read_back(in_flight, touched)
        if out is not None:  # None: only partial prefill chunks ran, nothing to report yet
            sampled = [s for s in seqs if s.num_cached_tokens >= len(s)]  # the runner's rows, in order
            for seq in sampled:
                seq.token_ids.append(PLACEHOLDER)
            self._apply(sampled, out, touched)
        return self._collect(touched, time.time(), stream)

    def _read_back(self, in_flight: InFlight, touched: dict[str, Request]) -> None:
        """Wait for an in-flight decode step (alone) and apply its tokens; rows of sequences that finished since
        it was launched (a stop at the step before, an abort) are dropped."""
        out = in_flight.sample.result()
        self._apply(in_flight.seqs, out, touched)

    def _apply(self, seqs: list[Sequence], out: SamplerOutput, touched: dict[str, Request]) -> None:
        """Put each sampled token in place of its sequence's placeholder, then check stops and free the finished."""
        now = time.time()
        for seq, token, lp, slp in zip(seqs, out.token_ids, out.logprobs, out.sampled_logprobs):
            if seq.is_finished:
                continue
            seq.token_ids[-1] = token
            self.num_generated_tokens += 1
            if seq.logprobs is not None:
                seq.logprobs.append(lp)
                seq.cumulative_logprob += slp
            req = self.requests[seq.request_id]
            req.first_token_time = req.first_token_time or now
            self._check_finish(seq, token)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            touched[req.request_id] = req

    def _collect(self, touched: dict[str, Request], now: float, stream: bool) -> list[RequestOutput]:
        outputs = []
        for req in touched.values():
            if req.finished:
                req.finished_time = now
                del self.requests[req.request_id]
                outputs.append(self._output(req))
            elif stream:
                outputs.append(self._output(req))
        return outputs

    def _speculative_step(self, seqs: list[Sequence], stream: bool) -> list[RequestOutput]:
        """Verify every sequence's draft in one forward and append what plain decoding would have produced
        (greedy: the same tokens; sampled: tokens of the same distribution, by rejection sampling)."""
        verified = self.runner.verify(seqs, self.drafter.draft_probs if self.drafter is not None else None)
        now = time.time()
        touched: dict[str, Request] = {}
        for seq, out in zip(seqs, verified):
            self.num_draft_tokens += len(seq.draft_tokens)
            self.num_accepted_tokens += len(out.token_ids) - 1
            seq.draft_tokens = []
            for token, lp, slp in zip(out.token_ids, out.logprobs, out.sampled_logprobs):
                seq.token_ids.append(token)
                if seq.logprobs is not None:
                    seq.logprobs.append(lp)
                    seq.cumulative_logprob += slp
                self.num_generated_tokens += 1
                self._check_finish(seq, token)
                if seq.finish_reason is not None:
                    break
            seq.num_cached_tokens = len(seq) - 1  # KV is valid up to the token before the newest one
            if self.drafter is not None:
                self.drafter.rollback(seq)
            req = self.requests[seq.request_id]
            req.first_token_time = req.first_token_time or now
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            touched[req.request_id] = req
        return self._collect(touched, now, stream)

    def _check_finish(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.matcher is not None and accept(seq, token):  # the grammar ended (on an end-of-sequence token)
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            seq.finish_reason = "stop"  # the stop token stays in token_ids, not in the text
        elif self.incremental_text or p.stop:
            new = append_text(self.tokenizer, seq)
            cut = find_stop(seq, len(new)) if seq.num_completion_tokens >= p.min_tokens else -1
            if cut >= 0:
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
        if seq.finish_reason is None and ((p.max_tokens is not None and seq.num_completion_tokens >= p.max_tokens)
                                          or len(seq) >= self.config.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None and not (self.incremental_text or p.stop):
            body = seq.completion_token_ids[:-1] if seq.finish_reason == "stop" else seq.completion_token_ids
            seq.text = self.tokenizer.decode(body, skip_special_tokens=p.skip_special_tokens)

    def _output(self, req: Request) -> RequestOutput:
        comps = [CompletionOutput(s.index, s.text, s.completion_token_ids, s.finish_reason,
                                  list(s.logprobs) if s.logprobs is not None else None,
                                  s.cumulative_logprob if s.logprobs is not None else None) for s in req.seqs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comps, req.finished, {
            "arrival_time": req.arrival_time, "first_token_time": req.first_token_time,
            "finished_time": req.finished_time, "num_prompt_tokens": len(req.prompt_token_ids),
            "num_generated_tokens": sum(s.num_completion_tokens for s in req.seqs)},
            list(req.seqs[0].prompt_logprobs) if req.seqs[0].prompt_logprobs is not None else None)

    def stats(self) -> dict:
        bm = self.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "num_requests": len(self.requests), "kv_blocks_total": bm.num_blocks, "kv_blocks_used": used,
                "kv_usage": used / bm.num_blocks, "block_size": bm.block_size,
                "num_preemptions": self.scheduler.num_preemptions,
                "prefix_caching": bm.enable_prefix_caching, "prefix_cache_hit_rate": bm.hit_rate,
                "prefix_cache_hit_tokens": bm.num_hit_tokens, "prefix_cache_queried_tokens": bm.num_queried_tokens,
                "prefix_cache_blocks": bm.num_cached_blocks, "prefix_cache_evictions": bm.num_evictions,
                "chunked_prefill": self.scheduler.long_prefill_chunk is not None,
                "spec_draft_tokens": self.num_draft_tokens, "spec_accepted_tokens": self.num_accepted_tokens,
                "spec_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
                "spec_method": ("draft_model" if self.drafter is not None else "ngram") if self.config.num_speculative_tokens else None,
                "spec_draft_model_steps": self.drafter.num_draft_steps if self.drafter is not None else 0,
                "spec_draft_model_catch_up_tokens": self.drafter.num_catch_up_tokens if self.drafter is not None else 0,
                "num_generated_tokens": self.num_generated_tokens,
                "max_model_len": self.config.max_model_len, "max_num_seqs": self.config.max_num_seqs,
                "cuda_graphs": sorted(self.runner.graphs)}
