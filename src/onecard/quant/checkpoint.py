"""Write and read quantized model folders (safetensors + config), atomically.

A run writes into a hidden temporary folder beside the destination and renames
it into place only when every file is complete, so an interrupted run never
leaves a folder that looks like a valid checkpoint.

``config.json`` gets the ``quantization_config`` transformers reads
(``quant_method`` "gptq" with ``checkpoint_format`` "gptq", or "awq" with
``version`` "gemm"); GPTQ folders also get AutoGPTQ's ``quantize_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from onecard.errors import BadInputError, UnsupportedModelError
from onecard.models.folder import ModelFolder
from onecard.quant.packing import from_awq, from_gptq
from onecard.quant.rtn import QuantizedWeight

SHARD_BYTES = 4 * 2**30
_WEIGHT_FILES = ("model.safetensors.index.json",)
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclass(frozen=True)
class QuantFormat:
    """The parts of ``quantization_config`` onecard needs to read a checkpoint."""

    method: str       # "gptq" | "awq"
    bits: int
    group_size: int
    sym: bool
    desc_act: bool

    @classmethod
    def from_config(cls, qc: dict) -> "QuantFormat":
        method = str(qc.get("quant_method", "")).lower()
        bits, gs = int(qc.get("bits", qc.get("w_bit", 0))), int(qc.get("group_size", qc.get("q_group_size", 0)))
        if method == "gptq":
            fmt = qc.get("checkpoint_format", "gptq")
            if fmt != "gptq":
                raise UnsupportedModelError(f"GPTQ checkpoint_format '{fmt}' is not supported; onecard reads 'gptq' (v1)")
        elif method == "awq":
            if str(qc.get("version", "gemm")).lower() != "gemm":
                raise UnsupportedModelError(f"AWQ version '{qc.get('version')}' is not supported; onecard reads 'gemm'")
        else:
            raise UnsupportedModelError(f"quant_method '{method}' is not supported; onecard reads gptq and awq "
                                        "checkpoints (for fp8, load the 16-bit model with quantization='fp8')")
        if bits not in (4, 8) or (method == "awq" and bits != 4):
            raise UnsupportedModelError(f"{method} {bits}-bit checkpoints are not supported; onecard runs 4-bit (and 8-bit GPTQ)")
        if gs not in (32, 64, 128, -1):
            raise UnsupportedModelError(f"group size {gs} is not supported; onecard runs 32, 64, 128 or -1")
        return cls(method, bits, gs, bool(qc.get("sym", method == "gptq")), bool(qc.get("desc_act", False)))


def quantization_config(method: str, bits: int, group_size: int, sym: bool, act_order: bool,
                        damp_percent: float) -> dict:
    if method == "fp8":  # compressed-tensors, as llm-compressor writes "FP8-dynamic" (vLLM reads it too)
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                "dynamic": False},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                          "dynamic": True}}}}
    if method == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
            "damp_percent": damp_percent, "true_sequential": True, "static_groups": False,
            "checkpoint_format": "gptq", "model_file_base_name": "model"}


def check_out_dir(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse before any work: writing over the source, or into a non-empty folder without ``overwrite``."""
    out, source = Path(out).expanduser().resolve(), Path(source).expanduser().resolve()
    if out == source or source in out.parents:
        raise BadInputError(f"--out '{out}' is (inside) the source model folder; choose a new folder")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out '{out}' is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BadInputError(f"--out '{out}' exists and is not empty; choose a new folder or pass --overwrite")


def write_checkpoint(out: Path, source: ModelFolder, tensors: dict[str, torch.Tensor], qconfig: dict,
                     overwrite: bool = False) -> Path:
    """Write ``tensors`` + configs + tokenizer files to ``out`` via a temp folder and one rename."""
    from safetensors.torch import save_file

    out = Path(out).expanduser().resolve()
    check_out_dir(out, source.path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in source.path.iterdir():  # tokenizer, generation config, chat template, README...
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", *_WEIGHT_FILES) \
                    and not f.name.startswith("onecard_"):
                shutil.copy2(f, tmp / f.name)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            t = tensors[name].detach().to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        meta = {"format": "pt", "quantized_by": "onecard"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = dict(source.config)
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if qconfig["quant_method"] == "gptq":
            (tmp / "quantize_config.json").write_text(json.dumps(
                {k: v for k, v in qconfig.items() if k != "quant_method"} | {"quant_method": "gptq"}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def quantized_modules(folder: ModelFolder) -> list[str]:
    """Module names (``model.layers.0.self_attn.q_proj``...) that hold quantized weights."""
    return sorted(n[: -len(".qweight")] for n in folder.tensors if n.endswith(".qweight"))


def read_quantized(folder: ModelFolder, fmt: QuantFormat, module: str, device: str = "cpu") -> QuantizedWeight:
    """One module's quantized weight from a GPTQ or AWQ folder."""
    from safetensors import safe_open

    def get(suffix: str) -> torch.Tensor | None:
        info = folder.tensors.get(f"{module}.{suffix}")
        if info is None:
            return None
        with safe_open(str(info.file), framework="pt", device=device) as f:
            return f.get_tensor(info.name)

    qweight, qzeros, scales = get("qweight"), get("qzeros"), get("scales")
    if qzeros is None or scales is None:
        raise UnsupportedModelError(f"'{module}' has a qweight but no qzeros/scales in '{folder.path}'; "
                                    "the checkpoint is incomplete")
    if fmt.method == "awq":
        return from_awq(qweight, qzeros, scales, fmt.group_size)
    return from_gptq(qweight, qzeros, scales, get("g_idx"), fmt.bits, fmt.group_size)
