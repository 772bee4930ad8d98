"""What the planner needs to know about a model, from its config.json alone.

The planner never reads weights: a folder holding only ``config.json``, a
full model folder, a built-in architecture name ('llama-2-7b'), a config dict
or a ``ModelArgs`` all resolve to one ``ModelSpec``. LLaVA configs resolve to
their language model plus the CLIP vision tower and projector, counted
exactly as transformers builds them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from onecard.errors import BadInputError, ModelFolderError, UnsupportedModelError
from onecard.models import ModelArgs, arch_config, builtin_archs


@dataclass(frozen=True)
class VisionTower:
    """A CLIP ViT tower (LLaVA) and the two-layer projector into the language model."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    image_size: int
    patch_size: int
    num_channels: int
    text_hidden_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def tower_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        embeddings = h + h * self.num_channels * self.patch_size**2 + (self.image_tokens + 1) * h
        per_layer = 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h)
        return embeddings + 2 * h + self.num_layers * per_layer + 2 * h  # pre- and post-layernorm

    def projector_parameters(self) -> int:
        t = self.text_hidden_size
        return self.hidden_size * t + t + t * t + t


@dataclass(frozen=True)
class ModelSpec:
    """A model as the planner sees it: the language model's shapes, an optional vision tower, its stored quantization."""

    name: str
    args: ModelArgs
    vision: VisionTower | None = None
    quantization: dict | None = None

    def num_parameters(self) -> int:
        extra = self.vision.tower_parameters() + self.vision.projector_parameters() if self.vision else 0
        return self.args.num_parameters() + extra

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, out_features, in_features) of one decoder layer's linears: the ones quantization and LoRA touch."""
        a = self.args
        return [("q_proj", a.q_size, a.hidden_size), ("k_proj", a.kv_size, a.hidden_size),
                ("v_proj", a.kv_size, a.hidden_size), ("o_proj", a.hidden_size, a.q_size),
                ("gate_proj", a.intermediate_size, a.hidden_size), ("up_proj", a.intermediate_size, a.hidden_size),
                ("down_proj", a.hidden_size, a.intermediate_size)]

    @property
    def stored_fp8(self) -> bool:
        """An fp8 checkpoint (AutoFP8's ``fp8`` or compressed-tensors): its linears load as ``Fp8Linear``."""
        return str((self.quantization or {}).get("quant_method", "")).lower() in ("fp8", "compressed-tensors")

    @property
    def stored_bits(self) -> int | None:
        """Bits of a quantized checkpoint (from its quantization_config), None for a 16-bit one."""
        q = self.quantization
        if not q:
            return None
        if self.stored_fp8:
            return 8
        if q.get("load_in_4bit") or q.get("bnb_4bit_quant_type"):
            return 4
        if q.get("load_in_8bit"):
            return 8
        bits = q.get("bits", q.get("w_bit"))
        return int(bits) if bits else None


def _text_args(cfg: dict) -> ModelArgs:
    text = dict(cfg["text_config"])
    text.setdefault("architectures", ["LlamaForCausalLM"] if text.get("model_type", "llama") == "llama" else [])
    if text.get("model_type", "llama") == "mistral":
        text["architectures"] = ["MistralForCausalLM"]
    elif text.get("model_type") == "qwen2":
        text["architectures"] = ["Qwen2ForCausalLM"]
    return ModelArgs.from_hf_config(text)


def spec_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """A ``ModelSpec`` from a config.json dict (causal LM or LLaVA)."""
    if not isinstance(cfg, dict):
        raise BadInputError(f"expected a config.json dict for '{name}', got {type(cfg).__name__}")
    quant = cfg.get("quantization_config")
    if cfg.get("model_type") == "llava" or "LlavaForConditionalGeneration" in (cfg.get("architectures") or []):
        if "text_config" not in cfg or "vision_config" not in cfg:
            raise UnsupportedModelError(f"LLaVA config '{name}' lacks text_config or vision_config; use the model's full config.json")
        args = _text_args(cfg)
        v = cfg["vision_config"]
        vision = VisionTower(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                             num_layers=v["num_hidden_layers"], image_size=v.get("image_size", 224),
                             patch_size=v.get("patch_size", 14), num_channels=v.get("num_channels", 3),
                             text_hidden_size=args.hidden_size)
        return ModelSpec(name, args, vision, quant)
    return ModelSpec(name, ModelArgs.from_hf_config(cfg), None, quant)


def resolve_model(model: "str | Path | dict | ModelArgs | ModelSpec") -> ModelSpec:
    """Accept a built-in name, a folder (config.json is enough), a config dict, ``ModelArgs`` or a ``ModelSpec``."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, ModelArgs):
        return ModelSpec(model.raw.get("_name_or_path") or model.architecture, model)
    if isinstance(model, dict):
        return spec_from_config(model, model.get("_name_or_path") or "config")
    text = str(model)
    if text.lower() in builtin_archs():
        return spec_from_config(arch_config(text), text.lower())
    path = Path(text).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        cfg_file = path
    elif path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelFolderError(f"no config.json in '{path}'; the planner needs only the model's config.json")
    else:
        raise BadInputError(f"'{model}' is neither a built-in architecture ({', '.join(builtin_archs())}) "
                            "nor a folder or config.json file; pass one of those")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ModelFolderError(f"'{cfg_file}' is not valid JSON ({exc}); copy config.json from the original model") from None
    return spec_from_config(cfg, path.name if path.is_dir() else path.stem)
