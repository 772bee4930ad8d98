"""``--precision fp8`` for LoRA: the frozen base linears as fp8 (e4m3) codes, forward and input gradient on fp8
tensor cores.

Why not torchao's ``Float8Linear`` (what full fine-tuning uses): it quantizes every weight again on every call,
since a trained weight changes, with eager PyTorch ops. Over a frozen base that is all overhead: on an H200 a
Llama-3-8B LoRA step ran at 0.40-0.47x the speed of onecard's bf16 path with it
(``docs/results/train_speed_fp8_torchao.json``). A frozen weight is quantized once, twice over: per output
channel for the forward product ``x W^T`` and per input channel for the input gradient ``g W``. Both products
are then row-wise scaled ``torch._scaled_mm`` calls, and the two fp8 copies take the bf16 weight's bytes.
Activations and output gradients get one scale per row at run time (``kernels.fp8_quant``, one Triton launch),
as the inference ``quant.fp8.Fp8Linear`` does. The forward accumulates with Hopper's fast fp8 accumulation and
the input gradient without it, as torchao's float8 recipes do.
"""

from __future__ import annotations

import torch
from torch import nn

from onecard.kernels.fp8_quant import FP8, quantize_rows, quantize_rows_reference


def fp8_product(a: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fast_accum: bool) -> torch.Tensor:
    """``a [M, K] @ W^T`` in bf16 for ``W [N, K] = codes * scale^T`` (``scale`` ``[1, N]``, one per row of W);
    ``a`` is quantized per row first. The CPU computes the same products from the same codes in fp32."""
    a_codes, a_scale = quantize_rows(a)
    if a.is_cuda:
        return torch._scaled_mm(a_codes, codes.t(), scale_a=a_scale, scale_b=scale, out_dtype=torch.bfloat16,
                                use_fast_accum=fast_accum)
    return ((a_codes.float() * a_scale) @ (codes.float() * scale.t()).t()).to(torch.bfloat16)


class _Fp8FrozenMatmul(torch.autograd.Function):
    """``x W^T`` with a gradient for ``x`` only; saves nothing (the base is read again in backward)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, base: "Fp8FrozenLinear") -> torch.Tensor:
        ctx.base = base
        return base.matmul(x2).to(x2.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return ctx.base.input_grad(grad_out).to(grad_out.dtype) if ctx.needs_input_grad[0] else None, None


class Fp8FrozenLinear(nn.Linear):
    """A frozen ``nn.Linear`` stored as e4m3 codes ``qweight [out, in]`` (scales ``[1, out]``) and their transpose's
    ``qweight_t [in, out]`` (scales ``[1, in]``); gives gradients to its input only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device))
        self.register_buffer("qweight_t", torch.zeros(in_features, out_features, dtype=FP8, device=device))
        self.register_buffer("weight_t_scale", torch.ones(1, in_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @property
    def weight(self) -> torch.Tensor:  # PEFT and HF read .weight for device/dtype/shape
        return self.qweight

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Fp8FrozenLinear":
        w = linear.weight.data
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        mod.qweight, scale = quantize_rows_reference(w.float())
        mod.weight_scale = scale.t().contiguous()
        mod.qweight_t, scale_t = quantize_rows_reference(w.t().float().contiguous())  # row-major, as _scaled_mm needs
        mod.weight_t_scale = scale_t.t().contiguous()
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return mod

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [M, in] @ W^T`` in bf16, no bias."""
        return fp8_product(x2, self.qweight, self.weight_scale, fast_accum=True)

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """``grad_out [M, out] @ W`` in bf16."""
        return fp8_product(grad_out, self.qweight_t, self.weight_t_scale, fast_accum=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8FrozenMatmul.apply(x.reshape(-1, self.in_features), self)
        if x.dim() != 2:  # 2-D stays a plain tensor, which the lean LoRA forward adds its adapter into in place
            y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def use_fp8_bases_(model: nn.Module, keep) -> int:
    """Replace every ``nn.Linear`` for which ``keep(module, name)`` holds by an ``Fp8FrozenLinear`` in its parent,
    one at a time (each bf16 weight is released once its codes exist); returns how many."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and keep(m, n)]
    for name in names:
        linear = model.get_submodule(name)
        model.set_submodule(name, Fp8FrozenLinear.from_linear(linear))
        linear.weight = None
    return len(names)
