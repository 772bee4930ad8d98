"""Runs the model for a scheduled batch: KV-cache sizing and allocation, input packing, CUDA-graph decode, sampling.

Prefill packs all scheduled sequences end to end (no padding) and computes
logits only for each sequence's last token. Decode runs one token per sequence;
on CUDA it replays a CUDA graph captured for the smallest captured batch size
that holds the batch (padding rows write to a scratch block nobody reads), so a
decode step is a handful of host-to-device copies plus one graph launch: no
host syncs until the sampled tokens come back. ``launch_decode`` does not even
wait for those: a decode row may take its input token straight from the
previous step's sample on the device (``prev_rows``), so the host can prepare
step t+1 while the GPU still runs step t (async scheduling, ``llm_engine.py``).
A speculative verify step is a decode step too: each sequence's ``[last token,
*draft]`` become k + 1 rows of the same graphs (``verify``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from onecard.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from onecard.engine.kv_cache import allocate_kv_cache, attach_kv_cache
from onecard.engine.sampler import (
    PendingSample,
    SamplerOutput,
    logprobs_of,
    sample,
    sample_on_device,
)
from onecard.engine.sequence import Sequence
from onecard.engine.speculative import accept_drafts, verified_outputs
from onecard.errors import BadInputError, DoesNotFitError
from onecard.kernels.kv_quant import SCALE_DTYPE, kv_storage
from onecard.kernels.paged_attention import SPLIT_BIG_BATCH_SPLITS
from onecard.kernels.wo_matmul import dequant_min_rows, dequant_scratch_bytes
from onecard.models.llama import AttentionMetadata, LlamaModel
from onecard.quant.linear import QuantLinear

log = logging.getLogger(__name__)
GiB = 1 << 30


def kv_bytes_per_token(model: LlamaModel, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """K and V of one token over all layers in the cache's storage (``dtype`` is the model's), plus the per-head
    scales an fp8/int8 cache keeps beside it: what one token costs, so the block count follows the format."""
    a = model.args
    elem, scaled = kv_storage(kv_cache_dtype, dtype)
    per_head = a.head_dim * elem.itemsize + (SCALE_DTYPE.itemsize if scaled else 0)
    return 2 * a.num_layers * a.num_kv_heads * per_head


# Fixed headroom kept free for what start-up cannot profile: cuBLAS/Triton workspaces, the CUDA-graph pools' own
# fragmentation, the sampler's per-step temporaries at odd batch sizes. Measured need on an H100 is ~100-200 MiB.
FIXED_HEADROOM_BYTES = 384 << 20


def graph_batch_sizes(max_bs: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, 16, 32, 48, ... up to ``max_bs``."""
    return sorted({b for b in [1, 2, 4, 8, *range(16, max_bs + 1, 16)] if b <= max_bs} | {max_bs})


def cuda_graph_workspace_bytes(batch_sizes: list[int], vocab_size: int, hidden_size: int, elem_bytes: int) -> int:
    """Memory the captured decode graphs keep alive after start-up: each graph's logits output stays allocated
    (``sum(batch sizes) x vocab``), plus the shared pool that holds the largest batch's activations (generous:
    ~16 hidden-sized rows per token for qkv, gate/up, attention and residual temporaries), plus fp32 logits and
    the sampler's sort for the largest batch. The pool also holds the decode attention's split partials: up to
    ``SPLIT_BIG_BATCH_SPLITS`` fp32 rows of head_dim per query head (~hidden) for each sequence."""
    max_bs = max(batch_sizes, default=0)
    outputs = sum(batch_sizes) * vocab_size * elem_bytes
    pool = max_bs * hidden_size * (16 * elem_bytes + 4 * SPLIT_BIG_BATCH_SPLITS)
    sampler = max_bs * vocab_size * 4 * 3  # float logits + sorted values + indices (int64 counted as two floats)
    return outputs + pool + sampler


