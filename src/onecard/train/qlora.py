"""QLoRA base: frozen int4 linear layers (RTN, symmetric, group-wise), dequantized on the fly.

Why our own: QLoRA needs only a frozen low-bit base that can give d(input); it
does not need bitsandbytes. Weights are stored as two 4-bit codes per byte plus
one bf16/fp16 scale per ``group_size`` inputs (~4.25 bits/weight), so Llama-3-8B's
linear layers take ~4 GiB instead of 14 GiB.

The matmul dequantizes the whole weight to the compute dtype and calls cuBLAS:
at training's thousands of tokens per step this is compute-bound, and the
dequantized copy is transient. ``_Int4MatmulFn`` saves nothing for backward
but the packed codes, and dequantizes again for ``dy @ W`` — autograd would
otherwise keep a full bf16 copy of every layer's weight alive until backward.

``Int4Linear`` subclasses ``nn.Linear`` so PEFT's LoRA wraps it like any
linear (``lora.Linear(base_layer=Int4Linear)``). It is a training format only:
``onecard quantize`` writes the GPTQ-layout checkpoints the engine serves, and
``--merge`` merges a QLoRA adapter into the original full-precision weights.
(This is a minimal base of the training job's own; onecard.quant's QuantLinear
is the inference format and has no backward.)

``--qlora-quant nf4`` loads the QLoRA paper's base instead, through transformers
and bitsandbytes (``nf4_quantization_config``), for users whose recipes or
adapters were made against it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from onecard.errors import BadInputError
from onecard.kernels.int4_dequant import dequantize_int4

log = logging.getLogger(__name__)

QLORA_QUANTS = ("int4", "nf4")  # onecard's own RTN int4 (no extra package), bitsandbytes' NF4


def nf4_quantization_config(compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for the QLoRA paper's base: NF4 codes in blocks of 64, their absmax
    double-quantized (~4.13 bits a weight), matmuls in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_nf4_model(path, dtype: torch.dtype, device: str) -> nn.Module:
    """The folder's causal LM on bitsandbytes' NF4 base, quantized as its weights load onto ``device``
    (``--qlora-quant nf4``); on a CPU its 4-bit layers take bitsandbytes' generic path (``nf4_generic_cpu_path_``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": device},
                                                 quantization_config=nf4_quantization_config(dtype))
    if device == "cpu":
        nf4_generic_cpu_path_(model)
    return model


def nf4_layers(model: nn.Module) -> list[nn.Module]:
    """bitsandbytes' 4-bit layers of ``model``: those whose own ``weight`` parameter holds packed codes (PEFT's
    wrappers only show their base's through a property)."""
    return [m for m in model.modules() if type(m._parameters.get("weight")).__name__ == "Params4bit"]


def nf4_generic_cpu_path_(model: nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers off its AVX512-BF16 CPU kernel; returns how many. Why: at a layer's first
    no-grad call in eval mode (an evaluation step) bitsandbytes 0.50 repacks the weight for that kernel in place,
    which needs the output width a multiple of 32 and the input width one of the block (64): training the tiny
    model (688-wide MLP) on CPU stopped at its first evaluation on each. The generic path has neither limit."""
    layers = [m for m in nf4_layers(model) if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def quantize_int4(weight: torch.Tensor, group_size: int = 64, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN: codes in [-8, 7] stored +8 as uint8 nibbles (even column low); scale = absmax/7 per group."""
    out_f, in_f = weight.shape
    if in_f % group_size or group_size % 2:
        raise BadInputError(f"int4 group size {group_size} must be even and divide the input size {in_f}")
    w = weight.float().reshape(out_f, in_f // group_size, group_size)
    scale = (w.abs().amax(-1, keepdim=True) / 7.0).clamp(min=1e-8).to(scale_dtype)
    q = torch.round(w / scale.float()).clamp(-8, 7).to(torch.int16) + 8
    q = q.reshape(out_f, in_f).to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale.squeeze(-1).contiguous()


class _Int4MatmulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scales, dtype):
        ctx.save_for_backward(packed, scales)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), dequantize_int4(packed, scales, dtype))

    @staticmethod
    def backward(ctx, dy):
        packed, scales = ctx.saved_tensors
        dx = dy.to(ctx.dtype) @ dequantize_int4(packed, scales, ctx.dtype)
        return dx.to(ctx.x_dtype), None, None, None


class Int4Linear(nn.Linear):
    """Frozen int4 ``nn.Linear`` (packed codes + scales as buffers); gives gradients to its input only."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool,
                 compute_dtype: torch.dtype, device=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group_size, dtype=compute_dtype,
                                                   device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def weight(self) -> torch.Tensor:  # PEFT and HF read .weight for device/dtype/shape
        return self.qweight

    @property
    def codes(self) -> torch.Tensor:
        """The packed uint8 codes, whether ``qweight`` holds them as uint8 or as float bits (for FSDP2)."""
        return self.qweight if self.qweight.dtype == torch.uint8 else self.qweight.view(torch.uint8)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        mod = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, compute_dtype,
                  device=linear.weight.device)
        mod.qweight, mod.scales = quantize_int4(linear.weight.data, group_size, compute_dtype)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4(self.codes, self.scales, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int4MatmulFn.apply(x, self.codes, self.scales, self.compute_dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}, "
                f"compute={self.compute_dtype}")


def quantize_model_int4(model: nn.Module, group_size: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                        skip: tuple[str, ...] = ("lm_head",), device: str | torch.device | None = None,
                        progress: bool = False) -> int:
    """Replace every ``nn.Linear`` (except ``skip`` names) in its parent by an ``Int4Linear``; returns the count.

    Layers are quantized one at a time (moved to ``device`` first, if given) and the full-precision weight is
    released as soon as its replacement exists: a model loaded on CPU reaches the GPU already in int4.
    """
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rpartition(".")[2] not in skip
             and m.in_features % group_size == 0]
    if not names:
        raise BadInputError(f"no linear layer with an input size divisible by {group_size} to quantize")
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("quantizing base to int4", total=len(names))
    try:
        for name in names:
            linear = model.get_submodule(name)
            if device is not None:
                linear = linear.to(device)
            model.set_submodule(name, Int4Linear.from_linear(linear, group_size, compute_dtype))
            linear.weight = None
            if bar:
                bar.advance(task)
    finally:
        if bar:
            bar.stop()
    return len(names)
