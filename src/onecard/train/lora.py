"""PEFT LoRA on a (possibly patched, possibly int4) model, with target names checked first.

PEFT's own error for a target that matches nothing is a multi-line ValueError
after the model is loaded; we check the names against the model's linear
layers up front and say which names exist.
"""

from __future__ import annotations

import torch
from torch import nn

from onecard.errors import BadInputError


def linear_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the model's linear layers, in model order (e.g. q_proj, ..., down_proj, lm_head)."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            seen.setdefault(name.rpartition(".")[2], None)
    return list(seen)


def resolve_targets(model: nn.Module, targets: str | list[str]) -> str | list[str]:
    """``all-linear`` (PEFT: every linear but the output head) or a comma list of leaf names, each checked."""
    if isinstance(targets, str):
        if targets.strip() == "all-linear":
            return "all-linear"
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise BadInputError("--lora-targets is empty; use all-linear or names like q_proj,v_proj")
    available = linear_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise BadInputError(f"--lora-targets {','.join(missing)} match no linear layer; this model has: "
                            f"{','.join(available)} (or use all-linear)")
    return list(targets)


def add_lora(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
             targets: str | list[str] = "all-linear", seed: int | None = None) -> nn.Module:
    """Wrap ``model`` with a PEFT LoRA adapter (base frozen); returns the ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise BadInputError(f"--lora-r must be >= 1, got {r}")
    if alpha <= 0:
        raise BadInputError(f"--lora-alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise BadInputError(f"--lora-dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=resolve_targets(model, targets),
                        bias="none", task_type="CAUSAL_LM")
    if seed is not None:
        torch.manual_seed(seed)
    return get_peft_model(model, config)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; int4 bases count their logical weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    from onecard.train.qlora import Int4Linear

    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear))
    return trainable, total
