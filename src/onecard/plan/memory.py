"""Bytes, from shapes alone: weights, KV cache, activations, optimizer state, allocator rounding.

Pure functions over a ``ModelSpec``; every constant here is a layout fact
(how a format stores a tensor, what autograd saves) rather than a fudge factor,
so ``benchmarks/plan_accuracy.py`` can check each term against a measured peak.
"""

from __future__ import annotations

import math

from onecard.errors import BadInputError
from onecard.plan.spec import ModelSpec

GIB = 1024**3
MIB = 1024**2

# Weight formats: what a linear weight costs in each (bits per weight alone is not enough: scales and zeros count).
WEIGHT_FORMATS = {
    "fp32": "32-bit weights (float32)",
    "bf16": "16-bit weights (bf16/fp16)",
    "int8": "int8, per-channel fp16 scale + zero (onecard QuantLinear)",
    "fp8": "float8 e4m3, per-channel fp32 scale (onecard Fp8Linear)",
    "int4": "int4 g128, fp16 scales + zeros (onecard QuantLinear, GPTQ/AWQ/RTN)",
    "int4-g64": "int4 g64, bf16 scales (onecard QLoRA base)",
    "nf4": "NF4 block 64, double-quantized absmax (bitsandbytes QLoRA base)",
}
BITS_TO_FORMAT = {16: "bf16", 8: "int8", 4: "int4"}
GROUP_SIZE = 128
NF4_BLOCK = 64

# KV cache element formats: bytes per element, and whether a per-(token, head) fp16 scale is stored beside it.
# (element bytes, per-token-per-head fp16 scales stored) — the engine's fp8 and int8 caches both keep scales.
KV_FORMATS = {"auto": (2, False), "bf16": (2, False), "fp16": (2, False), "fp32": (4, False), "fp8": (1, True),
              "fp8_e4m3": (1, True), "int8": (1, True)}
# Bytes per logit row the engine's sampling step holds at once: bf16 logits, their fp32 copy, the log-softmax and the
# sampler's sort (fp32 values + int64 indices); the start-up profile runs exactly this for max_num_seqs rows.
SAMPLED_LOGIT_BYTES = 2 + 4 + 4 + 4 + 8

# cuBLAS/cuBLASLt workspaces and small kernels' buffers that live in the torch allocator.
WORKSPACE_BYTES = 64 * MIB
# The caching allocator carves tensors of 1-10 MiB out of 20 MiB segments and keeps < 1 MiB ones in 2 MiB
# segments: a partly used segment of each pool is the slack we count.
ALLOCATOR_SLACK_BYTES = 20 * MIB + 2 * MIB


def weight_format(bits: int | str) -> str:
    """16/8/4 or a format name -> a key of ``WEIGHT_FORMATS``."""
    fmt = BITS_TO_FORMAT.get(bits, bits) if isinstance(bits, int) else str(bits).lower()
    if fmt not in WEIGHT_FORMATS:
        raise BadInputError(f"unknown weight format '{bits}'; use bits 16, 8 or 4, or one of {', '.join(WEIGHT_FORMATS)}")
    return fmt


