"""Validate and load a LLaVA-family folder (``LlavaForConditionalGeneration``: CLIP tower, projector, Llama LM).

Validation reads only config.json, safetensors headers and the processor
files, so every way a folder can be wrong (a text-only model, no vision
weights, no image processor settings, a tokenizer without ``<image>``) ends in
one ``ModelFolderError``/``UnsupportedModelError`` line before any weight is read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from onecard.errors import ModelFolderError, UnsupportedModelError
from onecard.models.folder import ModelFolder, open_model_folder

log = logging.getLogger(__name__)
LLAVA_ARCHITECTURES = ("LlavaForConditionalGeneration",)
# HF model_type of the text model -> the architecture name our own forward knows it by.
TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class LlavaFolder:
    """A validated LLaVA folder: the generic ``ModelFolder`` plus what image Q&A needs from the config."""

    folder: ModelFolder
    image_token_index: int
    image_size: int
    patch_size: int

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def config(self) -> dict:
        return self.folder.config


def open_llava_folder(path: str | Path) -> LlavaFolder:
    """Check ``path`` holds a complete LLaVA model + processor; raises a one-line error saying what to fix."""
    folder = open_model_folder(path, supported=None)
    cfg, p = folder.config, folder.path
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise UnsupportedModelError(
            f"'{p}' is a {archs[0]} model with no vision tower (config.json has no vision_config); "
            "`onecard vision` needs a LLaVA folder such as llava-hf/llava-1.5-7b-hf")
    if not any(a in LLAVA_ARCHITECTURES for a in archs) and cfg.get("model_type") != "llava":
        raise UnsupportedModelError(
            f"architecture {archs} in '{p}' is not supported by `onecard vision`; supported: "
            f"{', '.join(LLAVA_ARCHITECTURES)} (the transformers layout of llava-hf/* checkpoints)")
    if not any(".vision_tower." in n or n.startswith("vision_tower.") for n in folder.tensors):
        raise ModelFolderError(
            f"'{p}' has a vision_config but its safetensors hold no vision_tower weights; download the "
            "model's complete safetensors files")
    if not any("multi_modal_projector" in n for n in folder.tensors):
        raise ModelFolderError(f"'{p}' holds no multi_modal_projector weights; download the model's complete "
                               "safetensors files")
    if not (p / "preprocessor_config.json").exists() and "image_processor" not in _read_json(p / "processor_config.json"):
        raise ModelFolderError(
            f"no image processor settings (preprocessor_config.json, or processor_config.json with image_processor) in '{p}'; copy it from the "
            "original model's folder (e.g. llava-hf/llava-1.5-7b-hf)")
    image_token_index = cfg.get("image_token_index", cfg.get("image_token_id"))
    if not isinstance(image_token_index, int):
        raise ModelFolderError(f"config.json in '{p}' has no integer image_token_index; copy config.json from "
                               "the original model")
    v = cfg["vision_config"]
    return LlavaFolder(folder, image_token_index, int(v.get("image_size", 336)), int(v.get("patch_size", 14)))


def hf_text_config(text_config) -> dict:
    """A transformers text config as config.json would write it: transformers 5 moves ``rope_theta`` and
    ``rope_scaling`` into ``rope_parameters``, which onecard's ``ModelArgs`` must not silently miss."""
    d = text_config.to_dict()
    rp = d.pop("rope_parameters", None) or {}
    if "rope_theta" in rp:
        d["rope_theta"] = rp["rope_theta"]
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        d["rope_scaling"] = scaling
    return d


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def clip_image_processor(settings: dict):
    """A CLIP image processor from its settings; the PIL backend when torchvision is absent (same numbers)."""
    import importlib.util

    import transformers

    cls = transformers.CLIPImageProcessor
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        cls = transformers.CLIPImageProcessorPil
    return cls(**settings)


def load_processor(lf: LlavaFolder):
    """The folder's processor (``AutoProcessor``: CLIP image processor + tokenizer + chat template).

    Checks the tokenizer maps the image token to ``image_token_index``: a
    tokenizer from another model would put image features at the wrong places.
    """
    import warnings

    from transformers import AutoProcessor

    p = lf.path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proc = AutoProcessor.from_pretrained(str(p))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFolderError(f"could not load the image processor/tokenizer from '{p}' "
                               f"({str(exc).splitlines()[0][:200]}); copy preprocessor_config.json, "
                               "processor_config.json and the tokenizer files from the original model") from None
    if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
        raise ModelFolderError(f"'{p}' has no LlavaProcessor settings (processor_config.json); copy it from the "
                               "original model")
    image_token = getattr(proc, "image_token", "<image>")
    tid = proc.tokenizer.convert_tokens_to_ids(image_token)
    if tid != lf.image_token_index:
        raise ModelFolderError(
            f"the tokenizer in '{p}' maps {image_token!r} to {tid}, but config.json's image_token_index is "
            f"{lf.image_token_index}; copy the tokenizer files from the same model as config.json")
    return proc


def load_llava(lf: LlavaFolder, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """``LlavaForConditionalGeneration`` with the folder's weights, in ``dtype`` on ``device``.

    Callers that quantize the language model load on the CPU and stream layers
    to the GPU (``int4.py``), so a 13B model never holds its bf16 weights there.
    """
    from transformers import LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(lf.path), dtype=dtype, device_map=str(device))
    except (OSError, RuntimeError) as exc:
        raise ModelFolderError(f"transformers could not load '{lf.path}' ({str(exc).splitlines()[0][:200]}); "
                               "check that config.json and the weights come from the same model") from None
    return model.eval().requires_grad_(False)
