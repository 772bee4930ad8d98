"""Round-to-nearest (RTN) weight quantization and the integer weight it produces.

Every method (RTN, GPTQ, AWQ) ends in the same ``QuantizedWeight``: integer
codes ``q[out, in]``, per-group ``scales[G, out]`` and integer ``zeros[G, out]``,
and ``g_idx[in]`` (the group of each input channel, which act-order permutes).
The dequantized weight is ``(q - zeros[g_idx]) * scales[g_idx]`` — the GPTQ
convention, which the checkpoint layouts (``packing.py``) and the kernels share.

Scales are rounded to fp16 *before* the codes are computed, so the weight we
measure in memory is bit-for-bit the one a checkpoint stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onecard.errors import BadInputError

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per output channel (per-channel)


def check_bits_group(bits: int, group_size: int) -> None:
    """The one place that says which formats onecard writes and runs."""
    if bits not in SUPPORTED_BITS:
        raise BadInputError(f"--bits {bits} is not supported; use 4 or 8")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise BadInputError(f"--group-size {group_size} is not supported; use 32, 64, 128 or -1 (per-channel)")


@dataclass
class QuantizedWeight:
    """A linear layer's weight after quantization (unpacked; see ``packing.py`` for file layouts)."""

    q: torch.Tensor        # [out, in] uint8 codes in 0..2**bits-1
    scales: torch.Tensor   # [G, out] float16
    zeros: torch.Tensor    # [G, out] int32 zero points in 0..2**bits-1
    g_idx: torch.Tensor    # [in] int32 group of each input channel
    bits: int
    group_size: int        # -1 = per-channel

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - z) * s`` in fp32, then cast: the reference every kernel is checked against."""
        g = self.g_idx.long()
        s = self.scales.float()[g].t()        # [out, in]
        z = self.zeros.float()[g].t()
        return ((self.q.float() - z) * s).to(dtype)


def split_rows(qw: QuantizedWeight, start: int, length: int) -> QuantizedWeight:
    """Output rows ``start:start+length`` (a stacked q/k/v weight back into q, k, v)."""
    rows = slice(start, start + length)
    return QuantizedWeight(qw.q[rows].contiguous(), qw.scales[:, rows].contiguous(), qw.zeros[:, rows].contiguous(),
                           qw.g_idx.clone(), qw.bits, qw.group_size)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // gs).to(torch.int32)


def qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-rounded, as fp32) and integer zero point for each row of ``w[rows, n]``.

    Ranges always include 0 (GPTQ's convention) so a zero weight stays exactly zero. Symmetric
    zero is ``2**(bits-1)`` (GPTQ's, stored as 7 / 127 in v1 files).
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).half().float()
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float16).tiny), scale)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        # >= 1: GPTQ v1 files store zero - 1 and cannot hold -1 (see packing.py); costs one code
        # step only in groups whose weights are all >= 0.
        zero = torch.clamp(torch.round(-xmin / scale), 1, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w[rows, n]`` for per-row ``scale``/``zero`` (float tensors, broadcast over n)."""
    s, z = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (what the model will see), in fp32."""
    s, z = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return (quantize_codes(w, scale, zero, bits) - z) * s


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest: each group of ``group_size`` input channels gets its own scale/zero per output row."""
    check_bits_group(bits, group_size)
    out_f, in_f = weight.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % 8:
        raise BadInputError(f"in_features {in_f} is not a multiple of 8; int4/int8 packing needs it")
    w = weight.float()
    n_groups = (in_f + gs - 1) // gs
    q = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n_groups, out_f, dtype=torch.float16, device=w.device)
    zeros = torch.empty(n_groups, out_f, dtype=torch.int32, device=w.device)
    for g in range(n_groups):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        s, z = qparams(w[:, cols], bits, sym)
        q[:, cols] = quantize_codes(w[:, cols], s, z, bits).to(torch.uint8)
        scales[g], zeros[g] = s.half(), z.to(torch.int32)
    return QuantizedWeight(q, scales, zeros, default_g_idx(in_f, group_size, w.device), bits, group_size)
