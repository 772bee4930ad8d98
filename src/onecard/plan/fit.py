"""Verdicts and the settings that fit: ``plan_inference`` and ``plan_training``.

Each plan is a dataclass with the memory breakdown (GiB), the speed estimate,
a one-line verdict and, when the job does not fit, suggestions that were each
re-planned and checked to fit (never a guess). The engine and trainer call
these before loading anything, to refuse early and to pick defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from onecard.errors import BadInputError
from onecard.hardware import GPUSpec, find_gpu, list_gpus
from onecard.plan import memory as M
from onecard.plan import speed as S
from onecard.plan.calibration import decode_calibration, factor
from onecard.plan.card_memory import CardMemory
from onecard.plan.engine_memory import EngineMemory, engine_memory
from onecard.plan.spec import ModelSpec, resolve_model

GIB = M.GIB
DEFAULT_PREFILL_CHUNK = 8192  # the engine's default max_num_batched_tokens (chunked prefill on: EngineConfig.resolve)
DEFAULT_MAX_MODEL_LEN_CAP = 8192  # the engine's default context cap (onecard.engine.config)


def resolve_card(card: "str | GPUSpec | None") -> GPUSpec:
    """A catalog card by name, or the live GPU (matched to the catalog) when ``card`` is None."""
    if isinstance(card, GPUSpec):
        return card
    if card:
        return find_gpu(card)
    from onecard.hardware import probe

    report = probe()
    if not report.has_gpu:
        raise BadInputError("no CUDA GPU visible to plan for; name a card with --card (e.g. --card 4090)")
    gpu = report.gpus[0]
    if gpu.spec is None:
        raise BadInputError(f"GPU '{gpu.name}' is not in the catalog; name the closest card with --card")
    return gpu.spec


def _gib(nbytes: float) -> float:
    return nbytes / GIB


@dataclass
class InferencePlan:
    """A serving plan. Two totals, for two questions:

    ``total_gib`` is the *minimum* the job needs: ``max_num_seqs`` sequences of
    ``max_model_len`` tokens (what ``fits``, ``max_context_tokens`` and
    ``max_concurrent_seqs`` use). ``engine_reserved_gib`` is what onecard's
    engine will actually hold: it fills ``gpu_memory_utilization`` of the card
    with a KV pool of ``engine_kv_tokens`` tokens (``runtime="engine"`` only).
    """

    model: str
    card: str
    runtime: str
    bits: int
    weight_format: str
    kv_cache_dtype: str
    max_model_len: int
    max_num_seqs: int
    prefill_tokens: int
    gpu_memory_utilization: float
    usable_gib: float
    weights_gib: float
    kv_gib_per_token: float
    kv_gib: float
    activations_gib: float
    workspace_gib: float
    overhead_gib: float
    total_gib: float
    fits: bool
    free_gib: float
    engine_kv_tokens: int
    engine_kv_gib: float
    engine_reserved_gib: float
    max_context_tokens: int
    max_concurrent_seqs: int
    decode_tok_s_bs1: float
    decode_tok_s_batch: float
    offload_layers: int
    offload_tok_s: float | None
    efficiency: float
    efficiency_source: str
    cuda_context_gib: float
    cuda_context_source: str
    suggestions: list[str] = field(default_factory=list)
    verdict: str = ""

    def breakdown(self) -> list[tuple[str, float, str]]:
        """(item, GiB, what it is) rows that sum to ``total_gib``."""
        kv_what = f"{self.max_num_seqs} x {self.max_model_len:,} tokens x {self.kv_gib_per_token * GIB / 1024:,.0f} KiB ({self.kv_cache_dtype})"
        rows = [
            ("weights", self.weights_gib, f"{M.WEIGHT_FORMATS[self.weight_format]}, allocator-rounded"),
            ("KV cache", self.kv_gib, kv_what + (", the least the engine must hold" if self.runtime == "engine" else "")),
            ("activations", self.activations_gib, f"prefill of {self.prefill_tokens:,} tokens, sampling of "
             f"{min(self.max_num_seqs, self.prefill_tokens)} rows, cuBLAS workspace"),
        ]
        if self.runtime == "engine":
            rows.append(("graphs / headroom", self.workspace_gib, "CUDA-graph decode outputs and pool, sampler, the "
                         "engine's fixed headroom"))
        rows.append(("overhead", self.overhead_gib, f"CUDA context {self.cuda_context_gib:.2f} GiB "
                     f"({self.cuda_context_source})" + (", allocator slack" if self.runtime == "hf" else "")))
        return rows

    def engine_rows(self) -> list[tuple[str, float, str]]:
        """What the engine will reserve at start-up (empty for ``runtime="hf"``)."""
        if self.runtime != "engine":
            return []
        return [("engine KV pool", self.engine_kv_gib, f"{self.engine_kv_tokens:,} tokens: the rest of "
                 f"{self.gpu_memory_utilization:.0%} of the card, shared by all sequences"),
                ("engine reserves", self.engine_reserved_gib, "weights + KV pool + activation peak + graphs + CUDA context")]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingPlan:
    model: str
    card: str
    method: str
    precision: str
    optimizer: str
    seq_len: int
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    fused_ce: bool
    lora_rank: int
    lora_targets: tuple[str, ...]
    base_format: str
    gpu_memory_utilization: float
    usable_gib: float
    trainable_params: int
    total_params: int
    weights_gib: float
    adapter_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    step_temp_gib: float
    overhead_gib: float
    total_gib: float
    fits: bool
    free_gib: float
    max_batch_size: int
    max_seq_len: int
    tokens_per_s: float | None  # None when the card is not in the catalog (no roofline figures)
    mfu: float
    mfu_source: str
    cuda_context_gib: float
    cuda_context_source: str
    peak_phase: str = ""
    suggestions: list[str] = field(default_factory=list)
    verdict: str = ""
    offload_checkpoints: bool = False

    def breakdown(self) -> list[tuple[str, float, str]]:
        w = {"full": "fp32 master weights" if self.precision == "mixed" else "bf16 weights", "lora": "frozen bf16 base",
             "qlora": f"frozen {M.WEIGHT_FORMATS[self.base_format]} base"}[self.method]
        ckpt = ("checkpoints offloaded to CPU" if self.offload_checkpoints else "checkpointing on") \
            if self.gradient_checkpointing else "checkpointing off"
        rows = [
            ("weights", self.weights_gib, w + ", allocator-rounded"),
            ("LoRA adapters", self.adapter_gib, f"rank {self.lora_rank} on {', '.join(self.lora_targets)}, fp32"),
            ("gradients", self.grads_gib, f"{self.trainable_params:,} trainable parameters"
             + ("" if self.grads_gib else " (grads grow as activations are freed: not at the peak)")),
            ("optimizer", self.optimizer_gib, f"{self.optimizer} states"),
            ("activations", self.activations_gib, f"{self.batch_size} x {self.seq_len:,} tokens, {ckpt}"
             + ("; freed before the step" if self.peak_phase == "optimizer step" else "")),
            ("logits / loss", self.logits_gib, ("fused linear+CE (chunked)" if self.fused_ce else "fp32 log-softmax + grads")
             + ("; freed before the step, its segments stay reserved" if self.peak_phase == "optimizer step" else "")),
            ("step temporaries", self.step_temp_gib, "at the peak phase: " + self.peak_phase),
            ("overhead", self.overhead_gib, f"CUDA context {self.cuda_context_gib:.2f} GiB ({self.cuda_context_source}), allocator slack"),
        ]
        return [r for r in rows if not (r[0] == "LoRA adapters" and self.method == "full")]

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- inference


def _check_common(util: float) -> None:
    if not 0 < util <= 1:
        raise BadInputError(f"gpu_memory_utilization must be in (0, 1], got {util}")


def _runtime_bytes(spec: ModelSpec, fmt: str, mem: CardMemory, util: float, max_model_len: int, max_num_seqs: int,
                   kv_cache_dtype: str, prefill: int, runtime: str) -> tuple[int, int, int, int, EngineMemory | None]:
    """(weights, KV for max_num_seqs x max_model_len, activations, workspace) in allocator bytes, plus the engine's
    start-up split for ``runtime="engine"``. The HF path (generate with a static cache) has one K and one V
    tensor per layer, a bool mask of prefill x cache length, no graphs; the engine has whole KV blocks."""
    if runtime == "hf":
        w = M.reserved_bytes(M.weight_tensors(spec, fmt))
        kv = M.reserved_bytes(M.kv_cache_tensors(spec, max_model_len * max_num_seqs, kv_cache_dtype))
        act = M.inference_activation_bytes(spec, prefill, max_num_seqs, max_model_len, attention_mask=True)
        return w, kv, act, M.ALLOCATOR_SLACK_BYTES, None
    eng = engine_memory(spec, fmt, mem, util, max_num_seqs, prefill, kv_cache_dtype=kv_cache_dtype)
    kv = max_num_seqs * math.ceil(max_model_len / eng.block_size) * eng.block_bytes
    return eng.weights_bytes, kv, eng.activation_bytes, eng.workspace_bytes + eng.headroom_bytes, eng


def _infer_core(spec: ModelSpec, card: GPUSpec, fmt: str, bits: int, max_model_len: int, max_num_seqs: int,
                kv_cache_dtype: str, util: float, prefill_tokens: int | None, context_gib: float | None,
                runtime: str, efficiency: float | None) -> InferencePlan:
    ctx = factor("cuda_context_gib")
    ctx_gib = context_gib if context_gib is not None else ctx.value
    ctx_src = "given" if context_gib is not None else ctx.source
    mem = CardMemory.for_card(card.memory_gib, int(ctx_gib * GIB), card.key)
    usable = card.memory_gib * util * GIB
    overhead = ctx_gib * GIB

    def prefill_for(length: int, seqs: int) -> int:
        if prefill_tokens:
            return prefill_tokens
        return DEFAULT_PREFILL_CHUNK if runtime == "engine" else length * seqs

    def need(length: int, seqs: int) -> int:
        return sum(_runtime_bytes(spec, fmt, mem, util, length, seqs, kv_cache_dtype, prefill_for(length, seqs),
                                  runtime)[:4]) + overhead

    prefill = prefill_for(max_model_len, max_num_seqs)
    w_res, kv, act, work, eng = _runtime_bytes(spec, fmt, mem, util, max_model_len, max_num_seqs, kv_cache_dtype,
                                               prefill, runtime)
    total = w_res + kv + act + work + overhead
    kv_tok = M.kv_bytes_per_token(spec, kv_cache_dtype)
    limit = spec.args.max_position_embeddings
    # Longest single sequence and most sequences of max_model_len that fit.
    if eng is not None:
        max_ctx = min(eng.kv_tokens, limit)
    else:
        max_ctx = _largest(lambda n: need(n, 1) <= usable, 1, limit)
    max_seqs = _largest(lambda n: need(max_model_len, n) <= usable, 1, 4096)
    w_tensors = M.weight_tensors(spec, fmt)
    eff = decode_calibration(fmt, efficiency)
    mid = max(1, max_model_len // 2)
    bs1 = S.decode_tok_s(spec, card, fmt, kv_tok, 1, mid, eff)
    batch = max(1, min(max_num_seqs, max_seqs) if max_seqs else max_num_seqs)
    tok_batch = S.decode_tok_s(spec, card, fmt, kv_tok, batch, mid, eff)
    offload_layers, offload_speed = 0, None
    if total > usable:
        per_layer = sum(M.allocator_bytes(nb) * (c // spec.args.num_layers) for name, nb, c in w_tensors
                        if c % spec.args.num_layers == 0 and c >= spec.args.num_layers)
        n = -(-int(total - usable) // per_layer)
        if n <= spec.args.num_layers:  # else even all layers on the host leave too little for KV and activations
            offload_layers = n
            offload_speed = S.offload_tok_s(spec, card, fmt, n * per_layer, kv_tok, mid, eff)
    return InferencePlan(
        model=spec.name, card=card.key, runtime=runtime, bits=bits, weight_format=fmt, kv_cache_dtype=kv_cache_dtype,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, prefill_tokens=prefill,
        gpu_memory_utilization=util, usable_gib=_gib(usable), weights_gib=_gib(w_res), kv_gib_per_token=_gib(kv_tok),
        kv_gib=_gib(kv), activations_gib=_gib(act), workspace_gib=_gib(work), overhead_gib=_gib(overhead),
        total_gib=_gib(total), fits=total <= usable, free_gib=_gib(usable - total),
        engine_kv_tokens=eng.kv_tokens if eng else 0, engine_kv_gib=_gib(eng.kv_pool_bytes) if eng else 0.0,
        engine_reserved_gib=_gib(eng.reserved_bytes) if eng else 0.0, max_context_tokens=max_ctx,
        max_concurrent_seqs=max_seqs, decode_tok_s_bs1=bs1, decode_tok_s_batch=tok_batch,
        offload_layers=offload_layers, offload_tok_s=offload_speed, efficiency=eff.efficiency, efficiency_source=eff.source,
        cuda_context_gib=ctx_gib, cuda_context_source=ctx_src)


def plan_inference(model, card: "str | GPUSpec | None" = None, bits: int | None = None, max_model_len: int | None = None,
                   max_num_seqs: int = 1, kv_cache_dtype: str = "auto", gpu_memory_utilization: float = 0.9,
                   prefill_tokens: int | None = None, cuda_context_gib: float | None = None,
                   runtime: str = "engine", decode_efficiency: float | None = None) -> InferencePlan:
    """Memory, speed and a verdict for serving ``model`` on ``card``.

    ``model``: built-in name, folder (config.json is enough), config dict,
    ``ModelArgs`` or ``ModelSpec``. ``card``: catalog name or None for the live
    GPU. ``bits`` None means the checkpoint's own (its quantization_config, else
    16). ``max_model_len`` None means the engine's default: the model's
    max_position_embeddings capped at 8192. ``prefill_tokens``: the largest
    forward (default: the engine's max_num_batched_tokens, 8192, which its
    start-up profile always runs). The whole job, CUDA context included, must
    fit in ``gpu_memory_utilization`` of the card. ``runtime``: "engine"
    (onecard's engine: whole KV blocks, CUDA graphs, and the KV pool it fills
    the card with) or "hf" (transformers generate with a static cache and its
    bool attention mask). ``decode_efficiency`` replaces the fitted bandwidth
    efficiency of the format's linears (``calibration.decode_calibration``).
    """
    spec = resolve_model(model)
    gpu = resolve_card(card)
    _check_common(gpu_memory_utilization)
    if runtime not in ("engine", "hf"):
        raise BadInputError(f"runtime must be 'engine' or 'hf', got {runtime!r}")
    if decode_efficiency is not None and not 0 < decode_efficiency <= 1:
        raise BadInputError(f"decode_efficiency must be in (0, 1], got {decode_efficiency}")
    bits = bits if bits is not None else (spec.stored_bits or 16)
    if bits not in M.BITS_TO_FORMAT:
        raise BadInputError(f"bits must be 16, 8 or 4, got {bits}")
    fmt = M.BITS_TO_FORMAT[bits]
    limit = spec.args.max_position_embeddings
    max_model_len = min(limit, DEFAULT_MAX_MODEL_LEN_CAP) if max_model_len is None else max_model_len
    if not 1 <= max_model_len <= limit:
        raise BadInputError(f"max_model_len must be in 1..{limit:,} (the model's max_position_embeddings), got {max_model_len}")
    if max_num_seqs < 1:
        raise BadInputError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    M.kv_bytes_per_token(spec, kv_cache_dtype)  # validates the dtype name
    if prefill_tokens is not None and prefill_tokens < 1:
        raise BadInputError(f"prefill_tokens must be >= 1, got {prefill_tokens}")

    def core(**changes) -> InferencePlan:
        a = dict(bits=bits, fmt=fmt, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype)
        a.update(changes)
        return _infer_core(spec, gpu, a["fmt"], a["bits"], a["max_model_len"], a["max_num_seqs"], a["kv_cache_dtype"],
                           gpu_memory_utilization, prefill_tokens, cuda_context_gib, runtime, decode_efficiency)

    plan = core()
    plan.suggestions = _infer_suggestions(plan, core, gpu, spec.args.num_layers)
    speed = f"~{plan.decode_tok_s_bs1:,.0f} tok/s decode at bs=1"
    if runtime == "engine" and plan.fits:
        speed += (f"; the engine reserves {plan.engine_reserved_gib:.1f} GiB with a KV pool of "
                  f"{plan.engine_kv_tokens:,} tokens")
    plan.verdict = _verdict(plan.fits, gpu, plan.total_gib, plan.usable_gib, plan.free_gib, plan.suggestions, speed)
    return plan


def _infer_suggestions(plan: InferencePlan, core, gpu: GPUSpec, num_layers: int) -> list[str]:
    out: list[str] = []
    if plan.fits:
        out.append(f"up to {plan.max_context_tokens:,} tokens of context fit at these settings")
        if plan.max_concurrent_seqs > plan.max_num_seqs:
            out.append(f"up to {plan.max_concurrent_seqs} concurrent sequences of {plan.max_model_len:,} tokens "
                       f"(~{core(max_num_seqs=plan.max_concurrent_seqs).decode_tok_s_batch:,.0f} tok/s in total)")
        return out
    for b in (8, 4):
        if b < plan.bits:
            p = core(bits=b, fmt=M.BITS_TO_FORMAT[b])
            if p.fits:
                out.append(f"--bits {b} (needs {p.total_gib:.1f} GiB, ~{p.decode_tok_s_bs1:,.0f} tok/s)")
                break
    if plan.kv_cache_dtype in ("auto", "bf16", "fp16") and plan.kv_gib > 0.1 * plan.total_gib:
        p = core(kv_cache_dtype="fp8")
        if p.fits:
            out.append(f"--kv-dtype fp8 (needs {p.total_gib:.1f} GiB)")
    if plan.max_num_seqs > 1 and plan.max_concurrent_seqs >= 1 and core(max_num_seqs=plan.max_concurrent_seqs).fits:
        out.append(f"--batch {plan.max_concurrent_seqs} (concurrent sequences that fit)")
    if 256 <= plan.max_context_tokens < plan.max_model_len:
        p = core(max_model_len=plan.max_context_tokens, max_num_seqs=1)
        if p.fits:
            out.append(f"--ctx {plan.max_context_tokens:,} (needs {p.total_gib:.1f} GiB)")
    if not out and plan.bits > 4:
        p4 = core(bits=4, fmt="int4")
        if 256 <= p4.max_context_tokens < plan.max_model_len and core(bits=4, fmt="int4", max_model_len=p4.max_context_tokens).fits:
            out.append(f"--bits 4 --ctx {p4.max_context_tokens:,}")
    if plan.offload_layers:
        out.append(f"offload {plan.offload_layers} of {num_layers} decoder layers to CPU RAM: "
                   f"~{plan.offload_tok_s:.1f} tok/s over {gpu.host_link_gbs:g} GB/s host link")
    elif not out:
        out.append("no offload split fits: the KV cache and activations alone exceed the card")
    bigger = [g for g in sorted(list_gpus(), key=lambda g: g.memory_gib) if g.memory_gib > gpu.memory_gib
              and plan.total_gib <= g.memory_gib * plan.gpu_memory_utilization]
    if bigger:
        out.append(f"a card with >= {plan.total_gib / plan.gpu_memory_utilization:.0f} GiB (e.g. {bigger[0].key})")
    return out


def _verdict(fits: bool, gpu: GPUSpec | None, total: float, usable: float, free: float, suggestions: list[str],
             speed: str, card_name: str | None = None) -> str:
    name = card_name if gpu is None else gpu.name
    if fits:
        size = "" if gpu is None else f" ({gpu.memory_gib:g} GiB)"
        return f"fits, {free:.1f} GiB free: needs {total:.1f} of {usable:.1f} GiB usable on {name}{size}" + \
            (f"; {speed}" if speed else "")
    opts = "; ".join(suggestions) if suggestions else "none on this card"
    return f"does not fit: needs {total:.1f} GiB, {name} has {usable:.1f} usable; options: {opts}"


# ---------------------------------------------------------------- training

OPTIMIZERS = {
    "adamw": "torch AdamW (foreach): 2 states in the parameter dtype",
    "adamw-8bit": "bitsandbytes 8-bit AdamW: 2 blockwise-quantized states (1 byte each + fp32 absmax per 256)",
}
PRECISIONS = ("bf16", "mixed")
METHODS = ("full", "lora", "qlora")


def _train_core(spec: ModelSpec, gpu: GPUSpec | None, mem: CardMemory, context_source: str, method: str,
                precision: str, optimizer: str, seq_len: int, batch_size: int, grad_accum: int, checkpointing: bool,
                fused_ce: bool, rank: int, targets: tuple[str, ...], base_fmt: str, util: float,
                offload: bool = False, peft_forward: bool = False) -> TrainingPlan:
    usable = mem.budget_bytes(util) + mem.outside_bytes
    total_params = spec.num_parameters()
    mixed = method == "full" and precision == "mixed"
    if method == "full":
        weights = M.reserved_bytes([(n, b * (2 if mixed else 1), c) for n, b, c in M.weight_tensors(spec, "bf16")])
        trainable, adapter, param_bytes = total_params, 0, 4 if mixed else 2
    else:
        weights = M.reserved_bytes(M.weight_tensors(spec, base_fmt))
        trainable = M.lora_parameters(spec, rank, targets)
        adapter, param_bytes = 4 * trainable, 4
    grads = trainable * param_bytes
    if optimizer == "adamw":
        states, temp = 2 * trainable * param_bytes, trainable * param_bytes  # foreach keeps one sqrt(v) list at the step
    else:
        states, temp = 2 * trainable * (1 + 4 / 256), 0
    tokens = batch_size * seq_len
    layer_kw = dict(mixed=mixed, lora_rank=rank, base_format=base_fmt, adapter_bytes=4 if peft_forward else 2,
                    fused=fused_ce)
    acts = M.model_activation_bytes(spec, tokens, method, targets, checkpointing=checkpointing,
                                    offload=offload and checkpointing, **layer_kw)
    logits = M.logits_bytes(spec, tokens, fused_ce)
    # Checkpointed: the loss and a recomputed layer are never live together (M.checkpointed_peak_bytes).
    loss_segments = M.loss_segment_bytes(spec, tokens, fused_ce)
    layer = M.layer_saved_bytes(spec, tokens, method, targets, **layer_kw)
    fwd_bwd = M.checkpointed_peak_bytes(acts, layer, loss_segments) if checkpointing else acts + logits
    fwd_extra = 0
    if mixed:
        fwd_extra += 2 * total_params  # autocast's bf16 weight copies, kept for backward
    if method == "qlora":
        fwd_extra += 2 * max(o * i for _, o, i in spec.linear_shapes())  # one dequantized bf16 weight in flight
    held_grads = grads if grad_accum > 1 else 0  # accumulated grads live through the next micro-batches
    backward_peak = states + held_grads + fwd_bwd + fwd_extra
    # The loss's [tokens, vocab] fp32 tensors are each one large segment of the caching allocator. The gradients,
    # optimizer states and step temporaries allocated after them (per parameter) are carved out of those cached
    # segments, so the next forward's logits need fresh ones: at steady state the reserved peak is the optimizer
    # step's plus the loss's. (Measured on the H100, Llama-3-8B x 8 layers, full bf16: +1.2 GiB at 1,024 tokens,
    # +6.1 GiB at 4,096 over the step alone; the loss is 1.5 and 5.9 GiB.)
    step_peak = states + grads + temp + logits
    if backward_peak >= step_peak:
        phase, temp_shown = "forward/backward", fwd_extra
        dynamic = backward_peak
        if checkpointing:  # shown: the loss's segments, and the activations beside them at the peak
            logits, acts = loss_segments, fwd_bwd - loss_segments
    else:
        phase, temp_shown = "optimizer step", temp
        dynamic, acts = step_peak, 0  # activations are freed before the step; the loss's segments stay reserved
    shown_grads = grads if phase == "optimizer step" or grad_accum > 1 else 0
    overhead = mem.outside_bytes + M.ALLOCATOR_SLACK_BYTES
    total = weights + adapter + dynamic + overhead
    mfu = factor("train_mfu")
    tok_s = None if gpu is None else S.train_tok_s(spec, gpu, method, seq_len, tokens, checkpointing, mfu.value,
                                                   base_fmt if method == "qlora" else "bf16")
    return TrainingPlan(
        model=spec.name, card=gpu.key if gpu is not None else mem.name, method=method, precision=precision, optimizer=optimizer, seq_len=seq_len,
        batch_size=batch_size, grad_accum=grad_accum, gradient_checkpointing=checkpointing, fused_ce=fused_ce,
        lora_rank=rank, lora_targets=targets, base_format=base_fmt, gpu_memory_utilization=util,
        usable_gib=_gib(usable), trainable_params=trainable, total_params=total_params, weights_gib=_gib(weights),
        adapter_gib=_gib(adapter), grads_gib=_gib(shown_grads), optimizer_gib=_gib(states), activations_gib=_gib(acts),
        logits_gib=_gib(logits), step_temp_gib=_gib(temp_shown), overhead_gib=_gib(overhead), total_gib=_gib(total),
        fits=total <= usable, free_gib=_gib(usable - total), max_batch_size=0, max_seq_len=0, tokens_per_s=tok_s,
        mfu=mfu.value, mfu_source=mfu.source, cuda_context_gib=_gib(mem.outside_bytes), cuda_context_source=context_source,
        peak_phase=phase, offload_checkpoints=offload and checkpointing)


def plan_training(model, card: "str | GPUSpec | None" = None, method: str = "lora", seq_len: int | None = None,
                  batch_size: int = 1, grad_accum: int = 1, gradient_checkpointing: bool = True,
                  optimizer: str = "adamw", lora_rank: int = 16, lora_targets: "str | list[str]" = "all",
                  precision: str = "bf16", fused_ce: bool = False, base_format: str | None = None,
                  gpu_memory_utilization: float = 0.95, cuda_context_gib: float | None = None,
                  memory: CardMemory | None = None, flags: str = "plan",
                  offload_checkpoints: bool = False, peft_forward: bool = False) -> TrainingPlan:
    """Peak memory, tokens/s and a verdict for fine-tuning ``model`` on ``card``.

    ``method``: full | lora | qlora (LoRA on a 4-bit base: ``base_format``
    "int4-g64" (onecard.train's Int4Linear, default) or "nf4" (bitsandbytes)).
    ``precision`` (full only): "bf16" (bf16 weights, grads and AdamW states) or
    "mixed" (fp32 master weights, grads and states under bf16 autocast).
    LoRA adapters, their grads and states are fp32 (PEFT's default); their activations are planned as
    onecard's lean forward runs them (bf16 inputs, kept once), or with ``peft_forward`` as PEFT's own forward
    (each target's fp32 input copy: the HF + PEFT reference, and runs measured before the lean forward).
    ``fused_ce``: onecard's fused path (``onecard train --fused``): chunked linear + cross-entropy and, for
    LoRA/QLoRA, the fused RMSNorm/SwiGLU and the MLP run in token chunks at long lengths.
    ``seq_len`` None means 2048, or the model's max_position_embeddings if shorter.
    ``memory``: plan against this card memory (the live card's free bytes,
    per-process cap and CUDA context, as the trainer's preflight passes it)
    instead of the catalog card's size; ``card`` then only gives the speed
    figures (None: the catalog entry named like ``memory``, else no speed).
    ``flags``: "plan" or "train", which command's option names the suggestions use.
    ``offload_checkpoints``: checkpoints kept in CPU memory (``onecard train --offload-checkpoints``).
    """
    spec = resolve_model(model)
    seq_len = min(2048, spec.args.max_position_embeddings) if seq_len is None else seq_len
    if flags not in SUGGESTION_FLAGS:
        raise BadInputError(f"flags must be one of {', '.join(SUGGESTION_FLAGS)}, got {flags!r}")
    if memory is None:
        gpu = resolve_card(card)
        ctx = factor("cuda_context_gib")
        ctx_gib = cuda_context_gib if cuda_context_gib is not None else ctx.value
        mem = CardMemory.for_card(gpu.memory_gib, int(ctx_gib * GIB), gpu.key)
        ctx_src = "given" if cuda_context_gib is not None else ctx.source
    else:
        gpu = resolve_card(card) if card is not None else _catalog_card(memory.name)
        mem, ctx_src = memory, "measured now: CUDA context and other processes"
    _check_common(gpu_memory_utilization)
    if method not in METHODS:
        raise BadInputError(f"unknown method '{method}'; one of {', '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision '{precision}'; one of {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise BadInputError(f"unknown optimizer '{optimizer}'; one of {', '.join(OPTIMIZERS)}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if value < 1:
            raise BadInputError(f"{name} must be >= 1, got {value}")
    if seq_len > spec.args.max_position_embeddings:
        raise BadInputError(f"seq_len {seq_len:,} exceeds the model's max_position_embeddings "
                            f"({spec.args.max_position_embeddings:,}); use a shorter --ctx")
    targets = M.lora_targets(lora_targets)
    base_fmt = M.weight_format(base_format or ("int4-g64" if method == "qlora" else "bf16"))
    if method == "qlora" and base_fmt not in ("int4-g64", "nf4", "int4"):
        raise BadInputError(f"qlora needs a 4-bit base: base_format 'int4-g64' or 'nf4', not '{base_fmt}'")
    if method != "qlora":
        base_fmt = "bf16"

    def core(**changes) -> TrainingPlan:
        a = dict(method=method, precision=precision, optimizer=optimizer, seq_len=seq_len, batch_size=batch_size,
                 grad_accum=grad_accum, checkpointing=gradient_checkpointing, fused_ce=fused_ce, base_fmt=base_fmt,
                 offload=offload_checkpoints)
        a.update(changes)
        if a["method"] == "qlora" and a["base_fmt"] == "bf16":
            a["base_fmt"] = "int4-g64"
        if a["method"] != "qlora":
            a["base_fmt"] = "bf16"
        return _train_core(spec, gpu, mem, ctx_src, a["method"], a["precision"], a["optimizer"], a["seq_len"],
                           a["batch_size"], a["grad_accum"], a["checkpointing"], a["fused_ce"], lora_rank, targets,
                           a["base_fmt"], gpu_memory_utilization, a["offload"], peft_forward)

    plan = core()
    plan.max_batch_size = _largest(lambda b: core(batch_size=b).fits, 1, 1024)
    plan.max_seq_len = _largest(lambda s: core(seq_len=s, batch_size=1).fits, 1, spec.args.max_position_embeddings)
    plan.suggestions = _train_suggestions(plan, core, gpu, SUGGESTION_FLAGS[flags])
    plan.verdict = _verdict(plan.fits, gpu, plan.total_gib, plan.usable_gib, plan.free_gib, plan.suggestions,
                            _tokens_per_s(plan), card_name=mem.name)
    return plan


def _catalog_card(name: str) -> GPUSpec | None:
    try:
        return find_gpu(name)
    except BadInputError:
        return None


def _tokens_per_s(plan: TrainingPlan) -> str:
    return "" if plan.tokens_per_s is None else f"~{plan.tokens_per_s:,.0f} tokens/s"


def _largest(ok, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n) (ok is monotone: more tokens never need less memory); 0 if none."""
    if not ok(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# How each suggestion is spelled: as `onecard plan` options, or as `onecard train` options (the trainer's preflight).
SUGGESTION_FLAGS = {
    "plan": {"batch": "--batch", "ctx": "--ctx", "ckpt_on": "gradient checkpointing on", "ckpt_off": "--no-checkpointing",
             "fused": "fused linear+cross-entropy", "adam8": "8-bit AdamW", "method": "--method"},
    "train": {"batch": "--batch-size", "ctx": "--seq-len", "ckpt_on": "--gradient-checkpointing",
              "ckpt_off": "--no-gradient-checkpointing", "fused": "--fused", "adam8": "--optimizer adamw_8bit",
              "method": "--method"},
}


def _train_suggestions(plan: TrainingPlan, core, gpu: GPUSpec | None, f: dict[str, str]) -> list[str]:
    out: list[str] = []
    if plan.fits:
        if plan.max_batch_size > plan.batch_size:
            out.append(f"micro-batch up to {plan.max_batch_size} at seq {plan.seq_len:,}")
        if plan.gradient_checkpointing and core(checkpointing=False).fits:
            out.append(f"{f['ckpt_off']} also fits (~30% faster)")
        return out
    tried: list[tuple[str, dict]] = []
    if not plan.gradient_checkpointing:
        tried.append((f["ckpt_on"], dict(checkpointing=True)))
    if not plan.fused_ce:
        tried.append((f["fused"], dict(fused_ce=True)))
    if plan.batch_size > 1:
        tried.append((f"{f['batch']} 1 --grad-accum {plan.batch_size * plan.grad_accum}",
                      dict(batch_size=1, grad_accum=plan.batch_size * plan.grad_accum)))
    if plan.optimizer == "adamw":
        tried.append((f["adam8"], dict(optimizer="adamw-8bit")))
    if plan.method == "full":
        tried.append((f"{f['method']} lora", dict(method="lora")))
    if plan.method in ("full", "lora"):
        tried.append((f"{f['method']} qlora", dict(method="qlora", checkpointing=True)))
    for label, change in tried:
        p = core(**change)
        if p.fits:
            speed = _tokens_per_s(p)
            out.append(f"{label} (needs {p.total_gib:.1f} GiB{', ' + speed if speed else ''})")
    if plan.max_seq_len >= 128 and plan.max_seq_len < plan.seq_len:
        out.append(f"{f['ctx']} {plan.max_seq_len} at {f['batch']} 1")
    if not out:
        q = core(method="qlora", checkpointing=True, batch_size=1, fused_ce=True, optimizer="adamw-8bit")
        out.append(f"even QLoRA at batch 1 with every saving needs {q.total_gib:.1f} GiB" if not q.fits else
                   f"{f['method']} qlora {f['batch']} 1 with {f['fused']} and {f['adam8']} (needs {q.total_gib:.1f} GiB)")
    if gpu is None:
        return out
    bigger = [g for g in sorted(list_gpus(), key=lambda g: g.memory_gib) if g.memory_gib > gpu.memory_gib
              and plan.total_gib <= g.memory_gib * plan.gpu_memory_utilization]
    if bigger:
        out.append(f"a card with >= {plan.total_gib / plan.gpu_memory_utilization:.0f} GiB (e.g. {bigger[0].key})")
    return out
