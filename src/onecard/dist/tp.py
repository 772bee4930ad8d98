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

Quantized models (``QuantLinear``: int8, RTN int4, GPTQ, AWQ) are sharded
after quantization, so every rank holds exactly the codes, scales and zeros
of the single-GPU model: a column-parallel slice keeps whole output columns
of the packed tensors; a row-parallel slice keeps whole quantization groups
(``check_tp_groups`` refuses a group size that would straddle two ranks).
fp8 models (``Fp8Linear``) slice the same way; a row-parallel rank quantizes its
part of each token with that part's own scale, so their sum is close to the
one-GPU layer's, not equal to it.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from onecard.errors import BadInputError, NotBuiltYetError
from onecard.models.config import ModelArgs
from onecard.models.llama import LlamaModel

log = logging.getLogger(__name__)


SYMM_MEM_MAX_BYTES = 4 << 20  # decode and short-prefill sums (rows x hidden x 2 bytes); longer ones go to NCCL


class SymmMemAllReduce:
    """A sum over the group in one kernel through PyTorch symmetric memory: each rank copies its partial into its
    buffer, then reads every peer's over NVLink (``symm_mem.one_shot_all_reduce``, which barriers before and after).

    Why: a decode step of a 13B model makes 80 all-reduces of ~10 KB, where latency is all that counts. The same
    idea as vLLM's custom all-reduce, from PyTorch's own ops. Measured end to end it gains little over NCCL
    (docs/results/dist_tp*.json: 1.37x against 1.35x TP=1 at bs=1), but a process whose graph-captured sums go
    through it leaves its group cleanly, where NCCL's teardown hangs (pytorch#115388). Multicast (``multimem``) ops are not used, so it
    also runs where NVLink multicast is off. One buffer serves every layer: the trailing barrier means no rank
    overwrites it while a peer still reads.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = SYMM_MEM_MAX_BYTES) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self._copy_out = getattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out", None)

    def fits(self, x: torch.Tensor) -> bool:
        n = x.numel()
        return (x.dtype == self.buffer.dtype and x.is_contiguous() and n <= self.buffer.numel()
                and n * x.element_size() % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        out = torch.empty_like(x)
        if self._copy_out is not None:  # the copy into the buffer happens inside the kernel
            self._copy_out(self.buffer[:n], x.view(-1), "sum", self.group_name, out.view(-1))
        else:
            self.buffer[:n].copy_(x.view(-1))
            torch.ops.symm_mem.one_shot_all_reduce_out(self.buffer[:n], "sum", self.group_name, out.view(-1))
        return out


# rows (decode sequences) a fused sum takes, one program per row. Pushing each partial into every rank's buffer
# (reads stay local) made the fused kernel beat the one-shot all-reduce + add+norm at every row count measured
# (2x H100, docs/results/h100/kernel_sum_norm.json: 1.97x at 1 row, 1.75x at 32; with the pull protocol before it
# lost from 16 rows on 2x H200, kernel_sum_norm.json). Raising this from 8 to 32 took the Llama-2-13B TP=2
# offline run (bs=32) from 3,105 to 3,202 tok/s on one 2x H200 lease (dist_tp.json, dist_tp_fused8_same_lease.json)
FUSED_MAX_ROWS = 32


class SumAddNorm:
    """A row-parallel layer's sum finished inside the next norm: the partial sums, the residual add and the RMSNorm
    in one kernel (``kernels.sum_norm``), for batches of up to ``max_rows`` rows.

    ``RowParallelLinear`` returns its partial (``defer``) where ``takes`` says so, and the norm that reads it
    (``RMSNorm.pending_sum``) calls this instead of its add+norm; both ask ``takes`` of the same tensor shape, so
    they always agree. Where ``takes`` says no (long prefills) the sum runs as before, inside the linear."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, hidden: int,
                 max_rows: int = FUSED_MAX_ROWS) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        self.dtype, self.hidden, self.max_rows = dtype, hidden, max_rows
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.buffer = symm_mem.empty(2 * self.world * max_rows * hidden, dtype=dtype, device=device)
        self.flags = symm_mem.empty(2 * max_rows * self.world, dtype=torch.int32, device=device)
        self.flags.zero_()
        buffers = symm_mem.rendezvous(self.buffer, group.group_name)
        flags = symm_mem.rendezvous(self.flags, group.group_name)
        self.buffer_ptrs, self.flag_ptrs = buffers.buffer_ptrs_dev, flags.buffer_ptrs_dev
        area = max_rows * hidden * self.buffer.element_size()  # bytes of one sender's rows of one slot
        # per slot, the address of this rank's rows in every rank's buffer ([slot, sender, row, hidden])
        self.pushes = torch.tensor([[ptr + (slot * self.world + self.rank) * area for ptr in buffers.buffer_ptrs]
                                    for slot in (0, 1)], dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group)  # every rank's flags are zero before any rank raises one

    def takes(self, x: torch.Tensor) -> bool:
        return (x.dim() == 2 and x.shape[0] <= self.max_rows and x.shape[1] == self.hidden and x.dtype == self.dtype
                and x.is_contiguous())

    def own_rows(self, rows: int, slot: int) -> torch.Tensor:
        """This rank's ``[rows, hidden]`` of ``slot`` in its own buffer."""
        return self.buffer.view(2, self.world, self.max_rows, self.hidden)[slot, self.rank, :rows]

    def push_targets(self, rows: int, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(``own_rows``, the addresses of this rank's rows of ``slot`` in every rank's buffer): where the
        row-parallel GEMV stores its partial, so the sum kernel finds every rank's rows in its own buffer and
        stores nothing itself. None: more rows than a sum takes."""
        return (self.own_rows(rows, slot), self.pushes[slot]) if rows <= self.max_rows else None

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        from onecard.kernels.sum_norm import sum_add_rmsnorm

        in_buffer = x.data_ptr() == self.own_rows(1, slot).data_ptr()
        return sum_add_rmsnorm(x, residual.contiguous(), weight, eps, self.buffer_ptrs, self.flag_ptrs, slot,
                               self.rank, self.world, self.max_rows, in_buffer)


def fuse_sums_into_norms_(model: LlamaModel, fused) -> None:
    """Defer every row-parallel sum to the norm that reads it: attention's to ``post_attention_layernorm`` (slot
    0), the MLP's to the next layer's ``input_layernorm`` or the final ``norm`` (slot 1). ``fused``: a
    ``SumAddNorm`` (tests pass a reference with the same ``takes``/call)."""
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        after_mlp = layers[i + 1].input_layernorm if i + 1 < len(layers) else model.norm
        for linear, norm, slot in ((layer.self_attn.o_proj, layer.post_attention_layernorm, 0),
                                   (layer.mlp.down_proj, after_mlp, 1)):
            linear.defer = norm.pending_sum = (fused, slot)


def symm_mem_unavailable(device: torch.device, world: int) -> str | None:
    """Why the symmetric-memory all-reduce cannot run here (None: it can). Decided from facts every rank sees the
    same way, because the rendezvous is collective: one rank opting out alone would leave the others waiting."""
    if device.type != "cuda":
        return f"{device.type} device (symmetric memory is CUDA only)"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed._symmetric_memory"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
        return f"torch {torch.__version__} lacks symm_mem.one_shot_all_reduce_out"
    peers = [p for p in range(world) if p != device.index]
    if not all(torch.cuda.can_device_access_peer(device.index, p) for p in peers):
        return "the GPUs cannot access each other's memory (no P2P/NVLink)"
    return None


def use_symm_mem_all_reduce_(model: LlamaModel, group: dist.ProcessGroup | None = None,
                             fuse_norms: bool = True) -> bool:
    """Route every row-parallel sum that fits the buffer through one ``SymmMemAllReduce``, and with ``fuse_norms``
    those of up to ``FUSED_MAX_ROWS`` rows into the next norm (``SumAddNorm``); NCCL keeps the rest.
    Returns False (NCCL for everything) where ``symm_mem_unavailable`` says why, logged once."""
    group = group or dist.group.WORLD
    device = next(model.parameters()).device
    world = dist.get_world_size(group)
    why = symm_mem_unavailable(device, world)
    if why is not None:
        log.info("tensor parallel: all-reduce over NCCL only (%s)", why)
        return False
    dtype = model.embed_tokens.weight.dtype
    fast = SymmMemAllReduce(group, device, dtype)
    for m in model.modules():
        if isinstance(m, RowParallelLinear):
            m.fast = fast
    fuse_norms = fuse_norms and world & (world - 1) == 0  # the kernel spans the ranks with tl.arange: a power of 2
    if fuse_norms:
        fuse_sums_into_norms_(model, SumAddNorm(group, device, dtype, model.args.hidden_size))
    log.info("tensor parallel: sums up to %d KiB through symmetric memory (one-shot%s), larger ones over NCCL",
             SYMM_MEM_MAX_BYTES >> 10, f"; up to {FUSED_MAX_ROWS} rows inside the next norm" if fuse_norms else "")
    return True


class RowParallelLinear(nn.Module):
    """``linear`` holding this rank's input columns, then a sum over the group: the full output on every rank."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.linear, self.group = linear, group
        self.fast: SymmMemAllReduce | None = None  # set by use_symm_mem_all_reduce_
        self.defer = None  # (a SumAddNorm, its slot): the next norm finishes the sum (fuse_sums_into_norms_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.defer is None:
            out = self.linear(x)
        else:
            fused, slot = self.defer
            out = self._partial(x, fused, slot)
            if fused.takes(out):
                return out  # this rank's partial: the norm that reads it sums it
        if self.fast is not None and self.fast.fits(out):
            return self.fast(out)
        dist.all_reduce(out, group=self.group)
        return out

    def _partial(self, x: torch.Tensor, fused, slot: int) -> torch.Tensor:
        """This rank's partial; the decode GEMV pushes it into every rank's sum buffer as it goes, so the sum kernel
        stores nothing and reads only local memory (it sees from the partial's address that it lies there)."""
        from onecard.kernels.gemv import GemvLinear

        targets = fused.push_targets(x.shape[:-1].numel(), slot) if isinstance(self.linear, GemvLinear) else None
        if targets is None:
            return self.linear(x)
        own, pushes = targets
        return self.linear(x, out=own, copies=pushes)


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


