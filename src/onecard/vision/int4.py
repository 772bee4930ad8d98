"""Put a LLaVA model on its device with the language model in int4: the vision tower and projector stay float.

The language model is ~95% of a LLaVA's weights and the part decode reads
every token, so it is the part worth 4 bits; the CLIP tower runs once per
image and is sensitive to quantization, so it keeps its float weights.
Layers move to the device one at a time and are quantized there, so a 13B
model never holds its 26 GB of bf16 language-model weights on a 24 GB card.
"""

from __future__ import annotations

import torch
from torch import nn

from onecard.quant import QuantLinear
from onecard.quant.config import QuantSpec


def quantize_linears_(module: nn.Module, spec: QuantSpec) -> int:
    """Swap every plain ``nn.Linear`` inside ``module`` for an RTN ``QuantLinear``; returns how many."""
    swaps = [(parent, attr, child) for parent in module.modules() for attr, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, attr, lin in swaps:
        q = QuantLinear.from_linear(lin, spec.bits, spec.group_size, spec.sym)
        if q.bias is not None:
            q.bias.data = q.bias.data.to(lin.weight.dtype)
        setattr(parent, attr, q)
    return len(swaps)


@torch.no_grad()
def place_llava_(model, device: torch.device, quantization: str | None = "rtn-int4", progress: bool = False):
    """Move an HF ``LlavaForConditionalGeneration`` (already in its compute dtype) to ``device``; with
    ``quantization`` its language model's decoder linears become ``QuantLinear`` (LM head and embeddings stay float).

    Devices only, never dtypes: ``.to(dtype)`` would also round the float32 RoPE frequencies HF keeps as buffers.
    """
    spec = QuantSpec.parse(quantization) if quantization else None
    lm = model.model.language_model
    layers = list(lm.layers)
    for name, child in model.named_children():
        if name != "model":
            child.to(device)
    for name, child in model.model.named_children():
        if name != "language_model":
            child.to(device)
    for name, child in lm.named_children():
        if name != "layers":
            child.to(device)
    it = layers
    if progress:
        from rich.progress import track

        it = track(layers, description="language model -> int4" if spec else "language model", transient=True)
    for layer in it:
        layer.to(device)
        if spec is not None:
            quantize_linears_(layer, spec)
    return model
