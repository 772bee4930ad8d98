"""fp8 checkpoints for ``Fp8Linear``: compressed-tensors ``float-quantized`` (what llm-compressor writes, the
"FP8-dynamic" models) and AutoFP8's ``quant_method: fp8`` (what vLLM reads as "fp8").

Both store a quantized linear as ``<module>.weight`` (float8 e4m3, ``[out, in]``) and ``<module>.weight_scale``:
one per output channel (``[out, 1]``, compressed-tensors' "channel" strategy) or one for the whole tensor. A tensor
scale is given to every channel, so q/k/v and gate/up fuse exactly (their rows and scales stacked). Activations are
always quantized per token at run time (``Fp8Linear``): a checkpoint's static ``input_scale`` (one calibrated scale
for every token) or its choice of 16-bit activations (weight-only fp8) is not followed, and loading says so once.
Block-wise fp8 (``weight_block_size``, DeepSeek-style scales) is not read.
"""

from __future__ import annotations

import logging

import torch

from onecard.errors import ModelFolderError, NotBuiltYetError, UnsupportedModelError
from onecard.models.folder import ModelFolder
from onecard.quant.fp8 import Fp8Linear

log = logging.getLogger(__name__)
SCALE_SUFFIXES = (".weight_scale", ".input_scale")


def fp8_checkpoint_format(qc: dict | None) -> str | None:
    """``"compressed-tensors"`` or ``"fp8"`` for an fp8 checkpoint onecard reads, None for anything else; fp8
    variants it does not read raise with the way out."""
    method = str((qc or {}).get("quant_method", "")).lower()
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise NotBuiltYetError(f"block-wise fp8 checkpoints (weight_block_size {qc['weight_block_size']}) are not "
                                   "read yet; load the 16-bit model with quantization='fp8'")
        return "fp8"
    if method != "compressed-tensors":
        return None
    weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
    ok = qc.get("format") == "float-quantized" and weights and all(
        w.get("type") == "float" and int(w.get("num_bits", 0)) == 8 and w.get("strategy") in ("channel", "tensor")
        for w in weights)
    if not ok:
        raise UnsupportedModelError(f"this compressed-tensors checkpoint (format {qc.get('format')!r}, weights "
                                    f"{weights[:1]}) is not one onecard reads: it reads fp8 weights scaled per channel "
                                    "or per tensor ('float-quantized'); load the 16-bit model with quantization='fp8'")
    return "compressed-tensors"


def fp8_modules(folder: ModelFolder) -> set[str]:
    """Module names whose ``weight`` is stored in float8 e4m3 with a ``weight_scale`` beside it."""
    mods = set()
    for name, info in folder.tensors.items():
        if name.endswith(".weight") and info.dtype.startswith("float8"):
            module = name[: -len(".weight")]
            if info.dtype != "float8_e4m3fn":
                raise UnsupportedModelError(f"'{name}' is {info.dtype}; onecard's fp8 kernels read float8_e4m3fn")
            if f"{module}.weight_scale" not in folder.tensors:
                raise ModelFolderError(f"'{name}' is fp8 but '{module}.weight_scale' is missing in '{folder.path}'")
            mods.add(module)
    return mods


def note_activation_scheme(folder: ModelFolder, fmt: str) -> None:
    """Say once when the checkpoint asks for activations onecard does not compute (it always scales per token)."""
    qc = folder.quantization_config
    if fmt == "fp8":
        static = qc.get("activation_scheme", "dynamic") != "dynamic"
        weight_only = False
    else:
        acts = [g.get("input_activations") for g in qc["config_groups"].values()]
        static = any(a and not a.get("dynamic", False) for a in acts)
        weight_only = any(a is None for a in acts)
    if static or weight_only:
        log.warning("'%s' asks for %s activations; onecard quantizes activations to fp8 per token at run time "
                    "(its static input_scale, if any, is not used)", folder.path,
                    "16-bit" if weight_only else "statically scaled fp8")


def fused_fp8_linear(folder: ModelFolder, names: tuple[str, ...], device: torch.device | str) -> Fp8Linear:
    """One ``Fp8Linear`` holding the HF modules ``names`` stacked along the output (q/k/v, gate/up)."""
    tensors = dict(folder.iter_tensors({f"{n}.{s}" for n in names for s in ("weight", "weight_scale")}, device="cpu"))
    codes, scales = [], []
    for n in names:
        w = tensors[f"{n}.weight"]
        s = tensors[f"{n}.weight_scale"].float().reshape(-1)
        if s.numel() not in (1, w.shape[0]):
            raise UnsupportedModelError(f"'{n}.weight_scale' has {s.numel()} values for {w.shape[0]} output channels; "
                                        "onecard reads one per channel or one per tensor")
        codes.append(w)
        scales.append(s.expand(w.shape[0]))
    w = torch.cat(codes)
    mod = Fp8Linear(w.shape[1], w.shape[0], device=device)
    mod.weight = w.to(device)
    mod.weight_scale = torch.cat(scales)[None].contiguous().to(device)
    return mod
