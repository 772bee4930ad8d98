"""``EngineConfig``: every engine knob in one validated dataclass (the LLM/AsyncEngine keyword arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onecard.errors import BadInputError, NotBuiltYetError
from onecard.kernels.kv_quant import KV_CACHE_DTYPES

DTYPES = ("auto", "float32", "float16", "bfloat16")
# Default context when the user does not set max_model_len: the model's own limit, capped here so a
# 128k-context checkpoint does not ask for a 16 GiB cache on a 24 GB card. Pass max_model_len to go higher.
DEFAULT_MAX_MODEL_LEN_CAP = 8192
# CPU has no free-memory probe worth trusting: the KV cache there is sized for max_model_len x max_num_seqs
# tokens but never more than this many bytes (and never less than one full max_model_len sequence).
CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class EngineConfig:
    model: str | Path
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enforce_eager: bool = False
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    seed: int = 0
    device: str | None = None
    tensor_parallel_size: int = 1  # >1: one shard per GPU in that many processes (tp_engine.py)
    # "auto": decode-sized sums through PyTorch symmetric memory where the GPUs reach each other, NCCL otherwise
    tp_all_reduce: str = "auto"
    num_kv_blocks: int | None = None  # override the measured cache size (tests force preemption with it)
    cuda_graph_max_batch: int = 256
    fused_rope_store: bool = True  # CUDA decode: one Triton kernel for RoPE + KV write (False: PyTorch ops)
    fused_prefill_rope: bool = True  # CUDA prefill, with fused_rope_store: the same kernel, rotated k returned too
    # CUDA decode, with fused_rope_store: RoPE, KV write, flash-decoding and its merge in one launch (False: three)
    fused_decode_attention: bool = True
    # Hopper+: the decode kernels start while the previous one drains (programmatic dependent launch, kernels/launch.py);
    # None: on where the GPU and Triton support it, off when offloading layers (True with offload_layers: an error)
    programmatic_launch: bool | None = None
    enable_prefix_caching: bool = True  # share the KV of identical prompt prefixes across requests
    enable_chunked_prefill: bool = True  # split long prompts into chunks interleaved with decode steps
    long_prefill_chunk: int | None = None  # most prompt tokens one sequence computes per step (None: the budget)
    num_speculative_tokens: int = 0  # n-gram (prompt-lookup) speculative decoding: draft tokens per step (0 = off)
    ngram_size: int = 3  # longest suffix n-gram looked up in the context to draft from
    ngram_min_size: int = 1  # shortest one: a step whose context suffix matches only shorter ones drafts nothing
    speculative_model: str | Path | None = None  # a small model with the same tokenizer drafts instead of n-grams
    offload_layers: int | str = 0  # decoder layers kept in pinned CPU memory, streamed in per step ("auto": planner's)
    int4_kernel: str = "triton"  # CUDA int4 matmul: ours (Triton; Gluon tensor cores at 2-64 rows), or "tinygemm"
    # CUDA bf16/fp16 linears at bs=1 decode: onecard's Triton GEMV (kernels/gemv.py), not cuBLAS. None: on for CUDA
    # without speculation (a verify step's k+1 rows go to cuBLAS, which rounds unlike the GEMV: greedy would drift)
    decode_gemv: bool | None = None
    # overlap the host's scheduling/sampling bookkeeping of step t+1 with the GPU's step t (decode steps only);
    # None: on for CUDA without speculation or tensor parallelism, off otherwise; True also runs it on CPU (tests)
    async_scheduling: bool | None = None
    # while sequences decode, waiting ones join only when this many seats are free (or the whole queue fits), so a
    # prefill step admits a batch instead of one finisher's successor each time (None: max(1, max_num_seqs // 8))
    admit_batch_size: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> BadInputError:
            return BadInputError(f"{field}={getattr(self, field)!r}: {why}")

        if self.dtype not in DTYPES:
            raise bad("dtype", f"choose one of {', '.join(DTYPES)}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", "must be in (0, 1], e.g. 0.9")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise bad("max_model_len", "must be a positive integer")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise bad("max_num_seqs", "must be a positive integer")
        if self.admit_batch_size is not None and (
                not isinstance(self.admit_batch_size, int) or not 1 <= self.admit_batch_size <= self.max_num_seqs):
            raise bad("admit_batch_size", f"must be an integer in 1..max_num_seqs ({self.max_num_seqs}); 1 admits "
                      "each waiting request as soon as a seat frees")
        if self.max_num_batched_tokens is not None and (
                not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1):
            raise bad("max_num_batched_tokens", "must be a positive integer")
        if self.block_size not in (8, 16, 32, 64, 128, 256):
            raise bad("block_size", "must be a power of two in 8..256 (16 is a good default)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"choose one of {', '.join(KV_CACHE_DTYPES)} ('auto' stores the model dtype)")
        if self.int4_kernel not in ("triton", "tinygemm"):
            raise bad("int4_kernel", "choose 'triton' (onecard's kernel) or 'tinygemm' (PyTorch's int4 kernel, CUDA bf16)")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", "must be a positive integer (GPUs to shard the model over)")
        if self.tp_all_reduce not in ("auto", "one-shot", "nccl"):
            raise bad("tp_all_reduce", "choose 'auto' (symmetric memory for small sums where it runs, decode sums "
                      "fused into the next norm), 'one-shot' (the same without the fusion) or 'nccl'")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise bad("num_kv_blocks", "must be a positive integer")
        if self.long_prefill_chunk is not None and (
                not isinstance(self.long_prefill_chunk, int) or self.long_prefill_chunk < 1):
            raise bad("long_prefill_chunk", "must be a positive integer (tokens of one prompt computed per step)")
        if self.long_prefill_chunk is not None and not self.enable_chunked_prefill:
            raise bad("long_prefill_chunk", "only applies with enable_chunked_prefill=True; drop one of them")
        if not isinstance(self.num_speculative_tokens, int) or not 0 <= self.num_speculative_tokens <= 16:
            raise bad("num_speculative_tokens", "must be an integer in 0..16 (0 turns speculative decoding off)")
        if not isinstance(self.ngram_size, int) or not 1 <= self.ngram_size <= 16:
            raise bad("ngram_size", "must be an integer in 1..16")
        if not isinstance(self.ngram_min_size, int) or not 1 <= self.ngram_min_size <= self.ngram_size:
            raise bad("ngram_min_size", f"must be an integer in 1..ngram_size ({self.ngram_size})")
        if self.speculative_model is not None and not self.num_speculative_tokens:
            raise bad("speculative_model", "needs num_speculative_tokens=k > 0 (draft tokens proposed per step)")
        if self.speculative_model is not None and self.tensor_parallel_size > 1:
            raise NotBuiltYetError(f"speculative_model with tensor_parallel_size={self.tensor_parallel_size} is not "
                                   "built; drop one of them (n-gram speculation works with tensor parallelism)")
        if self.async_scheduling not in (None, True, False):
            raise bad("async_scheduling", "must be True, False or None (None: on for CUDA)")
        if self.async_scheduling and self.num_speculative_tokens:
            raise NotBuiltYetError("async_scheduling=True with speculative decoding is not built; leave "
                                   "async_scheduling=None (it turns itself off there) or drop one")
        if self.programmatic_launch not in (None, True, False):
            raise bad("programmatic_launch", "must be True, False or None (None: on for Hopper-or-later GPUs)")
        if self.decode_gemv not in (None, True, False):
            raise bad("decode_gemv", "must be True, False or None (None: on for CUDA without speculation)")
        if self.decode_gemv and self.num_speculative_tokens:
            raise bad("decode_gemv", "speculative decoding verifies k+1 rows per step through cuBLAS, which rounds "
                      "unlike the bs=1 GEMV, so greedy output would differ from plain decoding; leave decode_gemv=None "
                      "(it turns itself off with speculation)")
        if self.offload_layers != "auto" and (not isinstance(self.offload_layers, int) or self.offload_layers < 0):
            raise bad("offload_layers", "must be a non-negative integer (decoder layers kept in CPU memory) or 'auto'")
        if self.device is not None and not str(self.device).startswith(("cpu", "cuda")):
            raise bad("device", "must be 'cpu', 'cuda' or 'cuda:N'")

    def overlaps(self, is_cuda: bool) -> bool:
        """Whether decode steps run with async scheduling on this device (``async_scheduling=None`` resolved)."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return is_cuda and not self.num_speculative_tokens

    def fuses_decode_attention(self) -> bool:
        """Whether decode attention runs as one launch (``fused_decode_attention``), which speculation rules out:
        a sequence's verify rows attend to one another's new keys/values, and one launch stores and reads them
        in no set order (its programs race), where the three-launch path stores every row's before any reads."""
        return self.fused_decode_attention and not self.num_speculative_tokens

    def uses_gemv(self, is_cuda: bool) -> bool:
        """Whether bs=1 linears run through the Triton GEMV on this device (``decode_gemv=None`` resolved)."""
        if self.decode_gemv is not None:
            return self.decode_gemv and is_cuda
        return is_cuda and not self.num_speculative_tokens

    def resolve(self, max_position_embeddings: int) -> None:
        """Fill defaults that depend on the model; check limits against it."""
        if self.max_model_len is None:
            self.max_model_len = min(max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
        elif self.max_model_len > max_position_embeddings:
            raise BadInputError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                                f"{max_position_embeddings}; lower max_model_len")
        if self.max_num_batched_tokens is None:
            # Chunked prefill bounds a step's prefill at 8192 tokens at any context length (the start-up profile
            # and the activation peak with it); without it a whole max_model_len prompt must fit one step.
            self.max_num_batched_tokens = 8192 if self.enable_chunked_prefill else max(self.max_model_len, 8192)
        elif self.max_num_batched_tokens < self.max_model_len and not self.enable_chunked_prefill:
            raise BadInputError(f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_model_len="
                                f"{self.max_model_len}: a full-length prompt could never be scheduled; raise it, lower "
                                "max_model_len, or keep enable_chunked_prefill=True")
        if self.admit_batch_size is None:
            self.admit_batch_size = max(1, self.max_num_seqs // 8)
        if self.long_prefill_chunk is None and self.enable_chunked_prefill:
            self.long_prefill_chunk = self.max_num_batched_tokens
