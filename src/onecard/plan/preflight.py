"""Refuse early: the engine's and the trainer's check, before a byte of weights is loaded.

Without it a job that cannot fit fails minutes later with a CUDA OOM deep in a
load or a backward. With it, start-up asks the planner first and raises one
``DoesNotFitError`` line: how much is needed, how much the card has, and the
settings that do fit (each re-planned, never a rule of thumb). The engine also
takes its default ``max_model_len`` from here: the longest context its KV pool
will hold, when the model's own default does not fit.

Both functions take a ``CardMemory``: the live card's (``live_card_memory``) in
production, a hand-built one in tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from onecard.errors import DoesNotFitError
from onecard.plan import memory as M
from onecard.plan.card_memory import GIB, CardMemory
from onecard.plan.engine_memory import EngineMemory, engine_memory
from onecard.plan.fit import TrainingPlan, _largest, plan_training
from onecard.plan.spec import ModelSpec, resolve_model

log = logging.getLogger(__name__)

# A context shorter than this is not worth starting an engine for: refuse instead of picking it as the default.
MIN_DEFAULT_MAX_MODEL_LEN = 256


@dataclass(frozen=True)
class EnginePreflight:
    """The engine's start-up, predicted: the max_model_len to use and the card split behind it."""

    max_model_len: int
    picked: bool  # max_model_len was chosen here (the user left it unset and the default did not fit)
    memory: EngineMemory


def engine_weight_format(spec: ModelSpec, quantization: str | None, dtype_bytes: int) -> str:
    """The in-memory weight format the engine will hold: the checkpoint's own bits, on-the-fly RTN, or the dtype."""
    if spec.stored_fp8:
        return "fp8"
    bits = spec.stored_bits
    if bits is None and quantization is not None:
        from onecard.quant.config import QuantSpec

        q = QuantSpec.parse(quantization)
        if q.float8:
            return "fp8"
        bits = q.bits
    if bits is not None:
        return M.BITS_TO_FORMAT.get(bits, "int4")
    return "fp32" if dtype_bytes == 4 else "bf16"


def engine_preflight(model, memory: CardMemory, *, max_model_len: int | None, default_max_model_len: int,
                     max_num_seqs: int, max_num_batched_tokens: int, gpu_memory_utilization: float,
                     dtype_bytes: int = 2, quantization: str | None = None, block_size: int = 16,
                     enforce_eager: bool = False, cuda_graph_max_batch: int = 256,
                     kv_cache_dtype: str = "auto", num_speculative_tokens: int = 0,
                     draft_model=None) -> EnginePreflight:
    """Check that the engine's KV pool on ``memory`` holds one ``max_model_len`` sequence, before loading.

    ``max_model_len`` None means the user did not set one: ``default_max_model_len``
    is used when it fits, else the longest context the pool holds (at least
    ``MIN_DEFAULT_MAX_MODEL_LEN``). Otherwise raises ``DoesNotFitError`` naming
    the need, the budget and the options that fit: a lower max_model_len,
    ``quantization='rtn-int4'``, fewer ``max_num_seqs``. ``draft_model``: the ``speculative_model``'s config,
    counted as the engine holds it (``engine_memory``'s ``draft``).
    """
    spec = resolve_model(model)
    draft = resolve_model(draft_model) if draft_model is not None else None
    fmt = engine_weight_format(spec, quantization, dtype_bytes)
    kv_dtype = "fp32" if dtype_bytes == 4 and kv_cache_dtype == "auto" else kv_cache_dtype

    def split(weight_format: str = fmt, seqs: int = max_num_seqs) -> EngineMemory:
        return engine_memory(spec, weight_format, memory, gpu_memory_utilization, seqs, max_num_batched_tokens,
                             block_size, kv_dtype, enforce_eager, cuda_graph_max_batch, num_speculative_tokens, draft)

    eng = split()
    want = default_max_model_len if max_model_len is None else max_model_len
    if eng.kv_tokens >= want:
        return EnginePreflight(want, False, eng)
    if max_model_len is None and eng.kv_tokens >= MIN_DEFAULT_MAX_MODEL_LEN:
        log.info("max_model_len=%d: the longest context whose KV cache fits next to the weights on %s "
                 "(the model's default %d does not; %s)", eng.kv_tokens, memory.name, want, _split_text(eng))
        return EnginePreflight(eng.kv_tokens, True, eng)
    options: list[str] = []
    if eng.kv_tokens >= MIN_DEFAULT_MAX_MODEL_LEN:
        options.append(f"max_model_len={eng.kv_tokens}")
    if fmt in ("fp32", "bf16", "int8", "fp8") and spec.stored_bits is None:
        e4 = split("int4")
        if e4.kv_tokens >= want:
            options.append(f"quantization='rtn-int4' (needs {e4.need_bytes(want) / GIB:.1f} GiB)")
    if max_num_seqs > 1:
        m = _largest(lambda n: split(seqs=n).kv_tokens >= want, 1, max_num_seqs - 1)
        if m:
            options.append(f"max_num_seqs={m}")
    if not options:
        options.append(f"none on this card: the weights alone take {eng.weights_bytes / GIB:.1f} GiB")
    raise DoesNotFitError(
        f"{spec.name} with max_model_len={want} does not fit on {memory.name}: needs {eng.need_bytes(want) / GIB:.1f} "
        f"GiB, {max(eng.budget_bytes, 0) / GIB:.1f} GiB available ({_budget_text(memory, gpu_memory_utilization)}); "
        f"options: {'; '.join(options)}")


