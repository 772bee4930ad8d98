"""Run quantized weights: load GPTQ/AWQ folders into onecard's model (or an HF model), or RTN-quantize on the fly.

``load_quantized_model`` builds our fused Llama-family model without ever
allocating the dense linear weights (the model is built on the meta device,
the four linears per layer are swapped for ``QuantLinear`` holding the
checkpoint's codes, and only then is the rest materialized), so a 34B-arch
int4 model loads within 24 GiB. q/k/v and gate/up are fused along the output
dim, which is exact because projections of one input share ``g_idx``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from onecard.errors import ModelFolderError
from onecard.models.folder import ModelFolder, open_model_folder
from onecard.quant.checkpoint import QUANT_SUFFIXES, QuantFormat, quantized_modules, read_quantized
from onecard.quant.config import QuantSpec
from onecard.quant.fp8 import Fp8Linear
from onecard.quant.fp8_checkpoint import (SCALE_SUFFIXES, fp8_checkpoint_format, fp8_modules, fused_fp8_linear,
                                          note_activation_scheme)
from onecard.quant.linear import ConcatLinear, QuantLinear, concat_quantized
from onecard.quant.rtn import QuantizedWeight

# our fused linear (in a layer) -> the HF modules it is made of
FUSED_FROM_HF = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _folder(folder: str | Path | ModelFolder) -> tuple[ModelFolder, QuantFormat]:
    f = folder if isinstance(folder, ModelFolder) else open_model_folder(folder)
    if not f.quantization_config:
        raise ModelFolderError(f"'{f.path}' has no quantization_config in config.json; it is not a quantized model "
                               "(load it normally, or quantize it with `onecard quantize`)")
    return f, QuantFormat.from_config(f.quantization_config)


def _fused_module(parts: list[QuantizedWeight], device) -> nn.Module:
    """One ``QuantLinear`` for q/k/v (gate/up); separate ones, outputs concatenated, if their g_idx differ."""
    parts = [QuantizedWeight(p.q.to(device), p.scales.to(device), p.zeros.to(device), p.g_idx.to(device), p.bits,
                             p.group_size) for p in parts]
    if len(parts) == 1:
        return QuantLinear.from_quantized(parts[0])
    if all(torch.equal(p.g_idx, parts[0].g_idx) and p.group_size == parts[0].group_size for p in parts):
        return QuantLinear.from_quantized(concat_quantized(parts))
    return ConcatLinear([QuantLinear.from_quantized(p) for p in parts])


def _quantized_reader(f: ModelFolder, device) -> tuple[set[str], Callable, Callable[[str], bool]]:
    """What a quantized folder (GPTQ, AWQ or fp8) holds, for both loaders: the HF modules stored quantized,
    ``build(names)`` making one module of them (stacked along the output), and ``stored(name)``: the tensors
    ``build`` reads (every other tensor loads as usual)."""
    fp8 = fp8_checkpoint_format(f.quantization_config)
    if fp8:
        note_activation_scheme(f, fp8)
        present = fp8_modules(f)
        weights = {f"{m}.weight" for m in present}
        return (present, lambda names: fused_fp8_linear(f, names, device),
                lambda n: n.endswith(SCALE_SUFFIXES) or n in weights)
    f, fmt = _folder(f)
    return (set(quantized_modules(f)), lambda names: _fused_module([read_quantized(f, fmt, n) for n in names], device),
            lambda n: n.endswith(QUANT_SUFFIXES))


@torch.no_grad()
def load_quantized_model(folder: str | Path | ModelFolder, dtype: torch.dtype = torch.bfloat16,
                         device: str | torch.device = "cuda", max_positions: int | None = None,
                         progress: bool = False):
    """onecard's ``LlamaModel`` with ``QuantLinear`` in place of every quantized linear (GPTQ or AWQ folder), or
    ``Fp8Linear`` for an fp8 folder (``fp8_checkpoint``)."""
    from onecard.models.llama import LlamaModel
    from onecard.models.loader import load_weights

    f = folder if isinstance(folder, ModelFolder) else open_model_folder(folder)
    present, build, stored = _quantized_reader(f, device)
    args = f.model_args()
    with torch.device("meta"):
        model = LlamaModel(args, max_positions)
    # Which fused linears are quantized in the file (all of q/k/v, or none: never half).
    swap: dict[tuple[int, str], tuple[str, ...]] = {}
    for i in range(args.num_layers):
        for ours, hf_parts in FUSED_FROM_HF.items():
            names = [f"model.layers.{i}.{p}" for p in hf_parts]
            have = [n in present for n in names]
            if all(have):
                swap[(i, ours)] = tuple(names)
                parent, attr = ours.split(".")
                setattr(getattr(model.layers[i], parent), attr, nn.Identity())  # placeholder: no dense allocation
            elif any(have):
                raise ModelFolderError(f"'{f.path}' quantizes only some of {hf_parts} in layer {i}; "
                                       "onecard fuses them and needs all or none")
    model = model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.init_table()
    items = swap.items()
    if progress:
        from rich.progress import track

        items = track(list(items), description="loading quantized linears", transient=True)
    for (i, ours), names in items:
        mod = build(names)
        if any(f"{n}.bias" in f.tensors for n in names):
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, device=device, dtype=dtype),
                                    requires_grad=False)  # filled by load_weights below (fused rows)
        parent, attr = ours.split(".")
        setattr(getattr(model.layers[i], parent), attr, mod)
    load_weights(model, f, skip=stored, progress=progress)
    return model.eval().requires_grad_(False)


def _linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every ``nn.Linear`` inside ``module``."""
    return [(parent, attr, child) for parent in module.modules() for attr, child in parent.named_children()
            if type(child) is nn.Linear]