def linear_tensor_bytes(out_features: int, in_features: int, fmt: str) -> list[int]:
    """The stored tensors (bytes each) of one linear weight in ``fmt``."""
    n = out_features * in_features
    if fmt == "fp32":
        return [4 * n]
    if fmt == "bf16":
        return [2 * n]
    if fmt == "int8":  # QuantLinear: int32-packed codes [in/4, out], fp16 scales and zeros [1, out]
        return [n, 2 * out_features, 2 * out_features]
    if fmt == "fp8":  # Fp8Linear: e4m3 codes [out, in], fp32 scales [1, out]
        return [n, 4 * out_features]
    if fmt == "int4":  # QuantLinear: int32-packed codes [in/8, out], fp16 scales and zeros [groups, out]
        groups = math.ceil(in_features / GROUP_SIZE)
        return [n // 2, 2 * groups * out_features, 2 * groups * out_features]
    if fmt == "int4-g64":  # train.qlora.Int4Linear: uint8 nibbles [out, in/2], bf16 scales [out, in/64]
        return [n // 2, 2 * out_features * math.ceil(in_features / 64)]
    if fmt == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        return [n // 2, blocks, 4 * math.ceil(blocks / 256), 4 * 256 + 4 * 16]  # packed, absmax u8, nested absmax, codes
    raise BadInputError(f"unknown weight format '{fmt}'; one of {', '.join(WEIGHT_FORMATS)}")


def weight_tensors(spec: ModelSpec, fmt: str = "bf16") -> list[tuple[str, int, int]]:
    """(name, bytes, count) for every stored tensor; decoder-layer linears in ``fmt``, the rest 16-bit (32 for fp32).

    Embeddings, lm_head, norms, biases and a vision tower stay 16-bit in every
    quantized format (what onecard.quant, GPTQ/AWQ checkpoints and QLoRA bases do).
    """
    a = spec.args
    L = a.num_layers
    e = 4 if fmt == "fp32" else 2
    rows: list[tuple[str, int, int]] = []
    for name, out_f, in_f in spec.linear_shapes():
        for k, nbytes in enumerate(linear_tensor_bytes(out_f, in_f, fmt)):
            rows.append((f"{name}.{k}", nbytes, L))
    if a.qkv_bias:
        rows += [("q_proj.bias", e * a.q_size, L), ("k_proj.bias", e * a.kv_size, L), ("v_proj.bias", e * a.kv_size, L)]
    rows.append(("layer norms", e * a.hidden_size, 2 * L))
    rows.append(("embed_tokens", e * a.vocab_size * a.hidden_size, 1))
    rows.append(("final norm", e * a.hidden_size, 1))
    if not a.tie_word_embeddings:
        rows.append(("lm_head", e * a.vocab_size * a.hidden_size, 1))
    if spec.vision is not None:
        rows.append(("vision tower", e * spec.vision.tower_parameters(), 1))
        rows.append(("projector", e * spec.vision.projector_parameters(), 1))
    return rows


def weight_bytes(spec: ModelSpec, fmt: str = "bf16") -> int:
    return sum(nbytes * count for _, nbytes, count in weight_tensors(spec, fmt))


def allocator_bytes(nbytes: int) -> int:
    """What torch's CUDA caching allocator reserves for one tensor of ``nbytes``.

    Sizes round up to 512 B; a request over 10 MiB gets its own segment rounded
    up to 2 MiB (PyTorch's kRoundLarge), so a 7B model's 291 tensors waste up to
    ~0.3 GiB that a weights-only estimate misses.
    """
    n = max(512, -(-nbytes // 512) * 512)
    if n > 10 * MIB:
        n = -(-n // (2 * MIB)) * (2 * MIB)
    return n


def reserved_bytes(tensors: list[tuple[str, int, int]]) -> int:
    return sum(allocator_bytes(nbytes) * count for _, nbytes, count in tensors)


def kv_bytes_per_token(spec: ModelSpec, kv_cache_dtype: str = "auto") -> int:
    """K and V for one token over all layers: 2 x layers x kv_heads x head_dim x element bytes (+ int8 scales)."""
    if kv_cache_dtype not in KV_FORMATS:
        raise BadInputError(f"unknown kv_cache_dtype '{kv_cache_dtype}'; one of {', '.join(KV_FORMATS)}")
    elem, scaled = KV_FORMATS[kv_cache_dtype]
    a = spec.args
    per_layer = 2 * a.num_kv_heads * a.head_dim * elem + (2 * a.num_kv_heads * 2 if scaled else 0)
    return a.num_layers * per_layer


def kv_cache_tensors(spec: ModelSpec, tokens: int, kv_cache_dtype: str = "auto") -> list[tuple[str, int, int]]:
    """A pre-allocated cache (engine blocks or HF StaticCache): one K and one V tensor per layer."""
    per_layer_tensor = kv_bytes_per_token(spec, kv_cache_dtype) // (2 * spec.args.num_layers) * tokens
    return [("kv cache", per_layer_tensor, 2 * spec.args.num_layers)]


def inference_activation_bytes(spec: ModelSpec, prefill_tokens: int, num_seqs: int, max_model_len: int,
                               attention_mask: bool = False) -> int:
    """Peak transient memory of the largest forward (a prefill of ``prefill_tokens``), no autograd.

    Per token: the residual stream and hidden state stay live (2 x 2h bytes) while
    the widest phase runs: RMSNorm's fp32 upcast (x, x^2, x*rsqrt: 3 x 4h), the
    attention projections + RoPE + output (about 10q + 6kv bytes), or SwiGLU's
    gate, up, silu(gate) and product (4 x 2i). Then logits for the last token of
    each sequence (bf16 + fp32 copy for sampling), the vision tower when there
    is one, and with ``attention_mask`` (HF generate with a static cache; the
    engine's paged attention has none) a bool mask of query x cache length.
    """
    a = spec.args
    h, i, q, kv = a.hidden_size, a.intermediate_size, a.q_size, a.kv_size
    per_token = 4 * h + max(12 * h, 10 * q + 6 * kv, 8 * i)
    logits = min(num_seqs, prefill_tokens) * a.vocab_size * SAMPLED_LOGIT_BYTES
    mask = prefill_tokens * max_model_len if attention_mask else 0
    vision = 0
    if spec.vision is not None:
        v = spec.vision
        # One image: the tower's widest layer (MLP) on its tokens in bf16, plus the projected features.
        vision = (v.image_tokens + 1) * (4 * v.hidden_size + 2 * 2 * v.intermediate_size) + v.image_tokens * 4 * h
    return prefill_tokens * per_token + logits + mask + vision + WORKSPACE_BYTES


LORA_TARGETS = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
}


def lora_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        if targets not in LORA_TARGETS:
            raise BadInputError(f"unknown LoRA target set '{targets}'; one of {', '.join(LORA_TARGETS)} or a list of module names")
        return LORA_TARGETS[targets]
    bad = [t for t in targets if t not in LORA_TARGETS["all"]]
    if bad:
        raise BadInputError(f"unknown LoRA target module(s) {bad}; choose from {', '.join(LORA_TARGETS['all'])}")
    return tuple(targets)


def lora_parameters(spec: ModelSpec, rank: int, targets: tuple[str, ...]) -> int:
    """A (rank x in) + B (out x rank) per targeted linear per layer."""
    if rank < 1:
        raise BadInputError(f"LoRA rank must be >= 1, got {rank}")
    return spec.args.num_layers * sum(rank * (in_f + out_f) for name, out_f, in_f in spec.linear_shapes() if name in targets)


def layer_activation_bytes(spec: ModelSpec, method: str, targets: tuple[str, ...] = LORA_TARGETS["all"], *,
                           mixed: bool = False, lora_rank: int = 16, adapter_bytes: int = 2,
                           base_format: str = "int4-g64", fused: bool = False) -> int:
    """Bytes autograd saves per token in one decoder layer (bf16 compute, SDPA flash/efficient attention).

    Derived from the autograd graph of transformers' Llama/Qwen2 layer and PEFT's
    LoRA layer, and checked tensor by tensor with saved-tensor hooks in
    tests/test_plan_memory.py. ``method``: "full" trains every weight (norms
    keep their normalized input, linears their input); "lora" freezes the base
    (a frozen linear keeps nothing); "qlora" is "lora" on a 4-bit base:
    onecard's Int4Linear keeps only its codes (like a frozen linear),
    bitsandbytes' NF4 matmul also keeps its bf16 input. ``mixed``: fp32 master
    weights under bf16 autocast, so the residual stream and norms are fp32.

    LoRA targets keep, with ``adapter_bytes=2`` (onecard's ``lean_lora_forward``,
    what ``onecard.train.lora.add_lora`` installs), their bf16 input once per
    distinct input plus A's output; with ``adapter_bytes=4`` (PEFT's own forward,
    the HF + PEFT reference) each target its own fp32 copy of its input.
    ``fused`` (LoRA/QLoRA; onecard.train.patching, what ``--fused`` turns on):
    the fused RMSNorm keeps its bf16 input and 1/rms instead of an fp32 copy, the
    fused SwiGLU keeps gate and up only (``mlp_activation_bytes``).
    """
    if method not in ("full", "lora", "qlora"):
        raise BadInputError(f"unknown training method '{method}'; one of full, lora, qlora")
    a = spec.args
    h, q, kv = a.hidden_size, a.q_size, a.kv_size
    res = 4 if mixed else 2
    attn = 2 * q + 2 * kv + 2 * kv + 2 * q + 4 * a.num_heads  # SDPA keeps q, k (after RoPE), v, out, logsumexp
    if method == "full":
        norms = 2 * (4 * h + 4) + 2 * (res * h + 2 * h)  # fp32 input and rsqrt; normalized input and bf16 output
        return norms + attn + 3 * 2 * a.intermediate_size + 2 * a.intermediate_size  # + down_proj's input
    fused = fused and not mixed
    norms = 2 * ((2 if fused else 4) * h + 4)  # both RMSNorms: their input (fused: bf16; HF: the fp32 upcast), rsqrt
    shapes = {name: (out_f, in_f) for name, out_f, in_f in spec.linear_shapes()}
    if adapter_bytes == 2:  # lean: one kept bf16 copy per distinct input (the MLP's inputs are in mlp_activation_bytes)
        lora = 2 * lora_rank * len(set(targets) - MLP_TARGETS) + \
            (2 * h if set(targets) & {"q_proj", "k_proj", "v_proj"} else 0) + (2 * h if set(targets) & {"gate_proj", "up_proj"} else 0)
    else:  # PEFT's fp32 adapters: each target casts its input and keeps that copy, plus A's output
        lora = sum(adapter_bytes * (shapes[t][1] + lora_rank) for t in targets if t not in MLP_TARGETS) + \
            sum(adapter_bytes * (shapes[t][1] + lora_rank) for t in targets if t in ("gate_proj", "up_proj"))
    base = 0
    if method == "qlora" and base_format == "nf4":
        base = 2 * h + 2 * h + 2 * a.intermediate_size  # bitsandbytes' 4-bit matmul keeps its bf16 input: two norm outputs, the MLP product
    mlp = mlp_activation_bytes(spec, targets, lora_rank=lora_rank, adapter_bytes=adapter_bytes, fused=fused)
    return norms + attn + lora + base + mlp


MLP_TARGETS = frozenset({"gate_proj", "up_proj", "down_proj"})
# onecard.train.patching runs a fused MLP in pieces of this many tokens above it (defined here, where
# the planner counts it, so planning does not import the training kernels)
MLP_CHUNK_TOKENS = 16384


def mlp_activation_bytes(spec: ModelSpec, targets: tuple[str, ...], *, lora_rank: int = 16, adapter_bytes: int = 2,
                         fused: bool = False) -> int:
    """Per token, what a LoRA layer's MLP keeps besides its input: gate, up (and HF's silu(gate)), down_proj's
    adapter input, the MLP adapters' A outputs. The part ``onecard.train.patching`` runs in token chunks."""
    i = spec.args.intermediate_size
    kept = (2 if fused else 3) * 2 * i  # fused SwiGLU: gate and up; HF: gate, silu(gate), up
    mlp_targets = [t for t in targets if t in MLP_TARGETS]
    if adapter_bytes == 2:
        return kept + 2 * lora_rank * len(mlp_targets) + (2 * i if "down_proj" in targets else 0)
    return kept + (adapter_bytes * (i + lora_rank) if "down_proj" in targets else 0)


def layer_saved_bytes(spec: ModelSpec, tokens: int, method: str, targets: tuple[str, ...], *, mixed: bool = False,
                      lora_rank: int = 16, adapter_bytes: int = 2, base_format: str = "int4-g64",
                      fused: bool = False) -> int:
    """One layer's saved set over ``tokens`` tokens, as its recomputation holds it. Fused LoRA/QLoRA runs the MLP
    in chunks of ``MLP_CHUNK_TOKENS`` above that length: its MLP part then holds one chunk's worth."""
    per_token = layer_activation_bytes(spec, method, targets, mixed=mixed, lora_rank=lora_rank,
                                       adapter_bytes=adapter_bytes, base_format=base_format, fused=fused)
    if method == "full" or mixed or not fused or tokens <= MLP_CHUNK_TOKENS:
        return tokens * per_token
    mlp = mlp_activation_bytes(spec, targets, lora_rank=lora_rank, adapter_bytes=adapter_bytes, fused=True)
    return tokens * (per_token - mlp) + MLP_CHUNK_TOKENS * mlp


def model_activation_bytes(spec: ModelSpec, tokens: int, method: str, targets: tuple[str, ...], *, mixed: bool,
                           checkpointing: bool, lora_rank: int = 16, adapter_bytes: int = 2,
                           base_format: str = "int4-g64", offload: bool = False, fused: bool = False) -> int:
    """Saved activations of a forward over ``tokens`` (batch x seq), before the loss.

    Without checkpointing every layer keeps ``layer_activation_bytes``; with
    HF's per-layer checkpointing each layer keeps only its input and one layer
    is recomputed at a time during backward (its saved tensors plus their
    gradients, counted as twice the layer, ``layer_saved_bytes``). ``offload``
    (onecard.train's offloaded checkpoints): the layer inputs wait in CPU
    memory, one at a time is on the GPU. Plus the final norm, RoPE cos/sin.
    """
    a = spec.args
    res = 4 if mixed else 2
    fused_norm = fused and method != "full" and not mixed
    final_norm = (2 if fused_norm else 4) * a.hidden_size + 4 + ((res + 2) * a.hidden_size if method == "full" else 0)
    rope = 2 * 2 * a.head_dim
    kw = dict(mixed=mixed, lora_rank=lora_rank, adapter_bytes=adapter_bytes, base_format=base_format, fused=fused)
    # the lean LoRA forward keeps a bf16 copy of every adapter's A and scaled B, made once per forward pass and
    # read by the recomputation and the backward (train.lora._compute_copy; held until the next pass remakes it)
    copies = 2 * lora_parameters(spec, lora_rank, targets) if method != "full" and adapter_bytes == 2 else 0
    if checkpointing:
        kept_inputs = 1 if offload else a.num_layers
        layer = layer_saved_bytes(spec, tokens, method, targets, **kw)
        layers = tokens * kept_inputs * res * a.hidden_size + 2 * layer + copies
    else:
        layers = a.num_layers * tokens * layer_activation_bytes(spec, method, targets, **kw) + copies
    return layers + tokens * (final_norm + rope + 8)


# What the caching allocator holds for an unfused loss, per logit (transformers' ForCausalLMLoss): forward keeps
# segments for the bf16 logits (2), their fp32 upcast (4) and the log-softmax (4); backward puts nll's gradient (4)
# in the freed upcast's segment, needs a new one for log-softmax's gradient (4), and the bf16 gradient reuses the
# freed bf16 logits' segment.
LOSS_SEGMENT_BYTES = 2 + 4 + 4 + 4


def loss_segment_bytes(spec: ModelSpec, tokens: int, fused_ce: bool) -> int:
    """Reserved segments of the loss (``LOSS_SEGMENT_BYTES`` per logit; a fused loss's chunks as ``logits_bytes``)."""
    return logits_bytes(spec, tokens, True) if fused_ce else tokens * spec.args.vocab_size * LOSS_SEGMENT_BYTES


def checkpointed_peak_bytes(saved_bytes: int, layer_bytes: int, loss_bytes: int) -> int:
    """Reserved activation + loss peak of a checkpointed forward/backward (``saved_bytes``: ``model_activation_bytes``
    with checkpointing, which counts the recomputed layer twice; ``layer_bytes``: one layer's saved set, all tokens).

    A checkpointed layer's forward still creates its whole saved set and frees it: those blocks stay cached, and
    the loss's [tokens, vocab] tensors are too large to be carved from them, so the loss's segments come on top
    of one layer's. The loss is freed before the first layer is recomputed, and the recompute (saved set and its
    gradients, two layers) is carved from those cached segments; it needs more only when two layers exceed one
    layer plus the loss (wide layers, a small vocabulary). Adding the loss to the recompute (as a peak of live
    tensors would) double-counts: 1 GiB too much for Llama-2 (32k vocabulary) LoRA at 4,096 tokens.
    """
    kept = saved_bytes - 2 * layer_bytes  # the checkpoints (layer inputs), final norm, RoPE tables
    return kept + max(layer_bytes + loss_bytes, 2 * layer_bytes)


def logits_bytes(spec: ModelSpec, tokens: int, fused_ce: bool) -> int:
    """Peak of the loss: fp32 log-softmax kept for backward, its incoming and outgoing grads (3 x 4 B per logit).

    A fused linear + cross-entropy computes it in chunks and never holds the
    full [tokens, vocab] matrix (we count two 1024-token chunks).
    """
    rows = min(tokens, 1024) if fused_ce else tokens
    return rows * spec.args.vocab_size * (2 * 4 if fused_ce else 3 * 4)
