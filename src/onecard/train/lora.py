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
folds scale and add into one in-place ``addmm_`` on the base's output; over a frozen base, while gradients
are recorded, the layer is one ``_FrozenLoRALinear`` with its own backward; layers that share their input run
as one Function each (q/k/v: ``_FrozenLoRAQKV``, gate/up: ``_FrozenLoRASwiGLU``), their adapters stacked. Same
maths; the adapter files, merging and PEFT's API are untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from onecard.errors import BadInputError
from onecard.kernels.swiglu import lora_swiglu, lora_swiglu_grads
from onecard.train.checkpointing import compute_dtype, recomputing
from onecard.train.fp8_base import Fp8FrozenLinear
from onecard.train.qlora import Int4Linear, nf4_layers


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


def _plain_adapter(layer: nn.Module, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """The one active vanilla, unmerged adapter of a PEFT ``lora.Linear`` called without extra arguments, or None
    (then PEFT's own forward handles whatever else it is)."""
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or layer.disable_adapters or layer.merged or name not in layer.lora_A
            or name in getattr(layer, "lora_variant", {})):
        return None
    return name


def _frozen_base(layer: nn.Module, name: str) -> bool:
    """Whether ``_FrozenLoRALinear`` can run adapter ``name`` of ``layer`` (a ``_plain_adapter``): gradients are
    recorded, the base is a frozen ``Linear`` (bf16, QLoRA's int4 or fp8) and there is no dropout."""
    base = layer.base_layer
    return (torch.is_grad_enabled() and type(base) in (nn.Linear, Int4Linear, Fp8FrozenLinear)
            and not base.weight.requires_grad
            and isinstance(layer.lora_dropout[name], nn.Identity))


def _frozen_apply(layer: nn.Module, name: str, x: torch.Tensor, skip_output: bool) -> torch.Tensor:
    return _FrozenLoRALinear.apply(x.to(compute_dtype(x)), layer.base_layer, layer.lora_A[name].weight,
                                   layer.lora_B[name].weight, layer.scaling[name], skip_output)


_PRECOMPUTED = contextvars.ContextVar("onecard_lora_precomputed", default=None)  # {layer: (input, output)}


@contextlib.contextmanager
def precomputed_outputs(outputs: dict | None):
    """Within the block, a LoRA layer of ``outputs`` called on exactly its recorded input (the same tensor object)
    returns the recorded output: how ``frozen_lora_qkv``'s one Function stands in for the q, k and v calls of an
    HF attention forward without copying that forward. ``None``: nothing recorded."""
    token = _PRECOMPUTED.set(outputs)
    try:
        yield
    finally:
        _PRECOMPUTED.reset(token)


def lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT ``lora.Linear`` forward for the plain case (one active vanilla adapter, not merged): over a frozen
    base with gradients recorded, ``_FrozenLoRALinear``; otherwise the base's output with the adapter added in
    place. Anything else goes to PEFT's own forward."""
    recorded = _PRECOMPUTED.get()
    if recorded is not None and self in recorded and recorded[self][0] is x and not args and not kwargs:
        return recorded[self][1]
    name = _plain_adapter(self, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    if _frozen_base(self, name):
        return _frozen_apply(self, name, x, False)
    x2 = x.reshape(-1, x.shape[-1])
    result = self.base_layer(x2)  # 2-D, so the in-place addmm_ below is on a tensor, not a view (autograd would
    dtype = result.dtype          # route a view's in-place op through CopySlices: a full clone in backward)
    a = self.lora_A[name].weight.to(dtype)
    b = self.lora_B[name].weight.to(dtype)
    h = F.linear(self.lora_dropout[name](x2).to(dtype), a)
    # in place: an out-of-place addmm first copies ``result`` into its output (a full-activation memcpy on CUDA).
    # Not where the base returns a view made inside its own autograd Function (torchao's Float8Linear), which
    # autograd forbids modifying in place.
    add = torch.addmm if result._is_view() else torch.Tensor.addmm_
    return add(result, h, b.t(), alpha=self.scaling[name]).view(*x.shape[:-1], result.shape[-1])


def last_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for the last linear of a checkpointed decoder layer (the MLP's down projection).

    A LoRA layer over a frozen ``Linear`` (bf16 or QLoRA's int4) goes through ``_FrozenLoRALinear``; inside a
    checkpoint's recomputation (``recomputing()``) it does not compute its output, which backward never reads.
    Anything else is ``layer(x)``."""
    from peft.tuners.lora import Linear as LoraLinear

    name = _plain_adapter(layer) if type(layer) is LoraLinear else None
    if name is None or not _frozen_base(layer, name):
        return layer(x)
    return _frozen_apply(layer, name, x, recomputing())


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A frozen base's weight as a dense ``dtype`` matrix (an int4 base dequantizes, transiently)."""
    return base.dequantized_weight().to(dtype) if isinstance(base, Int4Linear) else base.weight.to(dtype)


_GENERATION = 0  # bumped by every forward of a model with the lean forward (``use_lean_lora_forward_``)
_COPIES = WeakIdKeyDictionary()  # parameter -> (key, copy); by identity, so a deep copy of a model starts empty


def _next_generation(module: nn.Module, args: tuple) -> None:
    global _GENERATION
    _GENERATION += 1


def _compute_copy(p: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``p * scale`` in ``dtype`` (an adapter's fp32 master in the activations' dtype), made once per forward pass
    and reused by its recomputation and backward.

    Why: a cast per use was ~1,300 of the ~7,400 kernels of a Llama-3-8B LoRA step (forward, recomputation and
    backward each cast both factors of every adapter), and at bs 1 the step time is the host's launch time. The
    copy is remade when the model runs forward again (FSDP2 refills unsharded parameters without an in-place op)
    or the parameter changed in place (an optimizer step or an init bumps its version counter).
    """
    key = (_GENERATION, p._version, dtype, scale)
    return _reused(_COPIES, p, key, lambda: (p.detach() * scale if scale != 1.0 else p.detach()).to(dtype))


_STACKS = WeakIdKeyDictionary()  # first factor -> (key, stacked copy), as _COPIES


def _stacked_copy(ps: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """``cat(ps)`` in ``dtype`` (several adapters' A masters stacked along their rank), made and reused as
    ``_compute_copy`` makes and reuses one factor's copy."""
    key = (_GENERATION, dtype) + tuple((id(p), p._version) for p in ps)
    return _reused(_STACKS, ps[0], key, lambda: torch.cat([p.detach().to(dtype) for p in ps]))


def _reused(cache: WeakIdKeyDictionary, owner: torch.Tensor, key: tuple, make) -> torch.Tensor:
    """``cache``'s copy for ``owner`` while its ``key`` is unchanged, else ``make()``, kept under the new key."""
    cached = cache.get(owner)
    if cached is not None and cached[0] == key:
        return cached[1]
    copy = make()
    cache[owner] = (key, copy)
    return copy


def _adapter_grads(gs: list[torch.Tensor], gbs: torch.Tensor, x2: torch.Tensor, h: torch.Tensor, ranks: list[int],
                   scalings: list[float], dtypes: list[torch.dtype], needs: tuple[bool, ...]) -> list:
    """A's and B's gradients (A_0, B_0, A_1, ...; None where not needed, in their masters' dtypes) of adapters
    that share the input ``x2``, stacked along their ranks: output gradients ``gs``, ``gbs = [g_i s_i B_i]`` and
    ``h = x2 [A_i]^T`` side by side. The A gradients are one product, so ``x2`` is read once for all of them."""
    need_a, need_b = needs[0::2], needs[1::2]
    grads_a = (gbs.t() @ x2).split(ranks) if any(need_a) else [None] * len(ranks)
    grads = []
    for i, (g, h_i) in enumerate(zip(gs, h.split(ranks, dim=1))):
        grads.append(grads_a[i].to(dtypes[2 * i]) if need_a[i] else None)
        grads.append((g.t() @ h_i).mul_(scalings[i]).to(dtypes[2 * i + 1]) if need_b[i] else None)
    return grads


def _dense_output(x2: torch.Tensor, h: torch.Tensor, bs_c: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """``x2 W^T + b + h (s B)^T`` over a frozen dense (or int4) base: the rank-r product (and bias) written first
    and the base's GEMM accumulating onto it (``addmm_``, beta = 1)."""
    dtype = x2.dtype
    out = h @ bs_c.t()
    if base.bias is not None:
        out += base.bias.to(dtype)
    return out.addmm_(x2, _dense_weight(base, dtype).t())


def _input_grad(gbs: torch.Tensor, a_c: torch.Tensor, terms) -> torch.Tensor:
    """``gbs a_c + sum_i g_i W_i`` for ``terms`` of ``(g_i, W_i)``: the rank-r share written first and each base's
    GEMM accumulating onto it (``addmm_``, beta = 1), where adding a finished rank-r product after the GEMM is one
    more full read and write of the gradient."""
    grad_x = gbs @ a_c
    for g, w in terms:
        grad_x.addmm_(g, w)
    return grad_x


class _FrozenLoRALinear(torch.autograd.Function):
    """``base(x) + s (x A^T) B^T`` with the base frozen; saves x and x A^T (the base is read again in backward).

    Why its own backward: autograd would run the base's and the adapter's input gradients as two full-size
    products and add them in a third kernel (elementwise adds were ~8 % of a Llama-3-8B LoRA step's GPU time,
    dev profile on an H100). Here, forward and backward alike, the rank-r product is written first and the base's
    GEMM accumulates onto it (``addmm_``, beta = 1): its epilogue reads the addend while the GEMM's math hides the
    traffic, where adding the rank-r product after the GEMM is one more full read and write of the output.
    """

    @staticmethod
    def forward(ctx, x, base, a, b, scaling: float, skip_output: bool):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a_c, bs_c = _compute_copy(a, dtype), _compute_copy(b, dtype, scaling)  # A and s B in x's dtype
        h = x2 @ a_c.t()
        ctx.save_for_backward(x2, h)
        # the copies ride on ctx, not through save_for_backward: a checkpoint's hooks would drop and remake them
        ctx.a_c, ctx.bs_c, ctx.dtypes = a_c, bs_c, (a.dtype, b.dtype)
        ctx.base, ctx.scaling, ctx.x_shape = base, scaling, x.shape
        if skip_output:  # a recomputation: nothing reads the output
            return x.new_empty(*x.shape[:-1], base.out_features)
        if isinstance(base, Fp8FrozenLinear):  # _scaled_mm takes no addend: the rank-r product goes onto its output
            out = base.matmul(x2).to(dtype).addmm_(h, bs_c.t())
            if base.bias is not None:
                out += base.bias.to(dtype)
            return out.view(*x.shape[:-1], -1)
        return _dense_output(x2, h, bs_c, base).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x2, h = ctx.saved_tensors
        dtype = x2.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        gbs = g @ ctx.bs_c  # (tokens, r): s g B
        grad_x = None
        if ctx.needs_input_grad[0]:
            if isinstance(ctx.base, Fp8FrozenLinear):
                grad_x = ctx.base.input_grad(g).to(dtype).addmm_(gbs, ctx.a_c)
            else:
                grad_x = _input_grad(gbs, ctx.a_c, [(g, _dense_weight(ctx.base, dtype))])
            grad_x = grad_x.view(ctx.x_shape)
        grad_a, grad_b = _adapter_grads([g], gbs, x2, h, [h.shape[1]], [ctx.scaling], ctx.dtypes,
                                        ctx.needs_input_grad[2:4])
        return grad_x, None, grad_a, grad_b, None, None


def _stacked_h(ctx, x: torch.Tensor, bases: tuple, factors: tuple,
               scalings: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x2, x2 [A_0; A_1; ...]^T)`` with ``x2`` the 2-D ``x``, for ``factors`` ``(A_0, B_0, A_1, ...)`` over
    ``bases`` sharing the input: one read of it, not one per adapter. Keeps on ctx what the stacked backward needs
    (the copies ride on ctx, not through save_for_backward: a checkpoint's hooks would drop and remake them)."""
    x2 = x.reshape(-1, x.shape[-1])
    dtype = x2.dtype
    ctx.bases, ctx.x_shape = bases, x.shape
    ctx.a_cat = _stacked_copy(factors[0::2], dtype)
    ctx.bs_c = [_compute_copy(b, dtype, s) for b, s in zip(factors[1::2], scalings)]  # s B in x's dtype
    ctx.ranks, ctx.scalings, ctx.dtypes = [a.shape[0] for a in factors[0::2]], scalings, [f.dtype for f in factors]
    return x2, x2 @ ctx.a_cat.t()


def _stacked_backward(ctx, gs: list[torch.Tensor], x2: torch.Tensor, h: torch.Tensor) -> tuple:
    """The input gradient (one tensor; None if not needed) and every factor's gradient of adapters made by
    ``_stacked_h``, from their output gradients ``gs``."""
    gbs = torch.cat([g @ bs for g, bs in zip(gs, ctx.bs_c)], dim=1)  # (tokens, sum of ranks): s g B, stacked
    grad_x = None
    if ctx.needs_input_grad[0]:
        weights = [_dense_weight(base, x2.dtype) for base in ctx.bases]
        grad_x = _input_grad(gbs, ctx.a_cat, zip(gs, weights)).view(ctx.x_shape)
    needs = ctx.needs_input_grad[-len(ctx.dtypes):]
    return grad_x, _adapter_grads(gs, gbs, x2, h, ctx.ranks, ctx.scalings, ctx.dtypes, needs)


class _FrozenLoRASwiGLU(torch.autograd.Function):
    """``silu(gate(x)) * up(x)`` for LoRA gate and up projections over frozen dense bases, as one Function.

    Why not two ``_FrozenLoRALinear``: there each base GEMM accumulates onto its rank-r product (``addmm_``, beta
    = 1), and cuBLAS's accumulating kernels are ~11 % slower than its plain ones on the gate/up shapes (H100:
    1,355 against 1,218 µs for 8192 x 4096 x 14336, docs/training.md). Here both bases run plain, and the rank-r
    products ``h (s B)^T`` are added tile by tile inside the SwiGLU kernel, which reads the base outputs anyway;
    backward recomputes them there too. Both adapters' ``x A^T``, input-gradient shares and A gradients are one
    product each (``_stacked_h``, ``_stacked_backward``), and the input gradient sums both projections in one
    tensor, so autograd no longer adds two. Saves x, both base outputs and the stacked ``h`` (the unfused path
    saves x, both ``h``, gate and up: the same bytes).
    """

    @staticmethod
    def forward(ctx, x, bases, scalings, *factors):  # factors: A_gate, B_gate, A_up, B_up
        x2, h = _stacked_h(ctx, x, bases, factors, scalings)
        yg, yu = (x2 @ _dense_weight(base, x2.dtype).t() for base in bases)
        out = lora_swiglu(yg, yu, *h.split(ctx.ranks, dim=1), *ctx.bs_c)
        ctx.save_for_backward(x2, h, yg, yu)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x2, h, yg, yu = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        dg, du = lora_swiglu_grads(dy, yg, yu, *h.split(ctx.ranks, dim=1), *ctx.bs_c)
        grad_x, factor_grads = _stacked_backward(ctx, [dg, du], x2, h)
        return grad_x, None, None, *factor_grads


class _FrozenLoRAQKV(torch.autograd.Function):
    """The q, k and v projections of one input, LoRA over frozen dense bases, as one Function.

    Why: as three ``_FrozenLoRALinear`` each reads the input again for its ``x A^T`` (forward and recomputation)
    and for A's gradient, each writes a full-width input gradient, and autograd adds the three (two more full
    reads and a write). Here ``x [A_q; A_k; A_v]^T`` is one product, A's gradients one ``(g s B)^T x``, and the
    input gradient one tensor: the stacked rank-r terms first, then each base's GEMM accumulating onto it.
    Saves ``x`` and the stacked ``x A^T``, as the three Functions together did.
    """

    @staticmethod
    def forward(ctx, x, bases, scalings, *factors):  # factors: A_q, B_q, A_k, B_k, A_v, B_v
        x2, h = _stacked_h(ctx, x, bases, factors, scalings)
        outs = [_dense_output(x2, h_i, bs, base).view(*x.shape[:-1], -1)
                for base, h_i, bs in zip(bases, h.split(ctx.ranks, dim=1), ctx.bs_c)]
        ctx.save_for_backward(x2, h)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x2, h = ctx.saved_tensors
        gs = [g.reshape(-1, g.shape[-1]).to(x2.dtype) for g in grad_outs]
        grad_x, factor_grads = _stacked_backward(ctx, gs, x2, h)
        return grad_x, None, None, *factor_grads


def _fused_adapters(layers: tuple[nn.Module, ...]) -> list[str] | None:
    """The adapter names of ``layers`` if one fused frozen-base Function can run them all (each a PEFT LoRA
    layer with one plain adapter over a frozen dense ``Linear``, gradients recorded, one process), else None."""
    from peft.tuners.lora import Linear as LoraLinear

    if any(type(m) is not LoraLinear for m in layers) or (dist.is_available() and dist.is_initialized()):
        return None
    names = [_plain_adapter(m) for m in layers]
    if any(n is None or not _frozen_base(m, n) or type(m.base_layer) is not nn.Linear for m, n in zip(layers, names)):
        return None
    return names


def _apply_stacked(fn, layers: tuple[nn.Module, ...], names: list[str], x: torch.Tensor):
    """``fn`` (a stacked frozen-base Function) over ``layers``' bases, scalings and adapter factors."""
    factors = [f for m, n in zip(layers, names) for f in (m.lora_A[n].weight, m.lora_B[n].weight)]
    return fn.apply(x.to(compute_dtype(x)), tuple(m.base_layer for m in layers),
                    tuple(m.scaling[n] for m, n in zip(layers, names)), *factors)


def frozen_lora_qkv(q: nn.Module, k: nn.Module, v: nn.Module, x: torch.Tensor) -> dict | None:
    """The q, k and v LoRA layers' outputs for ``x`` from one ``_FrozenLoRAQKV``, as ``{layer: (x, output)}`` for
    ``precomputed_outputs``; None where the Function cannot run them (then each layer runs on its own)."""
    layers = (q, k, v)
    names = _fused_adapters(layers)
    if names is None:
        return None
    return dict(zip(layers, ((x, out) for out in _apply_stacked(_FrozenLoRAQKV, layers, names, x))))


def frozen_lora_swiglu(gate: nn.Module, up: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate(x)) * up(x)`` through ``_FrozenLoRASwiGLU`` where both are PEFT LoRA layers it can run (one
    plain adapter each of one rank, over a frozen bias-free bf16/fp32 ``Linear``, gradients recorded, one
    process); None otherwise (the caller runs the two layers and ``swiglu``)."""
    layers = (gate, up)
    names = _fused_adapters(layers)
    if (names is None or any(m.base_layer.bias is not None for m in layers)
            or gate.lora_A[names[0]].weight.shape[0] != up.lora_A[names[1]].weight.shape[0]):
        return None
    return _apply_stacked(_FrozenLoRASwiGLU, layers, names, x)


def use_lean_lora_forward_(model: nn.Module) -> int:
    """Give every PEFT LoRA ``Linear`` of ``model`` the lean forward (an instance attribute, as ``patching`` does
    for attention); returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(lean_lora_forward, module)
            n += 1
    if n:
        model.register_forward_pre_hook(_next_generation)  # the adapters' cached copies live one forward pass
    return n


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; int4, NF4 and fp8 bases count their logical weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, (Int4Linear, Fp8FrozenLinear)))
    # bitsandbytes' 4-bit weights are parameters holding two codes a byte
    total += sum(m.in_features * m.out_features - m.weight.numel() for m in nf4_layers(model))
    return trainable, total
