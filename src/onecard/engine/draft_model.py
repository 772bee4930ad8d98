"""Draft-model speculative decoding: a small model of the same tokenizer proposes k tokens, the target checks them.

The draft has its own paged KV cache that *mirrors* the target's: the same
number of blocks, addressed through the target's block tables (as vLLM's
first speculative decoder did), so one ``BlockManager`` owns both caches and
prefix sharing, preemption and freeing need nothing new. The target's start-up
sizing pays for both caches per block (``ModelRunner(draft_model=...)``).

The draft's KV lags the target's: nothing runs on the draft during prefill or
ordinary decode steps. ``Sequence.num_draft_cached_tokens`` counts the leading
tokens whose draft KV is valid; before proposing, the draft catches up over the
missing tokens (the prefix-attention path, in chunks of the step token budget),
then decodes k tokens one batched step at a time (CUDA graphs where the target
has them). After verification the count is rolled back to the accepted length
(``rollback``): KV the draft wrote for rejected tokens is overwritten later.

None of this can change the output: the target verifies every proposal, so a
stale or imprecise draft cache only lowers the acceptance rate.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from onecard.engine.config import EngineConfig
from onecard.engine.model_runner import DecodeRow, ModelRunner
from onecard.engine.sampler import sampling_probs
from onecard.engine.sequence import Sequence
from onecard.errors import BadInputError, UnsupportedModelError
from onecard.models import SUPPORTED_ARCHITECTURES, open_model_folder
from onecard.models.llama import LlamaModel

log = logging.getLogger(__name__)


class _Chunk:
    """A catch-up window of a sequence, shaped as ``ModelRunner.prepare_prefill`` reads it."""

    __slots__ = ("token_ids", "block_table", "num_cached_tokens", "num_scheduled_tokens", "length")

    def __init__(self, seq: Sequence, end: int, n: int) -> None:
        self.token_ids, self.block_table, self.length = seq.token_ids, seq.block_table, len(seq)
        self.num_cached_tokens, self.num_scheduled_tokens = end, n

    def __len__(self) -> int:
        return self.length


class DraftProposer:
    """k-token proposals from the draft model for a decode batch (``Scheduler(propose=...)``)."""

    def __init__(self, runner: ModelRunner, max_num_batched_tokens: int) -> None:
        self.runner = runner
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_catch_up_tokens = 0  # draft prefill work: prompts and tokens decoded without speculation
        self.num_draft_steps = 0      # batched draft decode forwards
        self.draft_probs: dict[int, torch.Tensor] = {}  # seq_id -> q [k, V] of the last proposal (sampled requests)

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """``num_tokens[i]`` draft tokens for ``seqs[i]`` (0: none); their slots must be reserved already. Greedy
        requests get the draft's argmax; sampled ones a draw from the draft's q (after the request's temperature
        / top-k / top-p / min-p, from its own generator), and q is kept in ``draft_probs`` for verification."""
        active = [i for i, k in enumerate(num_tokens) if k > 0]
        self._catch_up([seqs[i] for i in active])
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: dict[int, list[torch.Tensor]] = {seqs[i].seq_id: [] for i in active if not seqs[i].params.greedy}
        while active:
            rows = [DecodeRow(drafts[i][-1] if drafts[i] else seqs[i].last_token, len(seqs[i]) + len(drafts[i]),
                          seqs[i].block_table) for i in active]
            logits = self.runner.decode_logits(rows).float()
            tokens = logits.argmax(-1)
            sampled = [j for j, i in enumerate(active) if seqs[i].seq_id in probs]
            if sampled:
                q = sampling_probs(logits[sampled], [seqs[active[j]].params for j in sampled])
                for row, j in zip(q, sampled):
                    seq = seqs[active[j]]
                    race = torch.empty_like(row).exponential_(generator=seq.generator)
                    tokens[j] = (row / race).argmax()
                    probs[seq.seq_id].append(row)
            self.num_draft_steps += 1
            for i, t in zip(active, tokens.tolist()):
                drafts[i].append(t)
            active = [i for i in active if len(drafts[i]) < num_tokens[i]]
        for seq, d in zip(seqs, drafts):
            if d:  # KV written for the last token and every draft token but the final one
                seq.num_draft_cached_tokens = len(seq) + len(d) - 1
        self.draft_probs = {sid: torch.stack(rows) for sid, rows in probs.items()}
        return drafts

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Write draft KV for every token before each sequence's last, at most a step's token budget per forward."""
        pending = [s for s in seqs if s.num_draft_cached_tokens < len(s) - 1]
        while pending:
            batch, budget = [], self.max_num_batched_tokens
            for s in pending:
                n = min(len(s) - 1 - s.num_draft_cached_tokens, budget)
                if n <= 0:
                    break
                batch.append(_Chunk(s, s.num_draft_cached_tokens + n, n))
                budget -= n
            ids, positions, meta, _ = self.runner.prepare_prefill(batch)
            self.runner.model(ids, positions, meta)
            for s, c in zip(pending, batch):
                s.num_draft_cached_tokens = c.num_cached_tokens
                self.num_catch_up_tokens += c.num_scheduled_tokens
            pending = [s for s in pending if s.num_draft_cached_tokens < len(s) - 1]

    @staticmethod
    def rollback(seq: Sequence) -> None:
        """After verification appended tokens: draft KV past the newest token's position belongs to a rejected
        guess (the accepted draft tokens are the tokens now there, so their KV stays valid)."""
        seq.num_draft_cached_tokens = min(seq.num_draft_cached_tokens, len(seq) - 1)


