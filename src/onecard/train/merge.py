"""``--merge``: fold a LoRA / QLoRA adapter into the original weights and write a plain HF model folder.

The merged folder has config.json, safetensors and tokenizer files and no PEFT
or onecard-specific parts, so ``onecard quantize``, the engine and transformers
load it like any checkpoint. Merging always happens on the *original*
full-precision base read fresh from disk (on CPU, in the base's own dtype): a
QLoRA adapter learned against the int4 base is merged into the bf16/fp32
weights, the standard QLoRA practice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from onecard.errors import BadInputError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja", "generation_config.json")


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: torch.dtype | None = None) -> Path:
    """Merge ``adapter_dir`` into ``base_dir``; write ``out_dir`` (must not hold a model already)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from onecard.models import open_model_folder

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise BadInputError(f"'{adapter_dir}' is not a LoRA adapter folder (no adapter_config.json)")
    if (out_dir / "config.json").exists():
        raise BadInputError(f"'{out_dir}' already holds a model; remove it or choose another folder for the merge")
    folder = open_model_folder(base_dir)
    if dtype is None:
        name = folder.config.get("torch_dtype") or folder.config.get("dtype") or "float32"
        dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, device_map={"": "cpu"})
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    for name in _TOKENIZER_FILES:
        src = base_dir / name
        if src.exists() and not (tmp / name).exists():
            shutil.copy(src, tmp / name)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.replace(out_dir) if not out_dir.exists() else _move_into(tmp, out_dir)
    return out_dir


def _move_into(tmp: Path, out_dir: Path) -> None:
    for p in tmp.iterdir():
        p.replace(out_dir / p.name)
    tmp.rmdir()
