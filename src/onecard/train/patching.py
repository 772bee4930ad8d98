"""Put onecard's fused kernels into a Hugging Face Llama-family model, for real.

The seed article's ``for m in model.modules(): m = X()`` rebinds a loop
variable and changes nothing (ERRATA 7). Here every change is visible on the
model afterwards:

- each ``*RMSNorm`` is replaced *in its parent* by ``FusedRMSNorm`` holding the same weight Parameter;
- each SwiGLU MLP is replaced *in its parent* by ``FusedSwiGLUMLP`` holding the same three Linear children
  (so state-dict keys, PEFT target names and checkpoints are unchanged);
- each attention module gets an instance ``forward`` that runs the class forward with the fused RoPE switched on
  (the module-level ``apply_rotary_pos_emb`` of that model file is replaced once by a dispatcher that is a no-op
  for unpatched models, so an HF reference model in the same process is untouched) and, once PEFT has wrapped
  q, k and v, with their three LoRA projections made by one Function (``lora.frozen_lora_qkv``);
- the ``*ForCausalLM`` gets an instance ``forward`` that, when labels are given, computes the loss with the chunked
  fused linear + cross-entropy and never builds the logits (without labels it is the original forward).

On CUDA tensors the Triton kernels run; elsewhere the PyTorch references of the same functions run (so CPU
training still gets the chunked loss's memory savings).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from onecard.errors import UnsupportedModelError
from onecard.kernels.fused_linear_ce import IGNORE_INDEX, fused_linear_cross_entropy
from onecard.kernels.rmsnorm import rmsnorm
from onecard.kernels.rope import rope
from onecard.kernels.swiglu import swiglu
from onecard.plan.memory import MLP_CHUNK_TOKENS
from onecard.train.checkpointing import (
    as_recomputation,
    autocast_as,
    autocast_states,
    compute_dtype,
    marked_checkpoint,
    recomputing,
)
from onecard.train.lora import frozen_lora_qkv, frozen_lora_swiglu, last_linear, precomputed_outputs

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_FUSED_ROPE = contextvars.ContextVar("onecard_fused_rope", default=False)


class FusedRMSNorm(nn.Module):
    """Drop-in for ``LlamaRMSNorm`` (same ``weight`` Parameter, same maths) backed by the fused kernel."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rmsnorm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FusedSwiGLUMLP(nn.Module):
    """Drop-in for ``LlamaMLP``: the same gate/up/down Linear children, ``silu(gate)*up`` fused.

    With gradients on and more than ``MLP_CHUNK_TOKENS`` tokens, the MLP runs over token chunks. Why: the MLP is
    per token, and at long context its intermediates dominate a layer's memory (Llama-3-8B at 96k tokens: gate,
    up and their product are 2.6 GiB each, plus what backward keeps); chunked, a layer holds one chunk's. Without
    gradients (the offloaded checkpoints' forward, evaluation) the pieces simply run one after the other.
    ``_ChunkedMLP`` keeps only the MLP's input and reruns one chunk at a time in backward, so the chunking costs
    no extra forward (a checkpoint per chunk would run gate and up a third time: in the layer's recomputation,
    then in the chunk's); under ``torch.distributed`` (FSDP2's hooks want one autograd graph) each chunk runs
    under its own non-reentrant checkpoint instead.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        act = frozen_lora_swiglu(self.gate_proj, self.up_proj, x)
        if act is None:
            act = swiglu(self.gate_proj(x), self.up_proj(x))
        return last_linear(self.down_proj, act)

    def _in_pieces(self, x: torch.Tensor, run=None) -> torch.Tensor:
        """The MLP over ``MLP_CHUNK_TOKENS``-token pieces, concatenated; ``run(fn, piece)`` wraps each call."""
        pieces = x.reshape(-1, x.shape[-1]).split(MLP_CHUNK_TOKENS)
        parts = [run(self._mlp, p) if run else self._mlp(p) for p in pieces]
        return torch.cat(parts).view(*x.shape[:-1], parts[0].shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= MLP_CHUNK_TOKENS:
            return self._mlp(x)
        if not torch.is_grad_enabled():  # e.g. offloaded checkpoints' forward: one piece's intermediates at a time
            return self._in_pieces(x)
        if x.requires_grad and not (dist.is_available() and dist.is_initialized()):
            return _ChunkedMLP.apply(x, self, compute_dtype(x))
        return self._in_pieces(x, marked_checkpoint)


class _ChunkedMLP(torch.autograd.Function):
    """A ``FusedSwiGLUMLP`` over token chunks that keeps only its input. Forward runs the chunks without autograd,
    and nothing at all inside a checkpoint's recomputation (nobody reads that output); backward reruns one chunk
    at a time with autograd (as a recomputation: the down projection skips its output) and backpropagates it,
    the chunk's parameter gradients accumulating as in a reentrant checkpoint."""

    @staticmethod
    def forward(ctx, x, mlp: FusedSwiGLUMLP, out_dtype: torch.dtype):
        ctx.save_for_backward(x)
        ctx.mlp, ctx.chunk, ctx.autocast = mlp, MLP_CHUNK_TOKENS, autocast_states()
        if recomputing():
            return x.new_empty(*x.shape[:-1], mlp.down_proj.out_features, dtype=out_dtype)
        return mlp._in_pieces(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat, g = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat)
        with torch.enable_grad(), autocast_as(ctx.autocast):
            for start in range(0, flat.shape[0], ctx.chunk):
                piece = flat[start:start + ctx.chunk].detach().requires_grad_(True)
                torch.autograd.backward(as_recomputation(ctx.mlp._mlp, piece), g[start:start + ctx.chunk])
                grad_x[start:start + ctx.chunk] = piece.grad
        return grad_x.view_as(x), None, None


