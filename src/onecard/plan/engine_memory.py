"""What onecard's engine reserves at start-up on a card, predicted before anything is loaded.

The engine does not allocate "enough KV cache for max_model_len": it loads the
weights, profiles one forward of ``max_num_batched_tokens`` tokens plus the
sampling of ``max_num_seqs`` rows, and fills what is left of
``gpu_memory_utilization`` with KV blocks
(``onecard.engine.model_runner.plan_kv_cache``). So the engine's footprint is
the card's budget, and the question a user asks ("how long a context, how many
sequences") is answered by how many blocks that budget holds. This module calls
the engine's own pure sizing functions with the planner's byte counts, so the
two never disagree on the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onecard.plan import memory as M
from onecard.plan.card_memory import CardMemory
from onecard.plan.spec import ModelSpec

# The engine's cap on CUDA-graph decode batch sizes (EngineConfig.cuda_graph_max_batch's default).
CUDA_GRAPH_MAX_BATCH = 256


@dataclass(frozen=True)
class EngineMemory:
    """The engine's start-up split of one card, in bytes (a prediction of ``ModelRunner._measure_num_blocks``)."""

    weights_bytes: int
    activation_bytes: int  # the profiled prefill + sampling peak (freed again, kept as headroom)
    workspace_bytes: int  # graph outputs/pool, sampler, dequant scratch at the largest captured batch (0 if eager)
    headroom_bytes: int  # the engine's fixed headroom for what start-up cannot profile
    outside_bytes: int  # CUDA context and other processes
    held_bytes: int  # what this process's allocator already held before the engine started
    budget_bytes: int  # what the allocator may reserve (card budget at gpu_memory_utilization)
    block_bytes: int
    block_size: int
    kv_blocks: int

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV pool holds (shared by all sequences)."""
        return self.kv_blocks * self.block_size

    @property
    def kv_pool_bytes(self) -> int:
        """The pool as allocated: ``kv_blocks`` plus the scratch block CUDA-graph padding rows write to."""
        return (self.kv_blocks + 1) * self.block_bytes if self.kv_blocks else 0

    @property
    def fixed_bytes(self) -> int:
        """Everything but the KV pool that start-up needs room for."""
        return self.weights_bytes + self.activation_bytes + self.workspace_bytes + self.headroom_bytes

    @property
    def reserved_bytes(self) -> int:
        """Device memory the engine's process holds once running: context, weights, KV pool, activation peak, graphs.

        The fixed headroom is left free on purpose, so it is not counted.
        """
        return (self.outside_bytes + self.held_bytes + self.weights_bytes + self.kv_pool_bytes + self.activation_bytes
                + self.workspace_bytes)

    def need_bytes(self, tokens: int) -> int:
        """Allocator bytes start-up needs for a pool of ``tokens`` (whole blocks): compare with ``budget_bytes``."""
        return self.fixed_bytes + math.ceil(tokens / self.block_size) * self.block_bytes


def _dequantized_shapes(spec: ModelSpec, fmt: str) -> list[tuple[int, int, int]]:
    """``(K, N, dequant_min_rows)`` of the engine's fused linears (qkv, o, gate/up, down) when ``fmt`` runs
    ``wo_matmul``, which dequantizes the weight into a scratch buffer at large batch
    (``model_runner.dequantized_shapes``): int4 in groups of ``memory.GROUP_SIZE``, int8 per channel."""
    from onecard.kernels.wo_matmul import dequant_min_rows

    if fmt not in ("int4", "int8"):
        return []
    bits = 4 if fmt == "int4" else 8
    return [(k, n, dequant_min_rows(bits, M.GROUP_SIZE if bits == 4 else k, k))
            for k, n in spec.args.fused_linear_shapes()]


def engine_memory(spec: ModelSpec, fmt: str, memory: CardMemory, utilization: float, max_num_seqs: int,
                  max_num_batched_tokens: int, block_size: int = 16, kv_cache_dtype: str = "auto",
                  enforce_eager: bool = False, cuda_graph_max_batch: int = CUDA_GRAPH_MAX_BATCH,
                  num_speculative_tokens: int = 0, draft: ModelSpec | None = None) -> EngineMemory:
    """Predict the engine's start-up split of ``memory`` for ``spec`` with weights in ``fmt``.

    ``draft``: a speculative draft model (``speculative_model``), held as the engine holds it: its weights in
    the same format, its KV cache mirroring the target's block for block (so a block costs both), and its
    decode graphs beside the target's.

    Weights are allocator-rounded (``M.weight_tensors``); the activation peak is
    the profile run's (``M.inference_activation_bytes`` over
    ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sampled rows); the
    graph workspace and the KV blocks come from the engine's own
    ``cuda_graph_workspace_bytes`` and ``plan_kv_cache``. A quantized format adds
    its dequantized scratch weight to both where the batch reaches
    ``wo_matmul``'s dequantize + GEMM path.
    """
    from onecard.engine.model_runner import (FIXED_HEADROOM_BYTES, cuda_graph_workspace_bytes, graph_batch_sizes,
                                             graph_rows, plan_kv_cache)
    from onecard.kernels.wo_matmul import dequant_scratch_bytes

    models = [spec] if draft is None else [spec, draft]
    weights = sum(M.reserved_bytes(M.weight_tensors(m, fmt)) for m in models)
    elem = 4 if fmt == "fp32" else 2
    act = (M.inference_activation_bytes(spec, max_num_batched_tokens, max_num_seqs, 0)
           + dequant_scratch_bytes(_dequantized_shapes(spec, fmt), max_num_batched_tokens, elem))
    sizes = graph_batch_sizes(graph_rows(max_num_seqs, num_speculative_tokens, cuda_graph_max_batch))
    workspace = 0 if enforce_eager else sum(cuda_graph_workspace_bytes(sizes, m.args.vocab_size, m.args.hidden_size,
                                                                       elem)
                                            + dequant_scratch_bytes(_dequantized_shapes(m, fmt), max(sizes), elem)
                                            for m in models)
    block = sum(M.kv_bytes_per_token(m, kv_cache_dtype) for m in models) * block_size
    free_after_load = memory.free_bytes - weights
    kv = plan_kv_cache(card_bytes=memory.total_bytes, cap_fraction=memory.cap_fraction,
                       reserved_bytes=memory.reserved_bytes + weights, activation_peak_bytes=act, block_bytes=block,
                       utilization=utilization, workspace_bytes=workspace, free_bytes=free_after_load)
    return EngineMemory(weights_bytes=weights, activation_bytes=act, workspace_bytes=workspace,
                        headroom_bytes=FIXED_HEADROOM_BYTES, outside_bytes=memory.outside_bytes,
                        held_bytes=memory.reserved_bytes,
                        budget_bytes=memory.budget_bytes(utilization), block_bytes=block, block_size=block_size,
                        kv_blocks=kv.num_blocks)