def _budget_text(memory: CardMemory, util: float) -> str:
    cap = f", per-process cap {memory.cap_fraction:g}" if memory.cap_fraction < 1 else ""
    return (f"gpu_memory_utilization={util:g} of {memory.total_bytes / GIB:.1f} GiB{cap}, "
            f"{memory.outside_bytes / GIB:.1f} GiB held by the CUDA context and other processes")


def _split_text(eng: EngineMemory) -> str:
    return (f"weights {eng.weights_bytes / GIB:.1f} GiB, activation peak {eng.activation_bytes / GIB:.1f} GiB, "
            f"graphs/headroom {(eng.workspace_bytes + eng.headroom_bytes) / GIB:.2f} GiB")


# The trainer's optimizer names -> the planner's.
_OPTIMIZERS = {"adamw_torch": "adamw", "adamw": "adamw", "adamw_8bit": "adamw-8bit", "paged_adamw_8bit": "adamw-8bit"}


def _qlora_base(quant: str, group_size: int) -> str:
    """The planner's base format for a QLoRA base (``plan.memory``'s formats)."""
    if quant == "nf4":
        return "nf4"
    return "int4-g64" if group_size == 64 else "int4"


def training_preflight(model, memory: CardMemory, *, method: str, seq_len: int, batch_size: int, grad_accum: int,
                       gradient_checkpointing: bool, optimizer: str, fused_ce: bool,
                       lora_rank: int, lora_targets: str, qlora_group_size: int = 64, qlora_quant: str = "int4",
                       gpu_memory_utilization: float = 0.95, offload_checkpoints: bool = False) -> TrainingPlan:
    """Plan the trainer's job on ``memory`` and raise ``DoesNotFitError`` (with settings that fit) when it cannot.

    Arguments are ``onecard.train.TrainConfig``'s, already resolved (``optimizer``
    as the trainer picked it: adamw_torch / adamw_8bit / paged_adamw_8bit;
    ``precision``: bf16 or fp16). Full fine-tuning loads fp32 master weights
    under autocast (the planner's "mixed"); LoRA/QLoRA keep a 16-bit base.
    ``offload_checkpoints``: the layer checkpoints wait in CPU memory (one on the GPU at a time).
    ``qlora_quant``: the QLoRA base, onecard's int4 or bitsandbytes' nf4.
    """
    targets = "all" if lora_targets in ("all-linear", "all") else [t.strip() for t in lora_targets.split(",") if t.strip()]
    plan = plan_training(model, None, memory=memory, method=method, seq_len=seq_len, batch_size=batch_size,
                         grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing,
                         optimizer=_OPTIMIZERS.get(optimizer, "adamw"), lora_rank=lora_rank, lora_targets=targets,
                         precision="mixed" if method == "full" else "bf16", fused_ce=fused_ce,
                         base_format=_qlora_base(qlora_quant, qlora_group_size),
                         gpu_memory_utilization=gpu_memory_utilization, flags="train",
                         offload_checkpoints=offload_checkpoints)
    if not plan.fits:
        raise DoesNotFitError(f"{plan.model} {method} training (batch {batch_size} x {seq_len} tokens) "
                              f"{plan.verdict}")
    return plan