@dataclass
class PatchReport:
    """What ``patch_model`` changed (counts of replaced modules / forwards)."""

    rmsnorm: int = 0
    swiglu_mlp: int = 0
    rope_attention: int = 0
    fused_cross_entropy: bool = False

    def summary(self) -> str:
        return (f"fused kernels: {self.rmsnorm} RMSNorm, {self.swiglu_mlp} SwiGLU MLP, {self.rope_attention} RoPE "
                f"attention, linear+CE {'on' if self.fused_cross_entropy else 'off'}")


def _install_rope_dispatch(module_name: str) -> None:
    """Replace ``apply_rotary_pos_emb`` in one HF modeling file by a dispatcher (once per process)."""
    mod = sys.modules[module_name]
    original = getattr(mod, "apply_rotary_pos_emb", None)
    if original is None:
        raise UnsupportedModelError(f"{module_name} has no apply_rotary_pos_emb; fused RoPE cannot be patched in")
    if getattr(original, "_onecard_dispatch", False):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = not args and kwargs.get("unsqueeze_dim", 1) == 1 and set(kwargs) <= {"unsqueeze_dim"}
        if _FUSED_ROPE.get() and plain and q.dim() == 4 and cos.dim() == 3:
            return rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._onecard_dispatch = True
    apply_rotary_pos_emb.__wrapped__ = original
    mod.apply_rotary_pos_emb = apply_rotary_pos_emb


def _fused_attention_forward(self, *args, **kwargs):
    """The class forward with the fused RoPE on and, where ``frozen_lora_qkv`` can run them, the q, k and v
    projections of ``hidden_states`` made by one Function before it (their calls inside return those outputs)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    token = _FUSED_ROPE.set(True)
    try:
        recorded = (frozen_lora_qkv(self.q_proj, self.k_proj, self.v_proj, hidden)
                    if isinstance(hidden, torch.Tensor) else None)
        with precomputed_outputs(recorded):
            return type(self).forward(self, *args, **kwargs)
    finally:
        _FUSED_ROPE.reset(token)


def _fused_ce_forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
    """CausalLM forward whose loss never materialises logits; falls back to the class forward without labels."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    num_items = kwargs.get("num_items_in_batch")
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    hidden = outputs.last_hidden_state
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
    head = self.get_output_embeddings()
    loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shifted.reshape(-1),
                                      bias=head.bias, num_items_in_batch=num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def patch_model(model: nn.Module, rmsnorm: bool = True, swiglu_mlp: bool = True, rope_attention: bool = True,
                fused_cross_entropy: bool = True) -> PatchReport:
    """Patch a transformers ``*ForCausalLM`` of a supported family in place; returns what changed.

    Call before wrapping with PEFT (PEFT then finds gate_proj/up_proj/... inside the fused MLPs as usual).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"fused training kernels support {', '.join(SUPPORTED_MODEL_TYPES)}, not "
                                    f"'{model_type}'; train with --no-fused to use the plain HF model")
    report = PatchReport()
    for name, module in list(model.named_modules()):
        cls = type(module).__name__
        if rmsnorm and cls.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            model.set_submodule(name, FusedRMSNorm(module.weight, module.variance_epsilon))
            report.rmsnorm += 1
        elif swiglu_mlp and cls.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj",
                                                                                      "down_proj")):
            if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
                continue
            model.set_submodule(name, FusedSwiGLUMLP(module.gate_proj, module.up_proj, module.down_proj))
            report.swiglu_mlp += 1
        elif rope_attention and cls.endswith("Attention") and hasattr(module, "q_proj"):
            _install_rope_dispatch(type(module).__module__)
            module.forward = types.MethodType(_fused_attention_forward, module)
            report.rope_attention += 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if fused_cross_entropy:
        if type(head) is nn.Linear and hasattr(model, "model"):
            model.forward = types.MethodType(_fused_ce_forward, model)
            report.fused_cross_entropy = True
        else:
            log.info("fused linear+CE not applied: output head is %s, not a plain Linear", type(head).__name__)
    log.info(report.summary())
    return report