def check_draft(draft_folder, target_folder, draft_tokenizer, target_tokenizer, max_model_len: int) -> None:
    """Refuse a draft that cannot propose tokens the target understands; warn when it is not smaller."""
    d_args, t_args = draft_folder.model_args(), target_folder.model_args()
    if d_args.vocab_size != t_args.vocab_size or len(draft_tokenizer) != len(target_tokenizer):
        raise BadInputError(
            f"speculative_model '{draft_folder.path}' has vocab_size={d_args.vocab_size} (tokenizer "
            f"{len(draft_tokenizer)} tokens) but the target has vocab_size={t_args.vocab_size} (tokenizer "
            f"{len(target_tokenizer)}); use a draft from the same model family")
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise BadInputError(f"speculative_model '{draft_folder.path}' has a different tokenizer than the target "
                            f"(both {len(target_tokenizer)} tokens, different ids); use a draft from the same family")
    if d_args.max_position_embeddings < max_model_len:
        raise BadInputError(f"speculative_model '{draft_folder.path}' handles {d_args.max_position_embeddings} "
                            f"positions, less than max_model_len={max_model_len}; lower max_model_len")
    if d_args.num_parameters() >= t_args.num_parameters():
        log.warning("the draft model (%.1fM parameters) is not smaller than the target (%.1fM): speculation will "
                    "be slower than plain decoding", d_args.num_parameters() / 1e6, t_args.num_parameters() / 1e6)


def load_draft(config: EngineConfig, target_folder, target_tokenizer, dtype: torch.dtype, device: torch.device,
               progress: bool = False) -> LlamaModel:
    """Load ``config.speculative_model`` onto the target's device in its dtype (and its on-the-fly quantization)."""
    from onecard.engine.llm import _load_model

    folder = open_model_folder(config.speculative_model, supported=None)
    if not any(a in SUPPORTED_ARCHITECTURES for a in folder.config.get("architectures") or []):
        raise UnsupportedModelError(f"speculative_model '{folder.path}' is {folder.config.get('architectures')}; "
                                    f"the draft must run on onecard's own forward ({', '.join(SUPPORTED_ARCHITECTURES)})")
    check_draft(folder, target_folder, folder.load_tokenizer(), target_tokenizer, config.max_model_len)
    quantization = config.quantization if folder.quantization_config is None else None
    # the draft's own rounding never reaches the output (the target verifies every token): it keeps the bs=1 GEMV
    draft_config = dataclasses.replace(config, model=folder.path, quantization=quantization, offload_layers=0,
                                       speculative_model=None, num_speculative_tokens=0)
    return _load_model(folder, draft_config, dtype, device, progress)


def build_proposer(draft: LlamaModel, config: EngineConfig, target: ModelRunner) -> DraftProposer:
    """The draft's runner: a cache of the target's block count (its blocks mirror the target's), decode graphs."""
    # the draft decodes one row per sequence: its graphs need not hold the target's verify rows
    draft_config = dataclasses.replace(config, model=config.speculative_model, num_kv_blocks=target.num_blocks,
                                       offload_layers=0, speculative_model=None, num_speculative_tokens=0)
    return DraftProposer(ModelRunner(draft, draft_config, target.device), config.max_num_batched_tokens)
