"""Speed: decode is bytes over bandwidth (or FLOPs over compute) plus fixed latencies, training is FLOPs over compute.

Every figure of the card comes from the catalog (``onecard.hardware``); the
efficiencies and latencies onecard reaches come from ``calibration`` (the
decode step-time model of ``decode_fit``, fitted to onecard's measurements).
"""

from __future__ import annotations

from onecard.hardware import GPUSpec
from onecard.plan import memory as M
from onecard.plan.calibration import HOST_LINK_EFFICIENCY, DecodeCalibration
from onecard.plan.decode_fit import StepBytes, step_bytes
from onecard.plan.spec import ModelSpec


def decode_bytes_per_step(spec: ModelSpec, fmt: str) -> int:
    """Weight bytes a decode step reads: everything but the embedding table (one row is read) and a vision tower."""
    skip = {"vision tower", "projector"} | (set() if spec.args.tie_word_embeddings else {"embed_tokens"})
    return sum(nbytes * count for name, nbytes, count in M.weight_tensors(spec, fmt) if name not in skip)


def forward_flops_per_token(spec: ModelSpec, context: int) -> float:
    """2 FLOPs per weight of every matmul, plus attention's QK^T and PV over ``context`` keys."""
    a = spec.args
    linear = a.num_layers * sum(o * i for _, o, i in spec.linear_shapes()) + a.vocab_size * a.hidden_size
    return 2.0 * linear + 4.0 * a.num_layers * context * a.q_size


def decode_tok_s(spec: ModelSpec, card: GPUSpec, fmt: str, kv_bytes_per_token: int, batch: int, context: int,
                 cal: DecodeCalibration) -> float:
    """Tokens/s of a decode step for ``batch`` sequences each at ``context`` tokens: the slower of memory (the
    weights' time scaled by the format's measured batch factor, plus the KV read) and compute, plus the fitted
    per-layer and per-step latencies."""
    b = step_bytes(spec, fmt, context, kv_bytes_per_token, batch)
    t_mem = cal.model.memory_seconds(b, card.bandwidth_gbs * 1e9, fmt, batch)
    t_compute = batch * forward_flops_per_token(spec, context) / (card.bf16_dense_tflops * 1e12 * cal.efficiency)
    return batch / (max(t_mem, t_compute) + b.layers * cal.model.per_layer_s + cal.model.per_step_s)


def offload_tok_s(spec: ModelSpec, card: GPUSpec, fmt: str, offloaded_bytes: int, kv_bytes_per_token: int,
                  context: int, cal: DecodeCalibration) -> float:
    """bs=1 decode with ``offloaded_bytes`` of decoder-layer weights streamed from host memory over the host link
    every step (they are decoder-layer linears: quantized bytes, or 16-bit ones for bf16); the rest as ``decode_tok_s``."""
    b = step_bytes(spec, fmt, context, kv_bytes_per_token)
    on_gpu = StepBytes(b.quantized - (offloaded_bytes if b.quantized else 0),
                       b.plain - (0 if b.quantized else offloaded_bytes), b.layers, b.kv)
    t = offloaded_bytes / (card.host_link_gbs * 1e9 * HOST_LINK_EFFICIENCY) + \
        cal.model.step_seconds(on_gpu, card.bandwidth_gbs, fmt)
    return 1.0 / t


def train_flops_per_token(spec: ModelSpec, method: str, seq_len: int, checkpointing: bool) -> float:
    """FLOPs a training step executes per token: forward 2N, backward 4N (full) or 2N (frozen base: input grads
    only).

    Checkpointing adds one more forward; with a frozen base, that recomputation
    skips each layer's down projection (its output is never read:
    ``train.lora.last_linear``). Attention costs 4 x layers x seq/2 x q_size per
    token forward (causal), times the same multiple.
    """
    a = spec.args
    passes = (3.0 if method == "full" else 2.0) + (1.0 if checkpointing else 0.0)
    flops = passes * forward_flops_per_token(spec, seq_len // 2)
    if checkpointing and method != "full":
        flops -= 2.0 * a.num_layers * a.hidden_size * a.intermediate_size
    return flops


def train_tok_s(spec: ModelSpec, card: GPUSpec, method: str, seq_len: int, tokens_per_step: int, checkpointing: bool,
                mfu: float, base_fmt: str = "bf16") -> float:
    """Training tokens/s: ``train_flops_per_token`` at ``mfu`` of the card's dense bf16 peak. A 4-bit base is
    dequantized to bf16 once per forward and backward pass: that memory traffic is added per optimizer step."""
    a = spec.args
    t_step = tokens_per_step * train_flops_per_token(spec, method, seq_len, checkpointing) / \
        (card.bf16_dense_tflops * 1e12 * mfu)
    if base_fmt != "bf16":
        linear_bf16 = 2 * a.num_layers * sum(o * i for _, o, i in spec.linear_shapes())
        per_pass = M.weight_bytes(spec, base_fmt) + linear_bf16
        t_step += (2 + (1 if checkpointing else 0)) * per_pass / (card.bandwidth_gbs * 1e9)
    return tokens_per_step / t_step