def dequantized_shapes(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """``(K, N, dequant_min_rows)`` of the quantized linears that run ``wo_matmul`` (not PyTorch's int4 kernel):
    those whose weight is dequantized into a scratch buffer from that many rows."""
    return [(m.in_features, m.out_features, dequant_min_rows(m.bits, m.group_size, m.in_features))
            for m in model.modules() if isinstance(m, QuantLinear) and m.tg_weight is None]


def graph_rows(max_num_seqs: int, num_speculative_tokens: int, cuda_graph_max_batch: int) -> int:
    """Rows the largest captured decode graph holds: a speculative step verifies ``1 + num_speculative_tokens``
    rows per sequence through the same graphs (``ModelRunner.verify``). The planner's preflight sizes the graph
    workspace with this same function."""
    return min(max_num_seqs * (1 + num_speculative_tokens), cuda_graph_max_batch)


def graph_max_batch(config: EngineConfig) -> int:
    return graph_rows(config.max_num_seqs, config.num_speculative_tokens, config.cuda_graph_max_batch)


class DecodeRow:
    """One decode row that is not a whole sequence (a verify step's draft position, a draft model's guess), shaped
    as ``prepare_decode`` reads it: ``last_token`` at position ``length - 1`` of ``block_table``."""

    __slots__ = ("last_token", "length", "block_table")

    def __init__(self, last_token: int, length: int, block_table: list[int]) -> None:
        self.last_token, self.length, self.block_table = last_token, length, block_table

    def __len__(self) -> int:
        return self.length


@dataclass
class KVCachePlan:
    """How start-up splits a (possibly capped) card: the inputs, what is left for the KV cache and how many blocks.

    The budget is ``min(cap_bytes * utilization - reserved, free - (1 - utilization) * cap_bytes)`` minus the
    activation peak and the workspace: ``torch.cuda.set_per_process_memory_fraction`` limits the *reserved*
    bytes of this process, so the cap is counted against ``memory_reserved()``, not the driver's free memory
    (which includes other processes and the CUDA context); the free-memory term keeps us off memory another
    process already holds.
    """

    card_bytes: int
    cap_bytes: int
    reserved_bytes: int
    activation_peak_bytes: int
    workspace_bytes: int
    block_bytes: int
    utilization: float
    available_bytes: int
    num_blocks: int

    def describe(self) -> str:
        return (f"cap {self.cap_bytes / GiB:.2f} GiB x {self.utilization}, reserved {self.reserved_bytes / GiB:.2f} GiB, "
                f"activation peak {self.activation_peak_bytes / GiB:.2f} GiB, graphs/sampler/workspace "
                f"{self.workspace_bytes / GiB:.2f} GiB")

    def check(self, max_model_len: int, block_size: int, weight_bytes: int) -> None:
        """Raise ``DoesNotFitError`` (with the numbers and the knobs) when one max_model_len sequence cannot fit."""
        if self.num_blocks * block_size >= max_model_len:
            return
        need = math.ceil(max_model_len / block_size) * self.block_bytes
        raise DoesNotFitError(
            f"the KV cache needs {need / GiB:.2f} GiB for one {max_model_len}-token sequence but only "
            f"{max(self.available_bytes, 0) / GiB:.2f} GiB is left (weights {weight_bytes / GiB:.2f} GiB; "
            f"{self.describe()}); lower max_model_len or max_num_batched_tokens, raise gpu_memory_utilization, "
            "or use quantization='rtn-int4'")


def plan_kv_cache(card_bytes: int, cap_fraction: float, reserved_bytes: int, activation_peak_bytes: int,
                  block_bytes: int, utilization: float, workspace_bytes: int = 0, free_bytes: int | None = None,
                  fixed_headroom_bytes: int = FIXED_HEADROOM_BYTES) -> KVCachePlan:
    """Pure KV-cache sizing (no CUDA calls, so it is unit-tested on CPU with the H100's numbers)."""
    cap = int(card_bytes * min(cap_fraction, 1.0))
    budget = cap * utilization - reserved_bytes
    if free_bytes is not None:
        budget = min(budget, free_bytes - (1 - utilization) * cap)
    workspace = workspace_bytes + fixed_headroom_bytes
    available = int(budget - activation_peak_bytes - workspace)
    return KVCachePlan(card_bytes, cap, reserved_bytes, activation_peak_bytes, workspace, block_bytes, utilization,
                       available, max(available // block_bytes, 0))


def prefill_chunk(seq: Sequence) -> tuple[int, int]:
    """(end, n): the prefill step computes positions ``end - n .. end - 1`` of the sequence (``num_scheduled_tokens``
    ending at ``num_cached_tokens``, as the scheduler sets them; a sequence never scheduled, e.g. the vision path's,
    prefills all its uncached tokens)."""
    if seq.num_scheduled_tokens:
        return seq.num_cached_tokens, seq.num_scheduled_tokens
    return len(seq), len(seq) - seq.num_cached_tokens


PROMPT_LOGPROB_ROWS = 256  # logits rows per pass when scoring a prompt: 256 x a 128k vocabulary is 128 MiB in fp32


def take_previous(tokens: torch.Tensor, prev_rows: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """``tokens`` with row i replaced by ``sampled[prev_rows[i]]`` where ``prev_rows[i] >= 0``: a decode step's
    input tokens taken on the device from the step before, which the host has not seen yet."""
    return torch.where(prev_rows >= 0, sampled.index_select(0, prev_rows.clamp(min=0)), tokens)


class ModelRunner:
    def __init__(self, model: LlamaModel, config: EngineConfig, device: torch.device,
                 draft_model: LlamaModel | None = None) -> None:
        """``draft_model``: a speculative draft whose KV cache (``draft_model.py``) will mirror this one block for
        block, so the measured block count pays for both caches and for the draft's decode graphs."""
        self.model, self.config, self.device = model, config, device
        self.draft_model = draft_model
        self.block_size = config.block_size
        self.dtype = next(model.parameters()).dtype
        self.is_cuda = device.type == "cuda"
        self.decode_attention = "triton" if self.is_cuda else "reference"
        self.fused_rope_store = self.is_cuda and config.fused_rope_store
        self.fused_prefill_rope = self.fused_rope_store and config.fused_prefill_rope
        cc = torch.cuda.get_device_capability(device) if self.is_cuda else None
        if cc is not None and cc < (8, 9) and config.kv_cache_dtype.startswith("fp8"):
            raise BadInputError(f"kv_cache_dtype={config.kv_cache_dtype!r} needs an fp8-capable GPU (compute "
                                f"capability 8.9+: RTX 40xx, L4, H100), this one is {cc}; use kv_cache_dtype='int8'")
        self.max_blocks_per_seq = math.ceil(config.max_model_len / self.block_size)
        self.num_blocks = config.num_kv_blocks or self._measure_num_blocks()
        if self.num_blocks * self.block_size < config.max_model_len:
            raise DoesNotFitError(
                f"the KV cache holds {self.num_blocks * self.block_size} tokens, less than one max_model_len="
                f"{config.max_model_len} sequence; lower max_model_len, or give the cache more room "
                "(num_kv_blocks / gpu_memory_utilization)")
        self.scratch_block = self.num_blocks  # one extra block: CUDA-graph padding rows write here
        # fp8/int8 caches come with per-(token, kv head) scales (None for "auto")
        self.kv_cache, self.kv_scales = allocate_kv_cache(model.args, self.num_blocks + 1, self.block_size,
                                                          config.kv_cache_dtype, self.dtype, device)
        attach_kv_cache(model, self.kv_cache, self.kv_scales)
        # the last decode step's sampled tokens, on the device: the next step's inputs for rows that name them
        self._sampled = torch.zeros(config.max_num_seqs, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_batch_sizes: list[int] = []
        if self.is_cuda and not config.enforce_eager:
            self.capture_cudagraphs()

    # ---- KV cache sizing -------------------------------------------------------------------------------------
    def _measure_num_blocks(self) -> int:
        cfg = self.config
        per_block = kv_bytes_per_token(self.model, self.dtype, cfg.kv_cache_dtype) * self.block_size
        if self.draft_model is not None:
            per_block += kv_bytes_per_token(self.draft_model, self.dtype, cfg.kv_cache_dtype) * self.block_size
        if not self.is_cuda:
            want = cfg.max_model_len * cfg.max_num_seqs * per_block // self.block_size
            budget = max(min(want, CPU_KV_CACHE_BYTES), cfg.max_model_len * per_block // self.block_size)
            return max(1, math.ceil(budget / per_block))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self._profile_run()
        except torch.cuda.OutOfMemoryError:
            raise DoesNotFitError(
                f"a {cfg.max_num_batched_tokens}-token prefill does not fit next to the weights; lower "
                "max_num_batched_tokens / max_model_len, or use quantization='rtn-int4'") from None
        torch.cuda.synchronize(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        torch.cuda.empty_cache()  # the profile's activations come back as headroom below, not as reserved bytes
        free, card_total = torch.cuda.mem_get_info(self.device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        max_bs = graph_max_batch(cfg)
        plan = plan_kv_cache(
            card_bytes=card_total, cap_fraction=torch.cuda.get_per_process_memory_fraction(index),
            reserved_bytes=torch.cuda.memory_reserved(self.device), free_bytes=free,
            activation_peak_bytes=peak - current, block_bytes=per_block, utilization=cfg.gpu_memory_utilization,
            workspace_bytes=0 if cfg.enforce_eager else sum(cuda_graph_workspace_bytes(
                graph_batch_sizes(max_bs), m.args.vocab_size, m.args.hidden_size, self.dtype.itemsize)
                + dequant_scratch_bytes(dequantized_shapes(m), max_bs, self.dtype.itemsize)
                for m in (self.model, self.draft_model) if m is not None))
        weights = sum(p.numel() * p.element_size() for m in (self.model, self.draft_model) if m is not None
                      for p in m.parameters())
        plan.check(cfg.max_model_len, self.block_size, weights)
        log.info("KV cache: %d blocks x %d tokens = %.2f GiB (%s)", plan.num_blocks, self.block_size,
                 plan.num_blocks * per_block / GiB, plan.describe())
        return plan.num_blocks

    @torch.no_grad()
    def _profile_run(self) -> None:
        """The largest step the scheduler can issue: a full max_num_batched_tokens prefill + sampling of max_num_seqs."""
        cfg = self.config
        n = cfg.max_num_batched_tokens
        seq_lens = [cfg.max_model_len] * (n // cfg.max_model_len) + ([n % cfg.max_model_len] if n % cfg.max_model_len else [])
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(s, device=self.device) for s in seq_lens])
        meta = AttentionMetadata(True, torch.zeros(n, dtype=torch.long, device=self.device), seq_lens=seq_lens)
        hidden = self.model(ids, positions, meta)  # no cache attached yet: nothing is stored
        rows = hidden[:1].expand(min(cfg.max_num_seqs, n), -1)
        logits = self.model.compute_logits(rows).float()
        logits.log_softmax(-1).sort(-1, descending=True)
        del hidden, logits

    # ---- input packing ---------------------------------------------------------------------------------------
    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self.is_cuda)
        return t.to(self.device, non_blocking=True)

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Pack each sequence's prefill chunk (``prefill_chunk``); the last index tensor holds the rows of the
        sequences whose prompt completes now (the ones that sample)."""
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        seq_lens: list[int] = []
        prefix_lens: list[int] = []
        last: list[int] = []
        bs = self.block_size
        for seq in seqs:
            end, n = prefill_chunk(seq)
            ids.extend(seq.token_ids[end - n:end])
            pos = torch.arange(end - n, end)
            positions.append(pos)
            slots.append(torch.tensor(seq.block_table)[pos // bs] * bs + pos % bs)
            seq_lens.append(n)
            prefix_lens.append(end - n)
            if end >= len(seq):
                last.append(sum(seq_lens) - 1)
        dev = self.device
        meta = AttentionMetadata(True, torch.cat(slots).to(dev, non_blocking=True), seq_lens=seq_lens,
                                 decode_attention=self.decode_attention, fused_rope_store=self.fused_prefill_rope)
        if any(prefix_lens):  # some context is already cached: attend over the paged cache
            width = max(len(s.block_table) for s in seqs)
            meta.prefix_lens = prefix_lens
            meta.block_tables = self._to_device([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                                torch.int32)
        return (self._to_device(ids, torch.long), torch.cat(positions).to(dev, non_blocking=True), meta,
                self._to_device(last, torch.long))

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int], list[int], list[list[int]]]:
        """Per row: input token, position, cache slot, context length, block table (one pass over ``seqs``)."""
        bs = self.block_size
        ids, positions, slots, ctx, tables = [], [], [], [], []
        for s in seqs:
            p = len(s) - 1
            ids.append(s.last_token)
            positions.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
            ctx.append(p + 1)
            tables.append(s.block_table)
        return ids, positions, slots, ctx, tables

    # ---- forward ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> SamplerOutput | None:
        """Compute the scheduled tokens; sample for the sequences whose every token now has KV (all of a decode
        batch; in a prefill batch, those whose last prompt chunk ran). None when nobody samples."""
        if is_prefill:
            ids, positions, meta, last = self.prepare_prefill(seqs)
            hidden = self.model(ids, positions, meta)
            if any(s.prompt_logprobs is not None for s in seqs):
                self.score_prompts(seqs, hidden)
            seqs = [s for s in seqs if s.num_cached_tokens >= len(s)]
            if not seqs:
                return None
            logits = self.model.compute_logits(hidden.index_select(0, last))
        else:
            logits = self.decode_logits(seqs)
        return sample(logits.float(), seqs)

    def score_prompts(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        """Append to each scoring sequence's ``prompt_logprobs`` the entries its prefill chunk computed: position p
        scores prompt token p + 1 (top-k and its own, raw logprobs as for generated tokens). Entries already
        there (a recompute after preemption) are not added again."""
        start = 0
        for seq in seqs:
            end, n = prefill_chunk(seq)
            done = seq.prompt_logprobs
            if done is not None:
                first, stop = max(end - n, len(done) - 1), min(end, seq.num_prompt_tokens - 1)
                for a in range(first, stop, PROMPT_LOGPROB_ROWS):
                    b = min(a + PROMPT_LOGPROB_ROWS, stop)
                    rows = hidden[start + a - (end - n):start + b - (end - n)]
                    logprobs = self.model.compute_logits(rows).float().log_softmax(-1)
                    done.extend(logprobs_of(logprobs, seq.token_ids[a + 1:b + 1],
                                            [seq.params.prompt_logprobs] * (b - a)).logprobs)
            start += n

    @torch.no_grad()
    def launch_decode(self, seqs: list[Sequence], prev_rows: list[int]) -> PendingSample:
        """Queue a decode step and its sampling without waiting for the device; the host reads the tokens later
        (``PendingSample.result``). ``prev_rows[i] >= 0``: row i's input token is row ``prev_rows[i]`` of the
        previous ``launch_decode``'s sample (the host holds only a placeholder for it yet)."""
        logits = self.decode_logits(seqs, prev_rows).float()
        pending = None
        if any(s.params.uses_penalties for s in seqs):  # the in-flight tokens count for penalties (vocab: none)
            rows = self._to_device(prev_rows, torch.long)
            pending = take_previous(torch.full_like(rows, logits.shape[1]), rows, self._sampled)
        ds = sample_on_device(logits, seqs, pending)
        self.keep_sample(ds.tokens)
        return PendingSample.start(ds)

    def keep_sample(self, tokens: torch.Tensor) -> None:
        """Keep a launched step's sampled tokens on the device, where the next step's ``prev_rows`` take them."""
        self._sampled[:len(tokens)].copy_(tokens)

    def decode_logits(self, seqs: list[Sequence], prev_rows: list[int] | None = None) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one decode token per sequence (its last token, at position ``len - 1``; for
        rows with ``prev_rows[i] >= 0``, the previous decode step's sampled token instead, see ``launch_decode``)."""
        B = len(seqs)
        graph_bs = next((b for b in self.graph_batch_sizes if b >= B), None) if self.graphs else None
        if graph_bs is None:
            ids, positions, slots, ctx, tables = self.prepare_decode(seqs)
            width = max(len(t) for t in tables)
            bt = self._to_device([t + [0] * (width - len(t)) for t in tables], torch.int32)
            meta = AttentionMetadata(False, self._to_device(slots, torch.long), context_lens=self._to_device(ctx, torch.int32),
                                     block_tables=bt, decode_attention=self.decode_attention,
                                     fused_rope_store=self.fused_rope_store,
                                     fused_attention=self.config.fuses_decode_attention())
            tokens = self._to_device(ids, torch.long)
            if prev_rows is not None:
                tokens = take_previous(tokens, self._to_device(prev_rows, torch.long), self._sampled)
            hidden = self.model(tokens, self._to_device(positions, torch.long), meta)
            return self.model.compute_logits(hidden)
        self.fill_static_inputs(seqs, graph_bs, prev_rows)
        self.graphs[graph_bs].replay()
        return self._graph_logits[graph_bs][:B]

    @torch.no_grad()
    def verify(self, seqs: list[Sequence], draft_probs: dict[int, torch.Tensor] | None = None) -> list[SamplerOutput]:
        """Speculative decode step: ``[last token, *draft]`` of each sequence run as decode rows, row i at
        position ``len - 1 + i`` attending to ``len + i`` cached tokens; returns, per sequence, the tokens it
        keeps (accepted draft prefix + one model token: greedy match, or rejection sampling for sampled requests
        with the draft model's q from ``draft_probs`` by ``seq_id``, see ``speculative.accept_drafts``) and their
        logprobs when its request asks.

        Every row goes through the decode path (paged decode attention, the decode CUDA graph of the smallest
        captured size that holds all rows), not the prefill/prefix path: each row's attention is computed exactly
        as plain decoding computes it for that token, since all rows' keys/values are stored before any row
        attends and a row sees only the ``len + i`` tokens up to itself. What may still differ from plain
        decoding is the matmuls' rounding at M = rows instead of M = 1 (cuBLAS may pick another kernel).
        """
        logits = self.verify_logits(seqs)
        return verified_outputs(seqs, logits, accept_drafts(seqs, logits, draft_probs or {}))

    def verify_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        """The target's float32 logits of every verify row (``verify``'s forward alone)."""
        rows = [DecodeRow(tok, len(seq) + i, seq.block_table)
                for seq in seqs for i, tok in enumerate([seq.last_token, *seq.draft_tokens])]
        return self.decode_logits(rows).float()

    # ---- CUDA graphs -----------------------------------------------------------------------------------------
    def alloc_static_inputs(self, max_bs: int) -> None:
        """The fixed-address inputs a captured decode reads: rows of ``meta`` are token ids, positions, cache
        slots, context lengths and the previous step's sample row to take the token from (-1: none), one int64
        tensor so a step is one host-to-device copy; plus block tables. Two pinned host staging buffers
        alternate, so writing step t+1's inputs never races the still-queued copy of step t's: safe while the
        host is at most one decode step ahead of the GPU (the engine reads step t back before launching t+2)."""
        scratch = self.scratch_block
        meta = torch.zeros(5, max_bs, dtype=torch.long, device=self.device)
        meta[2] = scratch * self.block_size
        meta[3] = 1
        meta[4] = -1
        self._gbuf = {"meta": meta, "block_tables": torch.full((max_bs, self.max_blocks_per_seq), scratch,
                                                                dtype=torch.int32, device=self.device)}
        pin = self.is_cuda
        self._staging = [(torch.empty(5 * max_bs, dtype=torch.long, pin_memory=pin),
                          torch.empty(max_bs * self.max_blocks_per_seq, dtype=torch.int32, pin_memory=pin))
                         for _ in range(2)]
        self._staging_turn = 0

    def fill_static_inputs(self, seqs: list[Sequence], graph_bs: int, prev_rows: list[int] | None = None) -> None:
        """Write a decode batch into the static inputs; rows past the batch attend to and write the scratch block."""
        ids, positions, slots, ctx, tables = self.prepare_decode(seqs)
        B = len(seqs)
        meta_buf, bt_buf = self._staging[self._staging_turn]
        self._staging_turn ^= 1
        host_t = meta_buf[:5 * graph_bs].view(5, graph_bs)
        host = host_t.numpy()
        host[0, :B], host[1, :B], host[2, :B], host[3, :B] = ids, positions, slots, ctx
        host[4, :B] = -1 if prev_rows is None else prev_rows
        host[0, B:], host[1, B:], host[2, B:], host[3, B:], host[4, B:] = 0, 0, self.scratch_block * self.block_size, 1, -1
        if prev_rows is not None:
            host[0, :B][host[4, :B] >= 0] = 0  # placeholders: the graph takes these tokens from the last sample
        g = self._gbuf
        pin = self.is_cuda
        g["meta"][:, :graph_bs].copy_(host_t, non_blocking=pin)
        width = max(len(t) for t in tables)
        rows_t = bt_buf[:graph_bs * width].view(graph_bs, width)
        rows = rows_t.numpy()
        rows.fill(self.scratch_block)
        for i, t in enumerate(tables):
            rows[i, :len(t)] = t
        g["block_tables"][:graph_bs, :width].copy_(rows_t, non_blocking=pin)

    def split_rows(self, bs: int) -> int | None:
        """The row count a ``bs``-row graph plans its split-KV attention for: 1 for the graphs that hold one
        sequence's speculative verify rows, so a verified token's attention sums in plain bs=1 decode's order and
        greedy speculation stays token-identical in bf16 (``split_plan`` otherwise picks longer partitions for
        more rows, and a near-tie can flip); ``None`` (the batch's own plan) for every other graph."""
        k = self.config.num_speculative_tokens
        if not k:
            return None
        one_seq = next((b for b in graph_batch_sizes(graph_max_batch(self.config)) if b >= 1 + k), None)
        return 1 if one_seq is not None and bs <= one_seq else None

    def static_step(self, bs: int) -> torch.Tensor:
        """Decode the first ``bs`` rows of the static inputs: what each CUDA graph captures."""
        g = self._gbuf
        meta = AttentionMetadata(False, g["meta"][2, :bs], context_lens=g["meta"][3, :bs],
                                 block_tables=g["block_tables"][:bs], decode_attention=self.decode_attention,
                                 fused_rope_store=self.fused_rope_store,
                                 fused_attention=self.config.fuses_decode_attention(),
                                 split_rows=self.split_rows(bs))
        tokens = take_previous(g["meta"][0, :bs], g["meta"][4, :bs], self._sampled)
        return self.model.compute_logits(self.model(tokens, g["meta"][1, :bs], meta))

    @torch.no_grad()
    def capture_cudagraphs(self) -> None:
        """Capture decode (model + lm_head) for batch sizes 1, 2, 4, 8, 16, 32, ... up to ``graph_max_batch``."""
        max_bs = graph_max_batch(self.config)
        sizes = graph_batch_sizes(max_bs)
        self.graph_batch_sizes = sizes
        self.alloc_static_inputs(max_bs)
        self._graph_logits: dict[int, torch.Tensor] = {}
        pool = None
        for bs in reversed(sizes):
            self.static_step(bs)  # warm-up: compiles the Triton kernels, settles the allocator
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._graph_logits[bs] = self.static_step(bs)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for decode batch sizes %s", sizes)