def _decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every ``nn.Linear`` inside the decoder layers (never the head)."""
    found = []
    for name, module in model.named_modules():
        if ".layers." not in f".{name}." and not name.startswith("layers."):
            continue
        for attr, child in module.named_children():
            if type(child) is nn.Linear:
                found.append((module, attr, child))
    return found


def _quantize_linears_(linears: list[tuple[nn.Module, str, nn.Linear]], s: QuantSpec) -> None:
    for parent, attr, lin in linears:
        if s.float8:
            setattr(parent, attr, Fp8Linear.from_linear(lin))
            continue
        q = QuantLinear.from_linear(lin, s.bits, s.group_size, s.sym)
        if q.bias is not None:
            q.bias.data = q.bias.data.to(lin.weight.dtype)
        setattr(parent, attr, q)


@torch.no_grad()
def quantize_model_(model: nn.Module, spec: str | QuantSpec) -> nn.Module:
    """On-the-fly RTN, in place: every decoder-layer ``nn.Linear`` becomes a ``QuantLinear`` (``Fp8Linear``).

    Works on onecard's model (fused qkv/gate_up: one group grid across the
    fused rows is the same as quantizing each part, since RTN is per output row)
    and on HF models. ``spec``: ``"rtn-int4"`` (g128, asymmetric), ``"int8"`` or ``"fp8"``.
    """
    _quantize_linears_(_decoder_linears(model), QuantSpec.parse(spec))
    return model


@torch.no_grad()
def load_rtn_model(folder: str | Path | ModelFolder, spec: str | QuantSpec, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cuda", max_positions: int | None = None, progress: bool = False):
    """onecard's model from a float folder, RTN-quantized one decoder layer at a time (what the engine loads).

    Why: ``load_model`` + ``quantize_model_`` puts the whole dense model on the
    device first (26 GB for a 13B in bf16). Here the model is built on the meta
    device, and each layer in turn is materialized, filled from the safetensors,
    quantized and its dense linears dropped, so the device holds the quantized
    layers so far plus one dense layer. The result equals that of
    ``load_model`` + ``quantize_model_``, bit for bit.
    """
    from onecard.models.llama import LlamaModel
    from onecard.models.loader import load_weights

    s = QuantSpec.parse(spec)
    f = folder if isinstance(folder, ModelFolder) else open_model_folder(folder)
    args = f.model_args()
    with torch.device("meta"):
        model = LlamaModel(args, max_positions)
    outer = [model.embed_tokens, model.norm] + ([] if args.tie_word_embeddings else [model.lm_head])
    for part in outer:
        part.to(dtype).to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to_empty(device=device).init_table()
    load_weights(model, f, skip=lambda n: n.startswith("model.layers."))
    layers = range(args.num_layers)
    if progress:
        from rich.progress import track

        layers = track(layers, description=f"loading + {'fp8' if s.float8 else f'RTN int{s.bits}'}", transient=True)
    for i in layers:
        prefix = f"model.layers.{i}."
        model.layers[i].to(dtype).to_empty(device=device)
        load_weights(model, f, skip=lambda n, p=prefix: not n.startswith(p))
        _quantize_linears_(_linears(model.layers[i]), s)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def load_quantized_hf(folder: str | Path | ModelFolder, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A transformers model with our ``QuantLinear`` (``Fp8Linear``) modules: the reference path for quality checks.

    Independent of onecard's engine, so perplexity of a quantized folder can be
    compared with the float HF model through the same code.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    f = folder if isinstance(folder, ModelFolder) else open_model_folder(folder)
    present, build, stored = _quantized_reader(f, device)
    cfg = AutoConfig.for_model(**{k: v for k, v in f.config.items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    for name in sorted(present):
        parent_name, attr = name.rsplit(".", 1)
        old, new = model.get_submodule(name), build((name,))
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)  # loaded below with the rest
        setattr(model.get_submodule(parent_name), attr, new)
    state = {n: t for n, t in f.iter_tensors({n for n in f.tensors if not stored(n)})}
    missing, unexpected = model.load_state_dict(state, strict=False)
    quant_buffers = {f"{m}.{b}" for m in present for b in ("qweight", "scales", "zeros", "perm", "weight",
                                                          "weight_scale")}
    missing = [m for m in missing if m not in quant_buffers and not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelFolderError(f"'{f.path}' does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()
