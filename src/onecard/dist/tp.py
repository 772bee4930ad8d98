"""Tensor parallelism for our Llama-family model (``onecard.models.llama``), Megatron style.

Each decoder layer does two all-reduces and nothing else crosses ranks:

- ``qkv_proj`` and ``gate_up_proj`` are column-parallel: rank r keeps its
  slice of the q heads, of the k/v heads, of the gate rows and of the up rows
  (each fused part sliced separately, so the fused layout survives sharding);
- ``o_proj`` and ``down_proj`` are row-parallel: rank r keeps the matching
  input columns, and the partial outputs are summed with ``all_reduce``.

Attention then runs on ``num_heads / tp`` local heads against a KV cache of
``num_kv_heads / tp`` local heads (``local_kv_heads``), so the cache is
sharded too. When a GQA model has fewer KV heads than ranks (Llama-3-8B has 8,
Qwen2-7B has 4), each KV head is replicated on ``tp / num_kv_heads`` ranks,
as vLLM does: every rank's q heads still map onto exactly one local KV head.
Embedding, norms and ``lm_head`` stay replicated (small next to the layers),
so every rank ends with the full logits and samples the same token.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from onecard.errors import BadInputError, NotBuiltYetError
from onecard.models.config import ModelArgs
from onecard.models.llama import LlamaModel


class RowParallelLinear(nn.Module):
    """``linear`` holding this rank's input columns, then a sum over the group: the full output on every rank."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        dist.all_reduce(out, group=self.group)
        return out


def check_tp(args: ModelArgs, tp_size: int) -> None:
    """Raise a one-line error if ``args`` cannot be split over ``tp_size`` ranks."""
    if tp_size < 1:
        raise BadInputError(f"tensor-parallel size must be >= 1, got {tp_size}")
    problems = []
    if args.num_heads % tp_size:
        problems.append(f"{args.num_heads} attention heads")
    if args.num_kv_heads % tp_size and tp_size % args.num_kv_heads:
        problems.append(f"{args.num_kv_heads} key/value heads (need a multiple or a divisor of {tp_size})")
    if args.intermediate_size % tp_size:
        problems.append(f"intermediate size {args.intermediate_size}")
    if problems:
        raise BadInputError(f"cannot split this model over {tp_size} GPUs: {', '.join(problems)} do not divide; "
                            "choose a tensor-parallel size that divides them (2, 4, 8 usually do)")


def local_kv_heads(args: ModelArgs, tp_size: int) -> int:
    """KV heads each rank stores (what the engine sizes its per-rank cache with)."""
    check_tp(args, tp_size)
    return max(1, args.num_kv_heads // tp_size)


def _kv_head_range(args: ModelArgs, tp_rank: int, tp_size: int) -> tuple[int, int]:
    n = local_kv_heads(args, tp_size)
    first = tp_rank * n if args.num_kv_heads >= tp_size else tp_rank // (tp_size // args.num_kv_heads)
    return first, n


def _rows(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    return t.narrow(0, start, length)


def _replace_(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Swap in a sliced weight (a fresh contiguous tensor, so the full one is freed)."""
    req = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=req)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=req)
    linear.out_features, linear.in_features = weight.shape


@torch.no_grad()
def shard_model_(model: LlamaModel, tp_rank: int, tp_size: int, group: dist.ProcessGroup | None = None) -> LlamaModel:
    """Slice a loaded (full) model in place down to rank ``tp_rank``'s shard of ``tp_size``; returns it.

    Works on real or ``meta`` tensors (shard on meta, then ``to_empty``: a
    model larger than one card never has to exist whole). ``group`` is the
    tensor-parallel process group (None = the default world group). Afterwards
    ``model.args`` holds the local head counts and MLP width (what this rank
    stores) and ``model.full_args`` the checkpoint's.
    """
    args = model.args
    check_tp(args, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise BadInputError(f"tensor-parallel rank {tp_rank} is outside 0..{tp_size - 1}")
    if tp_size == 1:
        return model
    hd = args.head_dim
    q_local = args.num_heads // tp_size
    kv_first, kv_local = _kv_head_range(args, tp_rank, tp_size)
    i_local = args.intermediate_size // tp_size
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj), ("gate_up_proj", mlp.gate_up_proj),
                          ("down_proj", mlp.down_proj)):
            if type(lin) is not nn.Linear:
                raise NotBuiltYetError(f"tensor parallelism of a quantized model ({name} is {type(lin).__name__}) "
                                       "is not built yet; shard the bf16 model")

        def qkv_slice(t: torch.Tensor) -> torch.Tensor:
            q, k, v = t.split([args.q_size, args.kv_size, args.kv_size], dim=0)
            return torch.cat([_rows(q, tp_rank * q_local * hd, q_local * hd),
                              _rows(k, kv_first * hd, kv_local * hd), _rows(v, kv_first * hd, kv_local * hd)])

        qkv = attn.qkv_proj
        _replace_(qkv, qkv_slice(qkv.weight), qkv_slice(qkv.bias) if qkv.bias is not None else None)
        o = attn.o_proj
        _replace_(o, o.weight.narrow(1, tp_rank * q_local * hd, q_local * hd), None)
        attn.o_proj = RowParallelLinear(o, group)
        attn.num_heads, attn.num_kv_heads = q_local, kv_local
        attn.q_size, attn.kv_size = q_local * hd, kv_local * hd

        gu = mlp.gate_up_proj
        gate, up = gu.weight.chunk(2, dim=0)
        _replace_(gu, torch.cat([_rows(gate, tp_rank * i_local, i_local), _rows(up, tp_rank * i_local, i_local)]),
                  None)
        down = mlp.down_proj
        _replace_(down, down.weight.narrow(1, tp_rank * i_local, i_local), None)
        mlp.down_proj = RowParallelLinear(down, group)
        mlp.intermediate_size = i_local
    # From here ``model.args`` describes what this rank holds (local heads, local MLP width), so code that sizes
    # per-rank state from it (the engine's KV cache) needs no TP special case; the checkpoint's stays in full_args.
    model.full_args = args
    model.args = replace(args, num_heads=q_local, num_kv_heads=kv_local, intermediate_size=i_local)
    model.tp_rank, model.tp_size = tp_rank, tp_size
    return model
