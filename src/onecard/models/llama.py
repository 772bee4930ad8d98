"""onecard's own Llama-family forward: Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2.

The layout is the one the engine and our kernels want, not HF's:
``qkv_proj`` is one fused linear (q, k, v rows stacked), ``gate_up_proj`` is
one fused linear (gate rows then up rows), so a decoder layer is four GEMMs.
Every linear is a plain ``nn.Linear`` reached by attribute, so quantization
can swap it for any module with ``forward(x)`` (``onecard.quant``).

Tokens are *flat*: ``forward(input_ids[T], positions[T], meta)`` runs a whole
batch of sequences packed end to end. ``meta`` (``AttentionMetadata``) says
where each sequence starts and where its keys/values live in the paged cache;
``meta=None`` means "one sequence, no cache" (what the logits tests use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from onecard.kernels.paged_attention import (
    gather_kv,
    paged_decode_attention,
    paged_decode_attention_fused,
    rope_store_kv_triton,
    store_kv,
)
from onecard.kernels.varlen_attention import (PREFIX_GATHER_BYTES, cumulative, flash_varlen_usable, prefix_attention,
                                             prefix_groups, varlen_causal)
from onecard.models.config import ModelArgs

try:  # fused RMSNorm, add + RMSNorm and silu * up for CUDA tensors; same numerics as the PyTorch forms below
    from onecard.kernels.rmsnorm import add_rmsnorm_triton, rmsnorm_triton
    from onecard.kernels.swiglu import silu_mul_triton
except ImportError:  # pragma: no cover - no triton
    add_rmsnorm_triton = rmsnorm_triton = silu_mul_triton = None


@dataclass
class AttentionMetadata:
    """Where a packed batch's tokens go in the KV cache and what they attend to.

    Prefill: ``seq_lens`` (host ints) split the flat tokens into sequences, each
    attends causally to itself; with ``prefix_lens`` (host ints), sequence b's
    tokens come after ``prefix_lens[b]`` tokens already in the paged cache
    (prefix caching, chunked prefill) and attend to those too, found through
    ``block_tables[b]``. Decode: one token per sequence, attending to
    ``context_lens[b]`` cached tokens found through ``block_tables[b]``.
    ``slot_mapping[t]`` is the flat cache slot (block * block_size + offset) that
    token t's key/value are written to.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    seq_lens: list[int] | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    decode_attention: str = "reference"  # "reference" (PyTorch) or "triton"
    fused_rope_store: bool = False  # RoPE + cache write in one Triton kernel (CUDA; prefill and decode)
    fused_attention: bool = False  # decode, with fused_rope_store and triton: that and the attention in one launch
    # decode: plan the split-KV partitions as for this many rows, not the batch's own (see ModelRunner.static_step)
    split_rows: int | None = None
    prefix_lens: list[int] | None = None
    per_step: dict = field(default_factory=dict, repr=False)  # what every layer of one step reuses (varlen plans)


def rope_parameters(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, the factor cos and sin are multiplied by) of the checkpoint's RoPE: the scaling
    ``transformers`` applies for the same config (``modeling_rope_utils``), which the tests compare against.

    Dynamic NTK changes the base only for sequences longer than ``max_position_embeddings``, which the engine
    never runs (``max_model_len`` is capped there): within it, it is plain RoPE."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        return _yarn(args, scaling)
    return inv_freq, 1.0