def check_tp_groups(args: ModelArgs, tp_size: int, group_size: int) -> None:
    """Raise a one-line error if a ``group_size``-grouped quantized model's row-parallel layers cannot be split over
    ``tp_size`` ranks in whole groups (``-1``, or a group spanning the row, is per-channel and always splits)."""
    for name, k in (("o_proj", args.num_heads * args.head_dim), ("down_proj", args.intermediate_size)):
        if 0 < group_size < k and (k // tp_size) % group_size:
            raise BadInputError(f"cannot split {name}'s {k} input features over {tp_size} GPUs in whole quantization "
                                f"groups: {k // tp_size} is not a multiple of the group size {group_size}; quantize "
                                "with a group size that divides it (e.g. 64 or 32), or lower tensor_parallel_size")


def local_kv_heads(args: ModelArgs, tp_size: int) -> int:
    """KV heads each rank stores (what the engine sizes its per-rank cache with)."""
    check_tp(args, tp_size)
    return max(1, args.num_kv_heads // tp_size)


def _kv_head_range(args: ModelArgs, tp_rank: int, tp_size: int) -> tuple[int, int]:
    n = local_kv_heads(args, tp_size)
    first = tp_rank * n if args.num_kv_heads >= tp_size else tp_rank // (tp_size // args.num_kv_heads)
    return first, n


def keep_out_features_(lin: nn.Module, rows: torch.Tensor) -> None:
    """Column-parallel: keep output features ``rows`` of a dense, quantized or concatenated linear, in place."""
    from onecard.quant import Fp8Linear
    from onecard.quant.linear import ConcatLinear, QuantLinear

    if isinstance(lin, (QuantLinear, Fp8Linear)):
        lin.keep_out_features_(rows)
    elif isinstance(lin, ConcatLinear):  # q/k/v (gate/up) kept as separate quantized parts: split rows among them
        first = 0
        for part in lin.parts:
            n = part.out_features
            mine = rows[(rows >= first) & (rows < first + n)] - first
            keep_out_features_(part, mine)
            first += n
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, rows.to(lin.bias.device)).contiguous(),
                                    requires_grad=False)
    elif type(lin) is nn.Linear:
        rows = rows.to(lin.weight.device)
        bias = lin.bias.index_select(0, rows) if lin.bias is not None else None
        _replace_(lin, lin.weight.index_select(0, rows), bias)
    else:
        raise NotBuiltYetError(f"tensor parallelism of a {type(lin).__name__} layer is not built; shard the bf16, "
                               "int4/int8 or fp8 model")


