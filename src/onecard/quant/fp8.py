"""``Fp8Linear``: float8 (e4m3) weights and activations, one ``torch._scaled_mm`` per linear (W8A8).

Why a third format beside int4/int8: those are weight-only, so every matmul
still runs in bf16 after a dequantization, and once a batch is large enough to
be compute-bound (prefill, offline decode at 64+ sequences) they are slower than
bf16 (`wo_matmul`'s dequantize + GEMM). fp8 halves the weight bytes like int8
*and* runs on the fp8 tensor cores that Ada (sm_89: RTX 4090, L4) and Hopper
have at twice the bf16 rate, so it speeds up the compute-bound steps too. It is
what vLLM's ``quantization="fp8"`` does on the fly.

Scaling: each weight row (output channel) gets its own fp32 scale ``amax / 448``,
computed once at load; each activation row (token) gets one at run time
(``kernels.fp8_quant``: one Triton launch), so a single outlier token does not
flatten the others. ``_scaled_mm`` applies both in its epilogue (row-wise
scaling), with bf16 output and Hopper's fast fp8 accumulation (what torchao's
float8 inference uses; 1.1-1.2x faster at 2k rows on an H100). The CPU computes
the same products from the same codes and scales in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from onecard.errors import BadInputError
from onecard.kernels.fp8_quant import FP8, quantize_rows, quantize_rows_reference, rowwise_fp8_problem


def check_fp8_device(device: torch.device) -> None:
    """fp8 matmuls need fp8 tensor cores on CUDA and a torch that runs them there (the CPU runs them slowly, for
    tests)."""
    if device.type != "cuda":
        return
    why = rowwise_fp8_problem(torch.cuda.get_device_capability(device))
    if why is not None:
        raise BadInputError(f"quantization='fp8' on {torch.cuda.get_device_name(device)}: {why}; or use "
                            "quantization='int8'")


def _check_tiles(in_features: int, out_features: int) -> None:
    if in_features % 16 or out_features % 16:
        raise BadInputError(f"an fp8 linear needs in and out features that are multiples of 16 (fp8 tensor-core "
                            f"tiles), this one is {in_features} -> {out_features}; use quantization='int8'")


class Fp8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W = weight * weight_scale`` stored as e4m3 codes ``[out, in]`` and fp32 scales
    ``[1, out]`` (buffers, not parameters: inference only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_tiles(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """Per-output-channel round-to-nearest of an existing ``nn.Linear``."""
        w = linear.weight.data
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        codes, scale = quantize_rows_reference(w.float())
        mod.weight, mod.weight_scale = codes, scale.t().contiguous()
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return mod

    def keep_out_features_(self, rows: torch.Tensor) -> None:
        """Column-parallel shard, in place: keep output features ``rows`` (a weight row and its scale each: exact)."""
        rows = rows.to(self.weight.device, torch.long)
        _check_tiles(self.in_features, rows.numel())
        self.weight = self.weight.index_select(0, rows).contiguous()
        self.weight_scale = self.weight_scale.index_select(1, rows).contiguous()
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.index_select(0, rows).contiguous(), requires_grad=False)
        self.out_features = rows.numel()

    def keep_in_features_(self, start: int, length: int) -> None:
        """Row-parallel shard, in place: keep input features ``[start, start + length)``; the caller sums the
        partial outputs over ranks. Each rank then quantizes its part of a token with that part's own scale (as
        vLLM's fp8 does), so the sum is close to, not equal to, the one-GPU layer's."""
        if self.bias is not None:
            raise BadInputError("a row-parallel fp8 linear with a bias would add it once per rank; onecard's models "
                                "have none there")
        _check_tiles(length, self.out_features)
        self.weight = self.weight.narrow(1, start, length).contiguous()
        self.in_features = length

    def weight_bytes(self) -> int:
        """Bytes a matmul reads for the weight (codes + scales), as ``QuantLinear.weight_bytes``."""
        return self.weight.numel() + 4 * self.out_features

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]``, what an ``nn.Linear`` would hold."""
        return (self.weight.float() * self.weight_scale.t()).to(dtype)

    def reference_matmul(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The products ``_scaled_mm`` computes, in fp32 from the same codes and scales (bf16 out, no bias)."""
        return ((codes.float() * scale) @ self.dequantized_weight().t()).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        codes, scale = quantize_rows(x.reshape(-1, self.in_features))
        if x.is_cuda:
            y = torch._scaled_mm(codes, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16, use_fast_accum=True)
        else:  # CPU _scaled_mm takes per-tensor scales only in some torch versions
            y = self.reference_matmul(codes, scale)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y
