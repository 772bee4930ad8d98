"""PEFT LoRA on a (possibly patched, possibly int4) model, with target names checked first.

PEFT's own error for a target that matches nothing is a multi-line ValueError
after the model is loaded; we check the names against the model's linear
layers up front and say which names exist.

Each LoRA layer also gets a leaner forward (``lean_lora_forward``). PEFT keeps
the adapter weights in fp32 and casts the *activations* to fp32 before the
adapter, which under bf16 autocast are cast straight back: two copies of the
layer input, a scale and an add for every adapted linear, forward and
recomputation alike (a quarter of the GPU time of a Llama-3-8B LoRA step at
seq 2048 was such copies and elementwise kernels, seen in a dev-only
torch.profiler run on an H200). The lean forward casts the small fp32 *weights*
to the activation dtype instead (gradients still reach the fp32 masters) and
folds scale and add into one ``addmm``. Same maths; the adapter files, merging
and PEFT's API are untouched.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
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
    peft_model = get_peft_model(model, config)
    use_lean_lora_forward_(peft_model)
    return peft_model


def lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT ``lora.Linear`` forward for the plain case (one active vanilla adapter, not merged); anything else
    goes to PEFT's own forward."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or name in getattr(self, "lora_variant", {})):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    a = self.lora_A[name].weight.to(dtype)
    b = self.lora_B[name].weight.to(dtype)
    h = F.linear(self.lora_dropout[name](x).to(dtype), a)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape)


def use_lean_lora_forward_(model: nn.Module) -> int:
    """Give every PEFT LoRA ``Linear`` of ``model`` the lean forward (an instance attribute, as ``patching`` does
    for attention); returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(lean_lora_forward, module)
            n += 1
    return n


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; int4 bases count their logical weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    from onecard.train.qlora import Int4Linear

    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear))
    return trainable, total
