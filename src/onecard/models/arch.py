"""Built-in architecture configs (real models' config.json) and the scaled-down variants tests use.

The planner reads the full-size configs; tests and benchmarks build random
checkpoints from them at full size (GPU) or scaled down (CPU) with the same
shape rules: head_dim and the GQA group size are kept, layers and width shrink.
"""

from __future__ import annotations

import copy
import json
from importlib import resources

from onecard.errors import BadInputError

SIZES = ("full", "small", "tiny")
# size -> (layers, attention heads, max vocab); head_dim is kept at 64 for the scaled sizes.
_SCALE = {"small": (4, 8, 8192), "tiny": (2, 4, 2048)}
_SCALED_HEAD_DIM = 64


def builtin_archs() -> list[str]:
    files = resources.files("onecard.models").joinpath("configs").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def arch_config(name: str) -> dict:
    """The full-size HF config.json of a built-in architecture ('llama-2-7b', 'qwen2-7b', ...)."""
    key = name.lower()
    if key not in builtin_archs():
        raise BadInputError(f"unknown architecture '{name}'; built-in: {', '.join(builtin_archs())}")
    text = resources.files("onecard.models").joinpath("configs", f"{key}.json").read_text()
    return json.loads(text)


def scale_config(config: dict, size: str) -> dict:
    """Shrink a config: fewer layers/heads, head_dim 64, same MLP ratio, same rope/tie/bias options.

    GQA stays GQA: kv heads = max(1, heads // group). The full model's group is kept
    when it divides the scaled head count (Llama-3, Mistral: 4); Qwen2's groups of 7
    become 4 (tiny) or 8 (small). A test that needs the exact group passes
    ``overrides`` to ``make_random_checkpoint``.
    """
    if size not in SIZES:
        raise BadInputError(f"unknown size '{size}'; choose one of {', '.join(SIZES)}")
    cfg = copy.deepcopy(config)
    if size == "full":
        return cfg
    if "text_config" in cfg:
        cfg["text_config"] = scale_config(cfg["text_config"], size)
        v = cfg["vision_config"]
        layers, heads, _ = _SCALE[size]
        v.update(hidden_size=heads * _SCALED_HEAD_DIM, intermediate_size=4 * heads * _SCALED_HEAD_DIM,
                 num_hidden_layers=layers + 1, num_attention_heads=heads)
        cfg["text_config"]["vocab_size"] = max(cfg["text_config"]["vocab_size"], cfg["image_token_index"] + 1)
        return cfg
    layers, heads, max_vocab = _SCALE[size]
    group = cfg["num_attention_heads"] // cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    kv_heads = max(1, heads // group)
    hidden = heads * _SCALED_HEAD_DIM
    mlp_ratio = cfg["intermediate_size"] / cfg["hidden_size"]
    cfg.update(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=hidden,
        intermediate_size=int(round(hidden * mlp_ratio / 32) * 32),
        vocab_size=min(cfg["vocab_size"], max_vocab),
    )
    if "head_dim" in cfg:
        cfg["head_dim"] = _SCALED_HEAD_DIM
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = layers
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(key), int) and cfg[key] >= cfg["vocab_size"]:
            cfg[key] = {"bos_token_id": 1, "eos_token_id": 2}[key]
    return cfg
