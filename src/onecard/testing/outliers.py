"""A trained model given a few hidden channels of large activations, computing exactly what it did.

Why: LLMs trained at scale carry a few hidden dimensions whose activations are
far larger than the rest, the same dimensions in every layer, and those are
what AWQ's per-channel scales protect (a linear's error on channel ``c`` is its
weights' rounding error times ``x_c``). The models this project trains itself
are too small and too briefly trained to grow them, so on them AWQ has little
to protect (docs/quantization.md, "Several trainings").

``with_outlier_channels`` multiplies each RMSNorm's weight by ``factor`` on
the chosen channels and divides the same input columns of the linears that
read that norm (q/k/v after the attention norm, gate/up after the MLP norm) by
``factor``. With a power-of-two factor both are exact in floating point, so
the float model's logits are bit for bit what they were, while every quantizer
sees inputs whose channels ``c`` are ``factor`` times larger than before and
weights whose columns ``c`` are that much smaller.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from onecard.errors import BadInputError
from onecard.testing.fast_checkpoint import DEFAULT_SHARD_BYTES
from onecard.testing.grown import _read_tensors, _write_folder

NORM_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def with_outlier_channels(src: str | Path, out: str | Path, channels: int = 4, factor: float = 32.0,
                          seed: int = 0) -> Path:
    """Write ``src`` (an HF Llama-family folder) to ``out`` with ``channels`` hidden channels, drawn by ``seed``,
    ``factor`` times larger at every attention and MLP input; the function it computes is unchanged."""
    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    hidden = config["hidden_size"]
    if not 0 < channels <= hidden or factor <= 0 or math.frexp(factor)[0] != 0.5:
        raise BadInputError(f"outlier channels: need 0 < channels <= {hidden} and a power-of-two factor (exact in "
                            f"floating point), got {channels} and {factor}")
    picked = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[:channels].sort().values
    tensors = _read_tensors(src)

    def make(name: str) -> torch.Tensor:
        t = tensors[name].clone()
        for norm, readers in NORM_READERS.items():
            if name.endswith(f".{norm}.weight"):
                t[picked] *= factor
            elif any(name.endswith(f".{r}.weight") for r in readers):
                t[:, picked] /= factor
        return t

    note = {"outlier_channels": picked.tolist(), "factor": factor, "source": str(src)}
    return _write_folder(src, out, tensors, make, config, note, DEFAULT_SHARD_BYTES)
