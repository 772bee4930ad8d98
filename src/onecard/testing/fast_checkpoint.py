"""Full-size random checkpoints written tensor by tensor, without ever building the model.

HF's path (``from_config`` on the GPU running ``_init_weights``, then
``save_pretrained``) took 434 s for a 13B on an H200. Benchmarks only need
random weights of the right kinds, so here the model is built on the ``meta``
device to learn the names, shapes and dtypes ``save_pretrained`` would write,
and each tensor is drawn directly on the target device and written shard by
shard; the device holds one tensor at a time, the host one shard.

Kinds follow HF's ``_init_weights`` (Llama/Qwen2/Mistral, CLIP, LLaVA):
linear / conv / embedding weights and loose parameters (CLIP's
``class_embedding``) are normal(0, initializer_range); norm weights are ones;
biases are zeros. The exact per-module stds of CLIP are not reproduced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from onecard.errors import UnsupportedModelError

DEFAULT_SHARD_BYTES = 4 * 1024**3  # save_pretrained's shards are ~5 GB; this keeps host memory per shard lower
_NORM_TYPES = (torch.nn.GroupNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as ``save_pretrained`` stores it, and how to draw it (``normal``, ``ones`` or ``zeros``)."""

    name: str
    shape: tuple[int, ...]
    kind: str


def _is_norm(module: torch.nn.Module) -> bool:
    # HF's own test: norms are custom classes, recognised by name (LlamaRMSNorm, nn.LayerNorm, ...).
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or "LayerNorm" in name or "RMSNorm" in name


def meta_model(config: dict):
    """The HF model for ``config`` (a config.json dict) on the meta device: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    from onecard.testing.checkpoints import hf_config, hf_model_class

    cls, hf_cfg = hf_model_class(config), hf_config(config)
    with torch.device("meta"):
        return cls(hf_cfg) if cls is not None else AutoModelForCausalLM.from_config(hf_cfg)


def tensor_specs(model: torch.nn.Module) -> list[TensorSpec]:
    """The parameters ``save_pretrained`` writes for ``model`` (tied ones once, under the first name), in module order.

    It would write persistent buffers too, but they hold values (not random
    draws) a meta model cannot give, so they raise; none of the built-in
    architectures has one (rotary ``inv_freq`` and CLIP's ``position_ids`` are
    non-persistent).
    """
    specs, seen = [], set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied: save_pretrained keeps the first name (the input embedding)
                continue
            seen.add(id(p))
            if p_name == "bias":
                kind = "zeros"
            elif _is_norm(module):
                kind = "ones"
            else:
                kind = "normal"
            specs.append(TensorSpec(prefix + p_name, tuple(p.shape), kind))
        for b_name, _ in module.named_buffers(recurse=False):
            if b_name not in module._non_persistent_buffers_set:
                raise UnsupportedModelError(
                    f"{type(model).__name__} has a persistent buffer '{prefix + b_name}' whose value a random "
                    "writer cannot know; build this model with make_random_checkpoint instead")
    return specs


def draw(spec: TensorSpec, dtype: torch.dtype, device: str | torch.device, std: float,
         generator: torch.Generator) -> torch.Tensor:
    """One tensor of ``spec``'s kind, drawn on ``device`` in ``dtype`` (no float32 detour)."""
    if spec.kind == "ones":
        return torch.ones(spec.shape, dtype=dtype, device=device)
    if spec.kind == "zeros":
        return torch.zeros(spec.shape, dtype=dtype, device=device)
    return torch.empty(spec.shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)


def saved_names(model: torch.nn.Module, specs: list[TensorSpec]) -> list[TensorSpec]:
    """``specs`` under the names ``save_pretrained`` writes: transformers 5 reverts its load-time renamings on save
    (LLaVA's ``model.language_model.*`` is stored as ``language_model.model.*``)."""
    from transformers.core_model_loading import revert_weight_conversion

    out = []
    for s in specs:
        saved = revert_weight_conversion(model, {s.name: torch.empty(s.shape, device="meta")})
        if len(saved) != 1:
            raise UnsupportedModelError(
                f"transformers saves '{s.name}' of {type(model).__name__} as {len(saved)} tensors; the fast random "
                "writer only follows renamings: build this model with make_random_checkpoint instead")
        (name, t), = saved.items()
        out.append(TensorSpec(name, tuple(t.shape), s.kind))
    return out


def write_random_weights(model: torch.nn.Module, out: Path, dtype: str, device: str | torch.device,
                         std: float, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write random safetensors shards (+ index when several) for ``model``'s tensors into ``out``; returns file names.

    Sharding and file names come from huggingface_hub's splitter, the one ``save_pretrained`` uses.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    specs = {s.name: s for s in saved_names(model, tensor_specs(model))}
    split = split_torch_state_dict_into_shards(
        {n: torch.empty(s.shape, dtype=torch_dtype, device="meta") for n, s in specs.items()},
        filename_pattern="model{suffix}.safetensors", max_shard_size=shard_bytes)
    generator = torch.Generator(device=device).manual_seed(seed)
    for fname, names in split.filename_to_tensors.items():
        tensors = {n: draw(specs[n], torch_dtype, device, std, generator).cpu() for n in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def write_fast_random_checkpoint(config: dict, out: Path, dtype: str = "bfloat16", device: str = "cpu",
                                 seed: int = 0, tokenizer: bool = True,
                                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A complete random folder for ``config`` (config.json as ``make_random_checkpoint`` writes it, weights, tokenizer)."""
    from onecard.testing.checkpoints import copy_tokenizer, write_config

    model = meta_model(config)
    text_cfg = config.get("text_config", config)
    out.mkdir(parents=True, exist_ok=True)
    write_random_weights(model, out, dtype, device, float(text_cfg.get("initializer_range", 0.02)), seed, shard_bytes)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(out))
    if model.can_generate() and model.generation_config is not None:  # save_pretrained writes it too
        model.generation_config.save_pretrained(str(out))
    write_config(out, config, dtype)
    if tokenizer:
        copy_tokenizer(out, config)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return out

