"""Checkpoint layouts: GPTQ (v1, "checkpoint_format": "gptq") and AWQ ("version": "gemm").

GPTQ, as AutoGPTQ / optimum / transformers read it, per linear ``<name>``:

- ``<name>.qweight`` int32 ``[in * bits / 32, out]``: codes packed along the *input*
  dim, input channel ``8*r + j`` (4-bit) in bits ``4j..4j+3`` of row ``r``;
- ``<name>.qzeros``  int32 ``[G, out * bits / 32]``: zero points packed the same way
  along the output dim, stored **minus one** (the v1 convention: loaders add 1);
- ``<name>.scales``  fp16  ``[G, out]``;
- ``<name>.g_idx``   int32 ``[in]``: group of each input channel (act-order permutes it).

Because v1 stores ``zero - 1``, a zero point of 0 cannot be written (it would
wrap to 15 and loaders would read 16): asymmetric quantization keeps zeros >= 1
when it targets this format (see ``gptq.py``/``rtn.py`` callers).

AWQ (AutoAWQ GEMM), per linear: ``qweight`` int32 ``[in, out / 8]`` packed along
the *output* dim in the interleaved order ``AWQ_ORDER`` (column ``8c + AWQ_ORDER[i]``
in bits ``4i..4i+3`` of word ``c``), ``qzeros`` int32 ``[G, out / 8]`` same order,
zeros stored as is, ``scales`` fp16 ``[G, out]``; groups are contiguous, 4-bit only.
"""

from __future__ import annotations

import torch

from onecard.errors import UnsupportedModelError
from onecard.quant.rtn import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32 (what safetensors stores)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes[rows, cols]`` along dim 0: ``32 / bits`` consecutive rows per int32 word."""
    per = 32 // bits
    rows, cols = codes.shape
    if rows % per:
        raise ValueError(f"cannot pack {rows} rows {per} per word")
    c = codes.to(torch.int64).reshape(rows // per, per, cols)
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int64) * bits).view(1, per, 1)
    return _to_int32((c << shifts).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 ``[rows / per, cols]`` -> int32 codes ``[rows, cols]``."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, device=words.device, dtype=torch.int64) * bits).view(1, per, 1)
    codes = (w.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1, words.shape[1]).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 (``32 / bits`` consecutive columns per word)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(words.t().contiguous(), bits).t().contiguous()


# ---- GPTQ v1 -------------------------------------------------------------------------------------------------

def to_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``QuantizedWeight`` -> the four GPTQ tensors (suffixes without the module name)."""
    if int(qw.zeros.min()) < 1:
        raise ValueError("GPTQ v1 cannot store a zero point of 0; quantize with zeros >= 1 (min_zero=1)")
    return {
        "qweight": pack_rows(qw.q.t().contiguous(), qw.bits),
        "qzeros": pack_cols((qw.zeros - 1).to(torch.int32), qw.bits),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              bits: int, group_size: int) -> QuantizedWeight:
    """Read GPTQ v1 tensors (any writer's); zero points are the stored value plus one."""
    q = unpack_rows(qweight, bits).t().contiguous()
    out_f, in_f = q.shape
    zeros = unpack_cols(qzeros, bits)[:, :out_f] + 1
    if g_idx is None:
        gs = in_f if group_size == -1 else group_size
        g_idx = torch.arange(in_f, device=q.device) // gs
    if scales.shape[1] != out_f or int(g_idx.max()) >= scales.shape[0]:
        raise UnsupportedModelError(
            f"GPTQ tensors disagree: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
            f"g_idx max {int(g_idx.max())}; the checkpoint is corrupt or uses a layout onecard does not read")
    return QuantizedWeight(q.to(torch.uint8), scales.to(torch.float16), zeros.to(torch.int32),
                           g_idx.to(torch.int32), bits, group_size)


# ---- AWQ GEMM ------------------------------------------------------------------------------------------------

def _awq_pack(codes: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = (torch.arange(8, device=codes.device, dtype=torch.int64) * 4).view(1, 1, 8)
    return _to_int32((c << shifts).sum(dim=2))


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(8, device=words.device, dtype=torch.int64) * 4).view(1, 1, 8)
    nibbles = (w.unsqueeze(2) >> shifts) & 0xF            # [rows, cols/8, 8]: nibble i
    return nibbles[:, :, list(AWQ_REVERSE_ORDER)].reshape(words.shape[0], -1).to(torch.int32)


def to_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    if qw.bits != 4:
        raise ValueError("the AWQ GEMM layout is 4-bit only")
    if not torch.equal(qw.g_idx.long(), torch.sort(qw.g_idx.long()).values):
        raise ValueError("the AWQ layout has no g_idx: groups must be contiguous (no act-order)")
    return {
        "qweight": _awq_pack(qw.q.t().contiguous()),
        "qzeros": _awq_pack(qw.zeros.to(torch.int32)),
        "scales": qw.scales.to(torch.float16).contiguous(),
    }


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> QuantizedWeight:
    q = _awq_unpack(qweight).t().contiguous()           # [out, in]
    out_f, in_f = q.shape
    zeros = _awq_unpack(qzeros)[:, :out_f]
    gs = in_f if group_size == -1 else group_size
    g_idx = (torch.arange(in_f, device=q.device) // gs).to(torch.int32)
    if scales.shape != zeros.shape or scales.shape[0] != (in_f + gs - 1) // gs:
        raise UnsupportedModelError(
            f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
            f"{tuple(scales.shape)} for group size {group_size}; the checkpoint is corrupt or not AWQ GEMM")
    return QuantizedWeight(q.to(torch.uint8), scales.to(torch.float16), zeros.to(torch.int32), g_idx, 4, group_size)