def _yarn(args: ModelArgs, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023; Qwen2.5's long-context setting): high frequencies kept, low ones interpolated by
    ``factor``, a linear ramp between, and cos/sin scaled by ``0.1 ln(factor) + 1`` (unless given). The config
    reader wrote the original context and factor out (``config._yarn_context``)."""
    dim, base = args.head_dim, args.rope_theta
    original, factor = scaling["original_max_position_embeddings"], scaling["factor"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dimension that turns ``rotations`` times over ``original``
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate by factor
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(attention)


class RotaryEmbedding(nn.Module):
    """cos/sin table for every position up to ``max_positions``, computed once in fp32."""

    def __init__(self, args: ModelArgs, max_positions: int) -> None:
        super().__init__()
        self.args, self.max_positions = args, max_positions
        self.register_buffer("cos_sin", torch.empty(max_positions, args.head_dim), persistent=False)

    @torch.no_grad()
    def init_table(self) -> None:
        """Fill the table on its (already materialized) device; called by the loader after ``to_empty``."""
        inv_freq, attention = rope_parameters(self.args)
        inv_freq = inv_freq.to(self.cos_sin.device)
        t = torch.arange(self.max_positions, device=inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's "rotate_half" convention (first half / second half), computed in fp32 like HF.
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _fused(x: torch.Tensor) -> bool:
    """Whether the inference-only fused kernels (no backward) apply: CUDA, triton present, no autograd."""
    return x.is_cuda and add_rmsnorm_triton is not None and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.pending_sum = None  # tensor parallel: (sum, slot) when x is a rank's partial to sum first (dist.tp)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``, or with ``residual``: ``s = x + residual`` then ``(norm(s), s)`` (one kernel on CUDA)."""
        if residual is not None and self.pending_sum is not None and self.pending_sum[0].takes(x):
            fused, slot = self.pending_sum
            return fused(x, residual, self.weight, self.eps, slot)
        if residual is not None:
            if _fused(x):
                return add_rmsnorm_triton(x, residual, self.weight, self.eps)
            s = x + residual
            return self(s), s
        if x.is_cuda and rmsnorm_triton is not None:
            return rmsnorm_triton(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size, self.kv_size = args.q_size, args.kv_size
        self.scale = args.head_dim ** -0.5
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        # Paged cache views [num_blocks, block_size, num_kv_heads, head_dim], set by the engine's ModelRunner;
        # with kv_cache_dtype fp8/int8 also their per-(token, head) scales [num_blocks, block_size, num_kv_heads].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                meta: AttentionMetadata | None) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        if meta is not None and meta.fused_rope_store and not meta.is_prefill:
            if meta.fused_attention and meta.decode_attention == "triton":
                out = paged_decode_attention_fused(qkv, positions, rotary.cos_sin, self.k_cache, self.v_cache,
                                                   meta.slot_mapping, meta.block_tables, meta.context_lens,
                                                   self.num_heads, self.num_kv_heads, self.head_dim, self.scale,
                                                   self.k_scale, self.v_scale, plan_rows=meta.split_rows)
            else:
                q = rope_store_kv_triton(qkv, positions, rotary.cos_sin, self.k_cache, self.v_cache,
                                         meta.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim,
                                         self.k_scale, self.v_scale)
                out = paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                             self.scale, meta.decode_attention == "triton", self.k_scale,
                                             self.v_scale, meta.split_rows)
            return self.o_proj(out.reshape(T, self.q_size))
        if meta is not None and meta.fused_rope_store and self.k_cache is not None:  # prefill: RoPE + cache write in
            # one kernel (PyTorch's fp32 RoPE and a quantized store are ~20 elementwise kernels over every new token)
            q, k = rope_store_kv_triton(qkv, positions, rotary.cos_sin, self.k_cache, self.v_cache, meta.slot_mapping,
                                        self.num_heads, self.num_kv_heads, self.head_dim, self.k_scale, self.v_scale,
                                        return_k=True)
            v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(T, self.num_heads, self.head_dim)
            k = k.view(T, self.num_kv_heads, self.head_dim)
            v = v.view(T, self.num_kv_heads, self.head_dim)
            q, k = rotary(positions, q, k)
            if meta is not None and self.k_cache is not None:
                store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        if meta is not None and meta.is_prefill and meta.prefix_lens is not None:
            if flash_varlen_usable(q):
                if "prefix" not in meta.per_step:
                    budget = PREFIX_GATHER_BYTES // (2 * self.k_cache[0, 0].numel() * q.element_size())
                    meta.per_step["prefix"] = prefix_groups(meta.seq_lens, meta.prefix_lens, meta.block_tables,
                                                            self.k_cache.shape[1], max(budget, 1))
                out = prefix_attention(q, self.k_cache, self.v_cache, meta.per_step["prefix"], self.scale,
                                       self.k_scale, self.v_scale)
            else:
                out = prefill_attention_with_prefix(q, self.k_cache, self.v_cache, meta.seq_lens, meta.prefix_lens,
                                                    meta.block_tables, self.scale, self.k_scale, self.v_scale)
        elif meta is None or meta.is_prefill:
            seq_lens = meta.seq_lens if meta is not None else [T]
            if flash_varlen_usable(q):
                cache = meta.per_step if meta is not None else {}
                if "cu" not in cache:
                    cache["cu"] = cumulative(seq_lens, q.device)
                out = varlen_causal(q, k, v, cache["cu"], cache["cu"], max(seq_lens), max(seq_lens), self.scale)
            else:
                out = prefill_attention(q, k, v, seq_lens, self.scale)
        else:
            out = paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                         self.scale, meta.decode_attention == "triton", self.k_scale, self.v_scale,
                                         meta.split_rows)
        return self.o_proj(out.reshape(T, self.q_size))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                      scale: float) -> torch.Tensor:
    """Causal attention of each packed sequence over itself via SDPA (flash / mem-efficient on GPU).

    One SDPA call per sequence: prefill is compute-bound, so the loop's launch
    cost is small next to the attention itself, and no padding is wasted.
    """
    gqa = q.shape[1] != k.shape[1]
    outs, start = [], 0
    for n in seq_lens:
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        if gqa:
            rep = q.shape[1] // k.shape[1]
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                                                   is_causal=True, scale=scale)[0].transpose(0, 1))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def prefill_attention_with_prefix(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: list[int],
                                  prefix_lens: list[int], block_tables: torch.Tensor, scale: float,
                                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                                  ) -> torch.Tensor:
    """Prefill of packed sequences whose first ``prefix_lens[b]`` tokens are already in the paged cache.

    Runs after this step's keys/values were stored, so each sequence's whole context (prefix + new tokens) is
    gathered from its blocks (dequantized to q's dtype when the cache is fp8/int8: then the new tokens, too, see
    their own keys as stored); query i (position ``prefix + i``) sees keys ``0..prefix + i``. Queries are tiled so
    the mask and the score matrix stay bounded at long contexts. A sequence with no prefix takes the same path
    (its keys read back from an unquantized cache equal the fresh ones).
    """
    block_size = k_cache.shape[1]
    outs, start = [], 0
    for b, (n, p) in enumerate(zip(seq_lens, prefix_lens)):
        ctx = p + n
        blocks = block_tables[b, :(ctx + block_size - 1) // block_size].long()
        ks = gather_kv(k_cache, k_scale, blocks, q.dtype).flatten(0, 1)[:ctx].transpose(0, 1)  # [kv_heads, ctx, D]
        vs = gather_kv(v_cache, v_scale, blocks, q.dtype).flatten(0, 1)[:ctx].transpose(0, 1)
        if q.shape[1] != ks.shape[0]:
            rep = q.shape[1] // ks.shape[0]
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        qs = q[start:start + n].transpose(0, 1)  # [H, n, D]
        tile = max(1, min(n, (1 << 27) // max(1, q.shape[1] * ctx)))
        key_pos = torch.arange(ctx, device=q.device)
        for t0 in range(0, n, tile):
            t1 = min(n, t0 + tile)
            mask = key_pos[None, :] <= (p + torch.arange(t0, t1, device=q.device))[:, None]
            outs.append(F.scaled_dot_product_attention(qs[None, :, t0:t1], ks[None], vs[None], attn_mask=mask,
                                                       scale=scale)[0].transpose(0, 1))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x):
            fused = getattr(self.gate_up_proj, "forward_silu_mul", None)  # the bf16/fp16 decode GEMV: silu * up in
            # its epilogue, one launch less per layer (kernels.gemv.gemv, gated=True)
            return self.down_proj(fused(x) if fused is not None else silu_mul_triton(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rotary: RotaryEmbedding, meta: AttentionMetadata | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp output, residual stream before it)``; the next layer's norm adds the two (one fused kernel
        on CUDA instead of an add and a norm). ``residual`` is None at the first layer, whose ``x`` is the stream."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rotary, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """The whole causal LM: ``embed_tokens`` -> ``layers`` -> ``norm`` -> ``lm_head``.

    ``forward`` returns final hidden states; ``compute_logits`` applies the head
    (separately, so the engine computes logits only for the tokens it samples).
    """

    def __init__(self, args: ModelArgs, max_positions: int | None = None) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(args, max_positions or args.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs_embeds[T, hidden]``, when given, replaces ``embed_tokens(input_ids)``: how a vision model's
        image features enter as prefix embeddings (``onecard.vision``)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, meta)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits ``[T, vocab]`` for one sequence, no cache (tests, perplexity)."""
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.compute_logits(self(input_ids.reshape(-1), positions))
