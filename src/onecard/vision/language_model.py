"""A LLaVA's language model as onecard's own ``LlamaModel`` (fused qkv / gate_up, paged KV, CUDA-graph decode).

The weights come from the loaded HF model, not the folder, so this works the
same for a checkpoint and for a random model built in memory (benchmarks).
Layers are built on the target device one at a time and quantized there, so
the peak is the int4 model plus one float layer.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from onecard.errors import ModelFolderError
from onecard.models.config import ModelArgs
from onecard.models.llama import LlamaModel
from onecard.models.loader import hf_to_ours, shard_rows
from onecard.quant.config import QuantSpec
from onecard.vision.int4 import quantize_linears_

_LAYER = re.compile(r"^layers\.(\d+)\.")


@torch.no_grad()
def onecard_language_model(hf_llava, args: ModelArgs, device: torch.device, dtype: torch.dtype,
                           quantization: str | None = "rtn-int4", max_positions: int | None = None,
                           progress: bool = False) -> LlamaModel:
    """Copy ``hf_llava``'s language model (+ LM head) into a new ``LlamaModel`` on ``device``."""
    spec = QuantSpec.parse(quantization) if quantization else None
    src = hf_llava.model.language_model.state_dict()
    src = {"model." + k: v for k, v in src.items() if "rotary_emb" not in k}
    src["lm_head.weight"] = hf_llava.lm_head.weight
    with torch.device("meta"):
        model = LlamaModel(args, max_positions)
    per_layer: dict[int, list[str]] = {}
    top: list[str] = []
    for name in src:
        mapped = hf_to_ours(name)
        if mapped is None:
            raise ModelFolderError(f"the language model has a tensor '{name}' onecard's Llama does not know; "
                                   "run with backend='hf'")
        m = _LAYER.match(mapped[0])
        (per_layer.setdefault(int(m.group(1)), []) if m else top).append(name)
    for name in ("embed_tokens", "norm", "lm_head", "rotary"):
        getattr(model, name).to_empty(device=device)
    for name in ("embed_tokens", "norm", "lm_head"):
        getattr(model, name).to(dtype)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.init_table()
    filled: dict[str, int] = {}
    _copy(model, args, src, top, filled)
    it = range(args.num_layers)
    if progress:
        from rich.progress import track

        it = track(it, description="language model -> onecard" + (" int4" if spec else ""), transient=True)
    for i in it:
        layer = model.layers[i].to_empty(device=device).to(dtype)
        _copy(model, args, src, per_layer.get(i, []), filled)
        if spec is not None:
            quantize_linears_(layer, spec)
    _check_filled(model, args, filled)
    return model.eval().requires_grad_(False)


def _copy(model: nn.Module, args: ModelArgs, src: dict, names: list[str], filled: dict[str, int]) -> None:
    """Copy HF tensors ``names`` into ``model`` (fusing q/k/v and gate/up rows); count rows filled per parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for hf_name in names:
        ours, shard = hf_to_ours(hf_name)
        if args.tie_word_embeddings and ours == "lm_head.weight":
            continue
        if ours not in params:
            raise ModelFolderError(f"tensor '{hf_name}' has no place in onecard's Llama ({ours}); run with backend='hf'")
        dst = params[ours] if shard is None else params[ours].narrow(0, *shard_rows(args, ours, shard))
        t = src[hf_name]
        if tuple(dst.shape) != tuple(t.shape):
            raise ModelFolderError(f"'{hf_name}' is {tuple(t.shape)} but the text config implies {tuple(dst.shape)}")
        dst.copy_(t.to(device=dst.device, dtype=dst.dtype))
        filled[ours] = filled.get(ours, 0) + t.shape[0]


def _check_filled(model: nn.Module, args: ModelArgs, filled: dict[str, int]) -> None:
    """Every parameter got all its rows (built with ``to_empty``: a gap would be garbage, not zeros)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue
        if filled.get(name, 0) != p.shape[0]:
            raise ModelFolderError(f"the language model has no weights for {name}; the checkpoint is incomplete")
