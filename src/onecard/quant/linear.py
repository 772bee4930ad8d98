"""``QuantLinear``: a drop-in ``nn.Linear`` replacement holding int4/int8 weights in the kernel layout.

Built from a ``QuantizedWeight`` (any method, any checkpoint layout) by
``QuantLinear.from_quantized``, which repacks once at load time into the layout
``onecard.kernels.wo_matmul`` documents: codes packed along K, groups
contiguous. An act-order weight (``g_idx`` not ``k // group_size``) is made
contiguous by sorting its input channels by group; ``perm`` then gathers the
activations in the same order before the matmul, so groups stay whole.

On CUDA ``forward`` runs the Triton kernel; elsewhere it runs the PyTorch
reference (dequantize, then matmul) — same numbers, no interpreter in the hot path.

``use_tinygemm_`` (the engine's ``int4_kernel="tinygemm"``) moves int4 layers to
PyTorch's own int4 weight-only kernel (``aten._weight_int4pack_mm``, "tinygemm",
what gpt-fast and torchao run). Measured on an H200 (docs/results/quant_decode.json,
2026-11-28): bs=1 decode 1.35x of bf16 against 1.63x for our Triton kernel, a 2k-token
prefill 17x slower than bf16 (its large-M path is not tuned) and bs=16 0.56x — so it
is an opt-in comparison, not the default. Its layout keeps
bf16 scales and an additive bf16 zero (``w = (q - 8) * s + (8 - z) * s``), so the
weights it computes with differ from the fp16-scale reference by the bf16
rounding of each group's scale and zero (~0.4 % of a weight).
"""

from __future__ import annotations

import torch
from torch import nn

from onecard.errors import BadInputError, UnsupportedModelError
from onecard.kernels.wo_matmul import dequantize_reference, wo_matmul, wo_matmul_reference
from onecard.quant.packing import pack_rows
from onecard.quant.rtn import QuantizedWeight, rtn_quantize


# aten._weight_int4pack_mm: group sizes it supports, and the K tiling its packed layout uses.
TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_INNER_K_TILES = 8


