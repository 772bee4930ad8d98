"""Load a Hugging Face safetensors folder into our fused Llama-family layout.

Two steps, so quantization can reuse the second:

    model = build_model(args, dtype, device)       # allocated, uninitialized
    load_weights(model, folder, skip=None)         # HF tensors -> fused params

``hf_to_ours(hf_name)`` is the name map both use: q/k/v go into one
``qkv_proj`` (rows q, then k, then v), gate/up into one ``gate_up_proj``.
``skip(hf_name) -> True`` leaves a tensor out (a GPTQ loader skips the linear
weights it loads itself); anything neither loaded nor skipped is an error, so
a partial checkpoint never runs with garbage weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from onecard.errors import ModelFolderError
from onecard.models.config import ModelArgs
from onecard.models.folder import ModelFolder
from onecard.models.llama import LlamaModel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF suffix inside a layer -> (our suffix, shard index in the fused tensor or None)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def hf_to_ours(hf_name: str) -> tuple[str, int | None] | None:
    """Map an HF tensor name to (our parameter name, shard index) or None if we have no such tensor.

    Shard index: 0/1/2 = q/k/v rows of ``qkv_proj``; 0/1 = gate/up rows of
    ``gate_up_proj``; None = copied whole. Works for any suffix
    (``.weight``, ``.bias``, ``.qweight``, ``.scales``...).
    """
    if hf_name.startswith("model.embed_tokens."):
        return "embed_tokens." + hf_name.split(".", 2)[2], None
    if hf_name.startswith("model.norm."):
        return "norm." + hf_name.split(".", 2)[2], None
    if hf_name.startswith("lm_head."):
        return hf_name, None
    m = _LAYER.match(hf_name)
    if not m:
        return None
    layer, rest = m.groups()
    module, _, leaf = rest.rpartition(".")
    if module in _FUSED:
        ours, shard = _FUSED[module]
        return f"layers.{layer}.{ours}.{leaf}", shard
    return f"layers.{layer}.{rest}", None


def shard_rows(args: ModelArgs, our_name: str, shard: int) -> tuple[int, int]:
    """(start, length) of a shard along dim 0 of a fused ``qkv_proj``/``gate_up_proj`` tensor."""
    if ".qkv_proj." in our_name:
        sizes = [args.q_size, args.kv_size, args.kv_size]
    else:
        sizes = [args.intermediate_size, args.intermediate_size]
    return sum(sizes[:shard]), sizes[shard]


def build_model(args: ModelArgs, dtype: torch.dtype, device: str | torch.device,
                max_positions: int | None = None) -> LlamaModel:
    """Our model with allocated but uninitialized weights (built on meta, then materialized) and its rope table."""
    with torch.device("meta"):  # cast on meta: materializing in fp32 first would need 2x the bf16 weights
        model = LlamaModel(args, max_positions).to(dtype)
    model = model.to_empty(device=device)
    if args.tie_word_embeddings:  # to_empty re-creates parameters: re-tie
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.init_table()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def load_weights(model: LlamaModel, folder: ModelFolder, skip: Callable[[str], bool] | None = None,
                 progress: bool = False) -> None:
    """Copy every HF tensor of ``folder`` into ``model`` (fusing q/k/v and gate/up); verify nothing is missing."""
    params = dict(model.named_parameters(remove_duplicate=False))
    expected_rows: dict[str, int] = {}
    loaded_rows: dict[str, int] = {}
    tied = model.args.tie_word_embeddings
    device = next(model.parameters()).device
    names = [n for n in folder.tensors if not (skip and skip(n))]
    it = folder.iter_tensors(set(names), device="cpu")
    if progress:
        from rich.progress import track

        it = track(it, total=len(names), description="loading weights", transient=True)
    for hf_name, tensor in it:
        mapped = hf_to_ours(hf_name)
        if mapped is None:
            if "rotary_emb" in hf_name:  # old checkpoints store inv_freq; we compute our own
                continue
            raise ModelFolderError(f"unexpected tensor '{hf_name}' in '{folder.path}'; is config.json the right one?")
        ours, shard = mapped
        if tied and ours == "lm_head.weight":
            continue  # tied: the head is the embedding
        if ours not in params:
            raise ModelFolderError(f"tensor '{hf_name}' has no place in the {folder.architecture} model; "
                                   "config.json does not match the weights")
        param = params[ours]
        if shard is None:
            dst = param
        else:
            start, length = shard_rows(model.args, ours, shard)
            dst = param.narrow(0, start, length)
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ModelFolderError(f"tensor '{hf_name}' has shape {tuple(tensor.shape)} but config.json implies "
                                   f"{tuple(dst.shape)}; config.json does not match the weights")
        dst.copy_(tensor.to(device=device, dtype=param.dtype))
        loaded_rows[ours] = loaded_rows.get(ours, 0) + tensor.shape[0]
        expected_rows[ours] = param.shape[0]
    skipped = {hf_to_ours(n)[0] for n in folder.tensors if skip and skip(n) and hf_to_ours(n)}
    missing = [n for n, p in params.items()
               if loaded_rows.get(n, 0) != p.shape[0] and n not in skipped and not (tied and n == "lm_head.weight")
               and not any(n.startswith(s.rsplit(".", 1)[0] + ".") for s in skipped)]
    if missing:
        raise ModelFolderError(f"{len(missing)} weights missing from '{folder.path}' (first: {missing[0]}); "
                               "the checkpoint is incomplete: download it again")


def load_model(folder: ModelFolder, dtype: torch.dtype, device: str | torch.device,
               max_positions: int | None = None, progress: bool = False) -> LlamaModel:
    """``build_model`` + ``load_weights`` for an unquantized folder."""
    model = build_model(folder.model_args(), dtype, device, max_positions)
    load_weights(model, folder, progress=progress)
    return model
