"""FSDP2 training: ``fully_shard`` on every decoder layer, then the root; sharded checkpoints through DCP.

Two ways in, one sharding:

- ``onecard train`` under torchrun goes through ``transformers.Trainer``,
  which shards with accelerate's FSDP2 plugin; ``trainer_fsdp_kwargs`` gives
  the ``TrainingArguments`` that select it (version 2, one unit per decoder
  layer, sharded checkpoints).
- ``shard_for_training_`` + ``train_step`` are the same thing spelled out with
  ``torch.distributed.fsdp.fully_shard`` directly, for the scaling benchmark
  and the tests (which compare it step by step against one process).

Sharding per decoder layer is what lets FSDP overlap: the all-gather of layer
i+1's weights runs while layer i computes, and each layer's full weights
exist only while it runs. Parameters are kept in fp32 and cast to bf16 for
compute (``MixedPrecisionPolicy``); gradients are reduced in fp32. LoRA works
unchanged: frozen and trainable parameters may share a layer's unit.

Checkpoints are DCP (``torch.distributed.checkpoint``): every rank writes its
own shards plus shared metadata, and a load re-shards to whatever process
count reads it (1 process included), so a run saved on 2 GPUs resumes on 4,
or merges on a laptop.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from onecard.errors import BadInputError, ModelFolderError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of an HF causal LM (also inside a PEFT wrapper): FSDP's units."""
    names = set(getattr(_unwrap(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise BadInputError(f"cannot find the decoder layers of {type(_unwrap(model)).__name__} to shard "
                            "(no _no_split_modules); FSDP training supports HF causal LMs such as Llama/Qwen2")
    return layers


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainer_fsdp_kwargs(model: nn.Module, gradient_checkpointing: bool) -> dict:
    """``TrainingArguments`` kwargs that make ``transformers.Trainer`` shard ``model`` with FSDP2 under torchrun.

    Activation checkpointing goes through the FSDP plugin (it wraps each layer
    before sharding) rather than HF's ``gradient_checkpointing`` flag, which
    accelerate refuses to combine with FSDP.
    """
    layer_cls = sorted({type(m).__name__ for m in decoder_layers(model)})
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "transformer_layer_cls_to_wrap": layer_cls, "reshard_after_forward": True,
        "state_dict_type": "SHARDED_STATE_DICT", "activation_checkpointing": gradient_checkpointing}}


def int4_base_as_parameters_(model: nn.Module) -> int:
    """Re-register every QLoRA ``Int4Linear``'s packed codes and scales as frozen parameters; returns how many layers.

    Why: FSDP2 shards parameters only; buffers stay whole on every rank, so
    an int4 base held in buffers would be replicated, not sharded. As frozen
    parameters they are sharded along dim 0 (output rows: whole groups of
    whole bytes) and all-gathered per layer like any weight. FSDP2 makes every
    sharded parameter a float ``nn.Parameter`` (torch 2.11 refuses uint8:
    "only Tensors of floating point dtype can require gradients"), so the codes
    travel as the *bits* of a ``compute_dtype`` tensor (what bitsandbytes'
    ``quant_storage=bf16`` does): the mixed-precision ``param_dtype`` is the
    compute dtype, so FSDP2 never casts them, and ``Int4Linear.codes`` views
    them back as uint8. Names stay ``qweight``/``scales``, so state dicts keep their keys.
    """
    from onecard.train.qlora import Int4Linear

    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    for m in layers:
        if "qweight" in m._buffers:
            codes = m._buffers.pop("qweight")
            if codes.shape[-1] % m.compute_dtype.itemsize:
                raise BadInputError(f"{m.in_features} input features do not pack into whole {m.compute_dtype} "
                                    "words; FSDP2 QLoRA needs in_features divisible by 8")
            m.register_parameter("qweight", nn.Parameter(codes.view(m.compute_dtype), requires_grad=False))
        if "scales" in m._buffers:
            m.register_parameter("scales", nn.Parameter(m._buffers.pop("scales"), requires_grad=False))
    return len(layers)


def shard_for_training_(model: nn.Module, mixed_precision: bool, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` the embedding, each decoder layer, norm + head, then the root; in place, returns ``model``.

    Call inside an initialized process group, after LoRA is added and
    activation checkpointing is enabled (HF's non-reentrant kind composes with
    FSDP2), and before the optimizer is built (it must see the sharded
    parameters). A QLoRA int4 base is sharded too (``int4_base_as_parameters_``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise BadInputError("FSDP needs a process group: launch with torchrun --nproc-per-node N")
    device = next(model.parameters()).device
    int4_base_as_parameters_(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for unit in _embedding_unit(model) + decoder_layers(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    head = _head_unit(model)
    if head:  # used first in backward, so it stays gathered after forward (torchtitan does the same)
        fully_shard(head, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def _untied(model: nn.Module) -> bool:
    inner = _unwrap(model)
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    return emb is not None and head is not None and emb.weight is not head.weight


def _embedding_unit(model: nn.Module) -> list[nn.Module]:
    """The input embedding as a unit of its own: in the root unit its all-gather (vocab x hidden, a large share of
    a model with few layers) and its gradient reduce-scatter could not overlap with any layer's compute."""
    return [_unwrap(model).get_input_embeddings()] if _untied(model) else []


def _head_unit(model: nn.Module) -> list[nn.Module]:
    """Final norm + LM head as one unit (tied heads stay in the root with the embedding they share)."""
    inner = _unwrap(model)
    norm = getattr(getattr(inner, "model", None), "norm", None)
    return ([norm] if norm is not None else []) + [inner.get_output_embeddings()] if _untied(model) else []


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               max_grad_norm: float = 1.0) -> float:
    """One optimizer step on this rank's rows; returns the loss averaged over all ranks (the global batch mean).

    Every rank must pass the same number of equally long rows, so the mean of
    the ranks' means is the global mean and FSDP's averaged gradients equal
    the single-process gradients of the whole batch.
    """
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss.detach()
    if dist.is_initialized():
        dist.all_reduce(loss)  # SUM then divide: gloo has no AVG
        loss /= dist.get_world_size()
    return loss.item()


def rank_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch (rows split evenly; a remainder is an error, not silently dropped)."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if batch.shape[0] % world:
        raise BadInputError(f"global batch of {batch.shape[0]} rows does not split over {world} processes; "
                            f"use a multiple of {world}")
    n = batch.shape[0] // world
    return batch[rank * n:(rank + 1) * n]


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write model (and optimizer) state as a DCP checkpoint folder; every rank calls this, each writes its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
    )

    int4_base_as_parameters_(model)  # a QLoRA base is saved as FSDP2 holds it (codes as float bits), whoever saves
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(path))
    return Path(path)


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a DCP checkpoint into ``model`` (sharded over any process count, or a plain model in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if not (Path(path) / ".metadata").exists():
        raise ModelFolderError(f"'{path}' is not a sharded (DCP) checkpoint: no .metadata file; "
                               "pass the folder save_sharded wrote")
    int4_base_as_parameters_(model)  # a QLoRA base was saved as FSDP2 holds it: codes as float bits
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on CPU; collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

