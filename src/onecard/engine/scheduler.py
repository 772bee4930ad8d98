"""Continuous batching: each step is one prefill batch or one decode batch; FCFS; chunked prefill; preempt by recompute.

A prefill step first continues prompts part-way through chunked prefill, then
admits waiting sequences in arrival order while they fit (``max_num_seqs``, the
``max_num_batched_tokens`` token budget, free blocks); a shared cached prefix
(prefix caching) costs no budget. While others decode, admission waits until
``admit_batch`` seats are free (or every waiting sequence fits, or it has been
held back ``admit_batch`` decode steps with a seat free): a prefill step
pauses every running sequence and streams the weights once, so admitting each
finished sequence's successor alone cost a saturated offline run a one-prompt
prefill step per finish (1000 prompts on an H200: 2,096 steps one by one, 1,715
batched; docs/engine.md). With chunked prefill a prompt longer than the
budget (or than ``long_prefill_chunk``) is computed over several steps, and while
one is in flight prefill and decode steps alternate, so running requests keep
streaming a token every other step instead of stalling for the whole prompt.
When no prefill is scheduled every running sequence decodes one token. If the
cache is full, the most recently admitted running sequence is preempted: its
blocks are freed (its computed full blocks stay in the prefix cache) and it goes
back to the *front* of the waiting queue, to be recomputed when room returns.

``num_cached_tokens`` is advanced when a step is scheduled (the engine always
runs what was scheduled before scheduling again), and blocks are registered in
the prefix cache at the next ``schedule``/``finish``, after their KV was written.
With async scheduling the engine schedules step t+1 while step t still runs:
sequences of step t carry a placeholder last token (``sequence.PLACEHOLDER``)
and are scheduled as if it were known; a sequence whose placeholder already
reaches ``max_tokens`` or ``max_model_len`` is surely finished and is skipped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from onecard.engine.block_manager import BlockManager
from onecard.engine.sequence import Sequence, SequenceStatus
from onecard.engine.speculative import NgramIndex


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_chunk: int | None = None, num_speculative_tokens: int = 0, ngram_size: int = 3,
                 max_model_len: int | None = None,
                 propose: Callable[[list[Sequence], list[int]], list[list[int]]] | None = None,
                 admit_batch: int = 1, ngram_min_size: int = 1) -> None:
        """``long_prefill_chunk=None``: no chunked prefill (each prompt is computed in one step, so it must fit the
        token budget); otherwise the most tokens one sequence's prefill takes per step. ``num_speculative_tokens``
        > 0: decode steps carry drafts: n-gram ones (``speculative.py``: suffixes of ``ngram_size`` down to
        ``ngram_min_size`` tokens looked up), or ``propose``'s
        (a draft model, ``draft_model.py``: given the sequences and how many tokens each may draft, with their
        cache slots already reserved). ``admit_batch``: seats that must be free (or hold the whole queue) before
        waiting sequences join sequences that are decoding."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_chunk = long_prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._last_was_prefill = False
        self.num_speculative_tokens = num_speculative_tokens
        self.ngram_size, self.ngram_min_size = ngram_size, ngram_min_size
        self.max_model_len = max_model_len
        self.propose = propose
        self.admit_batch = admit_batch
        self._held_steps = 0  # decode steps run since a seat was free for the waiting queue but admission waited
        self._ngrams: dict[int, NgramIndex] = {}  # n-gram drafting: each unfinished sequence's index, by seq_id

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences to run this step and whether it is a prefill step (each has ``num_scheduled_tokens``)."""
        for seq in self.running:  # the previous step has run: its full blocks hold KV now
            self.block_manager.register_computed(seq, seq.num_cached_tokens)
        chunking = any(s.needs_prefill for s in self.running)
        decodable = any(not s.needs_prefill for s in self.running)
        if not (chunking and decodable and self._last_was_prefill):
            scheduled = self._schedule_prefill()
            if scheduled:
                self._last_was_prefill = True
                return scheduled, True
        self._last_was_prefill = False
        if self.waiting and len(self.running) < self.max_num_seqs:
            self._held_steps += 1
        return self._schedule_decode(), False

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of this sequence's prompt to compute now (0: it does not fit this step)."""
        n = len(seq) - seq.num_cached_tokens
        if self.long_prefill_chunk is None:
            return n if n <= budget else 0
        return min(n, self.long_prefill_chunk, budget)

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        for seq in self.running:  # prompts part-way through chunked prefill go first, in admission order
            if seq.needs_prefill and budget > 0:
                n = self._chunk(seq, budget)
                if n:
                    self._take_tokens(seq, n)
                    budget -= n
                    scheduled.append(seq)
        admitting = self._admission_open()
        while admitting and self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)  # sets num_cached_tokens to the shared prefix
            n = self._chunk(seq, budget)
            if not n:  # unchunked and over the budget: undo the admission (and its lookup in the hit-rate stats)
                self.block_manager.num_queried_tokens -= len(seq)
                self.block_manager.num_hit_tokens -= seq.num_cached_tokens
                self.block_manager.deallocate(seq)
                break
            self._take_tokens(seq, n)
            budget -= n
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
            self._held_steps = 0
        return scheduled

    def _admission_open(self) -> bool:
        """Whether this step admits waiting sequences at all (seats, blocks and budget are checked one by one)."""
        if not any(not s.needs_prefill for s in self.running):
            return True  # nothing is decoding: nobody waits for this prefill
        if self._held_steps >= self.admit_batch:  # seats rarely free up (long outputs): do not keep one idle forever
            return True
        return self.max_num_seqs - len(self.running) >= min(len(self.waiting), self.admit_batch)

    @staticmethod
    def _take_tokens(seq: Sequence, n: int) -> None:
        seq.num_scheduled_tokens = n
        seq.num_cached_tokens += n

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        pending = deque(self.running)
        while pending and len(scheduled) < self.max_num_seqs:
            seq = pending.popleft()
            if seq.needs_prefill or self._at_limit(seq):
                continue
            while not self.block_manager.can_append(seq):
                victim = pending.pop() if pending else seq  # the most recently admitted one not yet scheduled
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                self._take_tokens(seq, len(seq) - seq.num_cached_tokens)
                scheduled.append(seq)
        if self.num_speculative_tokens and scheduled and all(s.matcher is None for s in scheduled):  # grammars: 1 token
            if self.propose is None:
                for seq in scheduled:
                    index = self._ngrams.get(seq.seq_id)
                    if index is None:
                        index = self._ngrams[seq.seq_id] = NgramIndex(self.ngram_size, self.ngram_min_size)
                    draft = index.propose(seq.token_ids, self._draft_room(seq))
                    if draft and self.block_manager.reserve(seq, len(seq) + len(draft)):  # never preempts anyone
                        self._attach(seq, draft)
            else:
                room = []
                for seq in scheduled:  # slots first: the draft writes its own KV for the tokens it guesses
                    k = self._draft_room(seq)
                    room.append(k if k > 0 and self.block_manager.reserve(seq, len(seq) + k) else 0)
                for seq, draft in zip(scheduled, self.propose(scheduled, room)):
                    if draft:
                        self._attach(seq, draft)
        return scheduled

    def _at_limit(self, seq: Sequence) -> bool:
        """The sequence holds all the tokens it may have (only a placeholder's can: see async scheduling above)."""
        p = seq.params
        return ((p.max_tokens is not None and seq.num_completion_tokens >= p.max_tokens)
                or (self.max_model_len is not None and len(seq) >= self.max_model_len))

    def _draft_room(self, seq: Sequence) -> int:
        """How many draft tokens this step may check for the sequence (max_tokens and max_model_len leave room)."""
        p = seq.params
        k = self.num_speculative_tokens
        if p.max_tokens is not None:
            k = min(k, p.max_tokens - seq.num_completion_tokens - 1)  # the step also adds one token of its own
        if self.max_model_len is not None:
            k = min(k, self.max_model_len - len(seq) - 1)
        return k

    @staticmethod
    def _attach(seq: Sequence, draft: list[int]) -> None:
        """Schedule ``[last token, *draft]`` for verification (the slots are reserved)."""
        seq.draft_tokens = draft
        seq.num_scheduled_tokens = 1 + len(draft)
        seq.num_cached_tokens = len(seq) + len(draft)  # until verification says how many of them stay

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.register_computed(seq, seq.num_cached_tokens)
        self.block_manager.deallocate(seq)
        seq.num_draft_cached_tokens = 0  # its blocks (and the draft KV in them) may go to others
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Free a finished (or aborted) sequence's blocks and drop it from the queues."""
        seq.status = SequenceStatus.FINISHED
        self._ngrams.pop(seq.seq_id, None)
        self.block_manager.register_computed(seq, seq.num_cached_tokens)
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