def use_tinygemm_(model: nn.Module) -> int:
    """Move every eligible int4 ``QuantLinear`` of a bf16 CUDA model to PyTorch's int4 kernel; returns how many."""
    return sum(m.to_tinygemm_() for m in model.modules() if isinstance(m, QuantLinear))


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with W stored as packed ``bits``-bit codes (buffers, not parameters)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 act_order: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if group_size == -1 else group_size  # kernel group (per-channel = K)
        groups = (in_features + self.group_size - 1) // self.group_size
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.register_buffer("tg_weight", None, persistent=False)  # set by to_tinygemm_ (CUDA int4)
        self.register_buffer("tg_scale_zeros", None, persistent=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Repack ``qw`` into the kernel layout (sorting act-order groups to be contiguous)."""
        out_f, in_f = qw.q.shape
        gs = in_f if qw.group_size == -1 else qw.group_size
        g_idx = qw.g_idx.long()
        natural = torch.arange(in_f, device=g_idx.device) // gs
        act_order = not torch.equal(g_idx, natural)
        q = qw.q
        if act_order:
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], natural):
                raise UnsupportedModelError(
                    f"g_idx does not put exactly {gs} input channels in each group; onecard's kernels need "
                    "equal groups (requantize with `onecard quantize`)")
            q = q[:, perm]
        mod = cls(in_f, out_f, qw.bits, qw.group_size, bias is not None, act_order, device=q.device)
        mod.qweight = pack_rows(q.t().contiguous(), qw.bits)
        mod.scales = qw.scales.to(torch.float16).contiguous()
        mod.zeros = qw.zeros.to(torch.float16).contiguous()
        if act_order:
            mod.perm = perm.to(torch.int32)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, sym: bool = True) -> "QuantLinear":
        """Round-to-nearest quantization of an existing ``nn.Linear`` (on-the-fly RTN)."""
        qw = rtn_quantize(linear.weight.data, bits, group_size, sym)
        return cls.from_quantized(qw, linear.bias.data if linear.bias is not None else None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` in the original input-channel order (what an ``nn.Linear`` would hold)."""
        if self.tg_weight is not None:
            raise NotImplementedError("this layer was repacked for PyTorch's int4 kernel (to_tinygemm_), whose "
                                      "layout onecard does not unpack; load the checkpoint again to dequantize")
        w = dequantize_reference(self.qweight, self.scales, self.zeros, self.bits, self.group_size)  # [K', N]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm.long(), w)
        return w.t().to(dtype)

    def to_tinygemm_(self) -> bool:
        """Repack into ``aten._weight_int4pack_mm``'s layout on this module's CUDA device (frees the Triton layout).

        Returns False (and changes nothing) where that kernel does not apply: not int4, not CUDA, a group size it
        lacks, or shapes off its tiles."""
        K, N = self.in_features, self.out_features
        if (self.bits != 4 or not self.qweight.is_cuda or self.group_size not in TINYGEMM_GROUPS
                or K % (TINYGEMM_INNER_K_TILES * 16) or N % 8 or not hasattr(torch.ops.aten, "_weight_int4pack_mm")):
            return False
        from onecard.kernels.wo_matmul import unpack_reference

        codes = unpack_reference(self.qweight, 4).t().contiguous()  # [N, K] in 0..15
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        s = self.scales.float()
        scale_zeros = torch.stack([s, (8 - self.zeros.float()) * s], -1).to(torch.bfloat16).contiguous()
        self.tg_weight = torch.ops.aten._convert_weight_to_int4pack(packed, TINYGEMM_INNER_K_TILES)
        self.tg_scale_zeros = scale_zeros
        empty = self.qweight.new_empty(0)
        self.qweight, self.scales, self.zeros = empty, empty.half(), empty.half()
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.tg_weight is not None:
            lead = x.shape[:-1]
            y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                   self.tg_weight, self.group_size, self.tg_scale_zeros)
            y = y.reshape(*lead, self.out_features).to(x.dtype)
        elif x.is_cuda:
            y = wo_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size)
        else:
            y = wo_matmul_reference(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def keep_out_features_(self, rows: torch.Tensor) -> None:
        """Column-parallel shard, in place: keep output features ``rows`` (in that order) of every tensor.

        The codes are packed along K, so an output feature is one column of
        ``qweight``/``scales``/``zeros``: any subset slices exactly, and the
        kept columns compute what they computed in the full layer."""
        self._check_unpacked("shard")
        rows = rows.to(self.qweight.device, torch.long)
        self.qweight = self.qweight.index_select(1, rows).contiguous()
        self.scales = self.scales.index_select(1, rows).contiguous()
        self.zeros = self.zeros.index_select(1, rows).contiguous()
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.index_select(0, rows).contiguous(), requires_grad=False)
        self.out_features = rows.numel()

    def keep_in_features_(self, start: int, length: int) -> None:
        """Row-parallel shard, in place: keep input features ``[start, start + length)`` (the caller sums the
        partial outputs over ranks).

        Exact only if the kept features form whole quantization groups (each
        group's scale and zero then move with it) and whole packed words; with
        act-order the features are stored sorted by group, so the kept ones are
        gathered group by group and ``perm`` is renumbered. One-group (per-channel)
        layers keep their scales whole. Anything else raises ``BadInputError``."""
        self._check_unpacked("shard")
        if self.bias is not None:
            raise UnsupportedModelError("a row-parallel quantized linear with a bias would add it once per rank; "
                                        "onecard's models have none there, so this checkpoint is not one it reads")
        K, dev = self.in_features, self.qweight.device
        order = self.perm.long() if self.perm is not None else torch.arange(K, device=dev)
        pos = torch.nonzero((order >= start) & (order < start + length)).flatten()  # stored rows kept, ascending
        per = 32 // self.bits
        groups = self.scales.shape[0]
        unit = per if groups == 1 else self.group_size  # what must be kept whole: a word, or a group
        kept = torch.bincount(pos // unit, minlength=(K + unit - 1) // unit)
        size = torch.bincount(torch.arange(K, device=dev) // unit)  # the last group may be short
        if bool(((kept != 0) & (kept != size)).any()) or pos.numel() != length:
            if self.perm is not None:
                raise BadInputError("this act-order (desc_act) layer's quantization groups mix input features that "
                                    "belong to different GPUs; requantize without --act-order, or run it with "
                                    "tensor_parallel_size=1")
            unit_text = f"the group size {self.group_size}" if groups > 1 else f"{per} (codes per packed word)"
            raise BadInputError(f"cannot split {K} input features into {K // length} GPUs' slices of {length} "
                                f"starting at {start}: not a multiple of {unit_text}; quantize with a group size "
                                "that divides the slice (e.g. 64 or 32), or lower tensor_parallel_size")
        self.qweight = self.qweight.index_select(0, pos[::per] // per).contiguous()
        if groups > 1:
            kept_groups = pos[::self.group_size] // self.group_size
            self.scales = self.scales.index_select(0, kept_groups).contiguous()
            self.zeros = self.zeros.index_select(0, kept_groups).contiguous()
        local = order.index_select(0, pos) - start
        natural = torch.equal(local, torch.arange(length, device=dev))
        self.perm = None if natural else local.to(torch.int32)
        self.in_features = length  # a one-group layer keeps group_size >= K: still one group

    def _check_unpacked(self, what: str) -> None:
        if self.tg_weight is not None:
            raise NotImplementedError(f"cannot {what} a layer repacked for PyTorch's int4 kernel (to_tinygemm_); "
                                      "shard first, then call use_tinygemm_")

    def weight_bytes(self) -> int:
        """Bytes read per forward (codes + scales + zeros): the roofline's numerator."""
        held = (self.qweight, self.scales, self.zeros, self.tg_weight, self.tg_scale_zeros)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}, bias={self.bias is not None}")


def concat_quantized(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along the output dim (q/k/v -> qkv, gate/up -> gate_up); they must share ``g_idx``."""
    first = parts[0]
    for p in parts[1:]:
        if p.bits != first.bits or p.group_size != first.group_size or not torch.equal(p.g_idx, first.g_idx):
            raise UnsupportedModelError(
                "cannot fuse quantized projections that differ in bits, group size or g_idx (act-order)")
    return QuantizedWeight(torch.cat([p.q for p in parts], 0), torch.cat([p.scales for p in parts], 1),
                           torch.cat([p.zeros for p in parts], 1), first.g_idx, first.bits, first.group_size)


class ConcatLinear(nn.Module):
    """Several linears on the same input, outputs concatenated: the fallback when fusing is impossible."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.bias: nn.Parameter | None = None  # a fused bias (loaded into our fused rows) is added here

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y + self.bias.to(y.dtype) if self.bias is not None else y