def keep_in_features_(lin: nn.Module, start: int, length: int) -> None:
    """Row-parallel: keep input features ``[start, start + length)`` of a dense or quantized linear, in place."""
    from onecard.quant import Fp8Linear
    from onecard.quant.linear import QuantLinear

    if isinstance(lin, (QuantLinear, Fp8Linear)):
        lin.keep_in_features_(start, length)
    elif type(lin) is nn.Linear:
        _replace_(lin, lin.weight.narrow(1, start, length), None)
    else:
        raise NotBuiltYetError(f"tensor parallelism of a {type(lin).__name__} layer is not built; shard the bf16, "
                               "int4/int8 or fp8 model")


def _replace_(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Swap in a sliced weight (a fresh contiguous tensor, so the full one is freed)."""
    req = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=req)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=req)
    linear.out_features, linear.in_features = weight.shape


def _span(start: int, length: int) -> torch.Tensor:
    return torch.arange(start, start + length)


@torch.no_grad()
def shard_model_(model: LlamaModel, tp_rank: int, tp_size: int, group: dist.ProcessGroup | None = None) -> LlamaModel:
    """Slice a loaded (full) model in place down to rank ``tp_rank``'s shard of ``tp_size``; returns it.

    Dense models shard on real or ``meta`` tensors (shard on meta, then
    ``to_empty``: a model larger than one card never has to exist whole);
    quantized ones need real tensors (which input features an act-order
    layer keeps is read from its ``perm``). ``group`` is the
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
    from onecard.quant.linear import QuantLinear

    for layer in model.layers:  # refuse before any layer is sliced
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if isinstance(lin, QuantLinear):  # a group as wide as the row is per-channel
                check_tp_groups(args, tp_size, lin.group_size if lin.group_size < lin.in_features else -1)
    hd = args.head_dim
    q_local = args.num_heads // tp_size
    kv_first, kv_local = _kv_head_range(args, tp_rank, tp_size)
    i_local = args.intermediate_size // tp_size
    q_rows = _span(tp_rank * q_local * hd, q_local * hd)
    kv_rows = _span(kv_first * hd, kv_local * hd)
    qkv_rows = torch.cat([q_rows, args.q_size + kv_rows, args.q_size + args.kv_size + kv_rows])
    i_rows = _span(tp_rank * i_local, i_local)
    gate_up_rows = torch.cat([i_rows, args.intermediate_size + i_rows])
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        keep_out_features_(attn.qkv_proj, qkv_rows)
        keep_in_features_(attn.o_proj, tp_rank * q_local * hd, q_local * hd)
        attn.o_proj = RowParallelLinear(attn.o_proj, group)
        attn.num_heads, attn.num_kv_heads = q_local, kv_local
        attn.q_size, attn.kv_size = q_local * hd, kv_local * hd
        keep_out_features_(mlp.gate_up_proj, gate_up_rows)
        keep_in_features_(mlp.down_proj, tp_rank * i_local, i_local)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, group)
        mlp.intermediate_size = i_local
    # From here ``model.args`` describes what this rank holds (local heads, local MLP width), so code that sizes
    # per-rank state from it (the engine's KV cache) needs no TP special case; the checkpoint's stays in full_args.
    model.full_args = args
    model.args = replace(args, num_heads=q_local, num_kv_heads=kv_local, intermediate_size=i_local)
    model.tp_rank, model.tp_size = tp_rank, tp_size
    return model
