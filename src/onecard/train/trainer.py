"""The training recipe: one local HF model folder + local data -> LoRA adapter / QLoRA adapter / full model.

Built on ``transformers.Trainer`` and PEFT so users' habits carry over
(checkpoint-N folders, ``--resume``, TrainingArguments semantics). What onecard
adds: fused kernels patched in for real (``patching.py``), document-aware
packing (``data.py``), int4 QLoRA base (``qlora.py``), CPU-offloaded
checkpoints (``checkpointing.py``), precision chosen from the card (bf16 where
supported, fp16 only with the GradScaler that Trainer adds for ``fp16=True``,
never a scaler for bf16), gradient clipping on by default, eval perplexity,
and one-line errors for every bad input.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from onecard.dist.launch import DistEnv
from onecard.errors import BadInputError, MissingExtraError, NotBuiltYetError
from onecard.monitor.allocator import user_alloc_conf
from onecard.train.callbacks import (LossHistoryCallback, RichProgressCallback, eval_perplexity, last_checkpoint,
                                     peak_gib)
from onecard.train.oom import RunShape, oom_advice, oom_guard, plan_shape
from onecard.train.qlora import QLORA_QUANTS

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8")
OPTIMIZERS = ("auto", "adamw", "adamw_8bit", "paged_adamw_8bit")
RUN_FILE = "onecard_train.json"


@dataclass
class TrainConfig:
    """Everything one training run needs; validated at construction (bad values fail before any loading)."""

    model: str | Path
    data: str | Path
    method: str = "lora"
    out: str | Path | None = None
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1
    lr: float | None = None
    warmup_steps: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    qlora_group_size: int = 64
    qlora_quant: str = "int4"
    eval_steps: int = 50
    val_fraction: float = 0.05
    max_eval_rows: int = 256
    logging_steps: int = 10
    save_steps: int = 200
    bad_lines: str = "stop"
    resume: bool = False
    merge: bool = False
    fused: bool = True
    gradient_checkpointing: bool = True
    offload_checkpoints: bool = False
    precision: str = "auto"
    max_grad_norm: float = 1.0
    optimizer: str = "auto"
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        self.data = Path(self.data)
        if self.method not in METHODS:
            raise BadInputError(f"--method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")
        if self.optimizer not in OPTIMIZERS:
            raise BadInputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not '{self.optimizer}'")
        for name in ("seq_len", "batch_size", "grad_accum", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise BadInputError(f"--seq-len {self.seq_len} is too short to train on; use at least 8")
        if self.max_steps == 0 or self.max_steps < -1:
            raise BadInputError(f"--max-steps must be >= 1 (or unset), got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise BadInputError(f"--epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise BadInputError(f"--lr must be in (0, 1), got {self.lr}")
        if self.max_grad_norm < 0:
            raise BadInputError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.max_eval_rows < 1:
            raise BadInputError(f"max_eval_rows must be >= 1, got {self.max_eval_rows}")
        if self.eval_steps < 0:
            raise BadInputError(f"--eval-steps must be >= 0 (0 disables evaluation), got {self.eval_steps}")
        if self.merge and self.method == "full":
            raise BadInputError("--merge applies to LoRA/QLoRA adapters; a full fine-tune already writes a model")
        if self.qlora_quant not in QLORA_QUANTS:
            raise BadInputError(f"--qlora-quant must be one of {', '.join(QLORA_QUANTS)}, not '{self.qlora_quant}'")
        if self.qlora_quant != "int4" and self.method != "qlora":
            raise BadInputError(f"--qlora-quant {self.qlora_quant} picks a QLoRA base; use it with --method qlora")
        if self.qlora_quant == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            raise MissingExtraError("--qlora-quant nf4 needs bitsandbytes, which is not installed: pip install "
                                    "'onecard[bnb]', or use --qlora-quant int4 (onecard's own base, no extra)")
        if self.precision == "fp8" and self.method == "qlora":
            raise BadInputError("--precision fp8 swaps bf16 linears for float8 ones; a QLoRA base is int4 or NF4: "
                                "use --method lora with fp8, or --precision bf16 with qlora")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise BadInputError("--offload-checkpoints needs gradient checkpointing; drop --no-gradient-checkpointing")
        if self.lr is None:
            self.lr = 2e-5 if self.method == "full" else 2e-4
        if self.out is None:
            self.out = Path("runs") / f"{self.model.name}-{self.method}"
        self.out = Path(self.out)


@dataclass
class TrainResult:
    out_dir: Path
    weights_dir: Path
    merged_dir: Path | None
    steps: int
    train_loss: list[tuple[int, float]]
    eval: list[tuple[int, float, float]]
    seconds: float
    tokens_per_second: float
    peak_gib: float
    precision: str
    trainable_parameters: int
    total_parameters: int
    patch_summary: str
    data_summary: dict = field(default_factory=dict)


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device '{device}' asked for but no CUDA GPU is visible; use --device cpu")
    return device


def rank_device(device: str, env: DistEnv) -> str:
    """One GPU per process: under torchrun rank r's model lives on ``cuda:LOCAL_RANK``, never all on GPU 0."""
    if not (env.is_distributed and device.startswith("cuda")):
        return device
    if env.local_rank >= torch.cuda.device_count():
        raise BadInputError(f"process LOCAL_RANK={env.local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                            "use --gpus (or --nproc-per-node) <= the GPU count")
    torch.cuda.set_device(env.local_rank)
    return f"cuda:{env.local_rank}"


def check_distributed(cfg: TrainConfig) -> None:
    """What multi-process training refuses up front (one line each)."""
    if cfg.offload_checkpoints:
        raise NotBuiltYetError("--offload-checkpoints with several GPUs is not built; drop it (each GPU holds 1/N of "
                               "the weights, which usually frees more memory than offloading)")
    if cfg.precision == "fp8":
        raise NotBuiltYetError("--precision fp8 with several GPUs is not built (FSDP2 would need torchao's float8 "
                               "all-gather); use --precision bf16 there")
    if cfg.qlora_quant == "nf4":
        raise NotBuiltYetError("--qlora-quant nf4 with several GPUs is not built (FSDP2 would shard bitsandbytes' "
                               "packed weights); use --qlora-quant int4 there, which FSDP2 shards")


def _worker_result(cfg: TrainConfig, steps: int, history, seconds: float, precision: str, trainable: int, total: int,
                   patch_summary: str, report) -> TrainResult:
    """What a rank other than 0 returns: the same numbers, nothing written (rank 0 writes the run folder)."""
    weights = cfg.out / ("model" if cfg.method == "full" else "adapter")
    return TrainResult(out_dir=cfg.out, weights_dir=weights, merged_dir=None, steps=steps, train_loss=history.train,
                       eval=history.eval, seconds=seconds, tokens_per_second=0.0, peak_gib=peak_gib(),
                       precision=precision, trainable_parameters=trainable, total_parameters=total,
                       patch_summary=patch_summary, data_summary=asdict(report))


def resolve_precision(precision: str, device: str, method: str = "lora") -> str:
    """auto: bf16 on cards that have it, else fp16 (+GradScaler); fp32 on CPU. fp8 (Ada/Hopper), under bf16
    autocast: LoRA's frozen bases as onecard's fp8 linears, full fine-tuning's as torchao float8 linears."""
    on_gpu = device.startswith("cuda")
    if precision == "auto":
        if not on_gpu:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not on_gpu:
        raise BadInputError("fp16 mixed precision needs a CUDA GPU; use --precision fp32 or bf16 on CPU")
    if precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise BadInputError("this GPU has no bf16; use --precision fp16 (with automatic loss scaling)")
    if precision == "fp8":
        from onecard.train.precision import fp8_unavailable

        why = fp8_unavailable(device, torchao=method == "full")
        if why is not None:
            raise (MissingExtraError if "torchao" in why else BadInputError)(f"--precision fp8: {why}; or use "
                                                                            "--precision bf16")
    return precision


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def check_out_dir(out: Path, resume: bool) -> Path | None:
    """Refuse to overwrite an earlier run; with ``resume`` return the checkpoint to continue from."""
    ckpt = last_checkpoint(out)
    old = ckpt is not None or (out / RUN_FILE).exists()
    if resume:
        if ckpt is None:
            raise BadInputError(f"--resume: no checkpoint-N folder in '{out}' to resume from; drop --resume")
        return ckpt
    if old:
        raise BadInputError(f"'{out}' holds an earlier run; pass --resume to continue it or choose another --out")
    return None


def load_model(cfg: TrainConfig, device: str, precision: str):
    """The HF model for ``cfg.method``: bf16/fp16 frozen base for LoRA, int4 (or bitsandbytes NF4) base for QLoRA,
    fp32 master for full."""
    from transformers import AutoModelForCausalLM

    from onecard.models import open_model_folder

    folder = open_model_folder(cfg.model)
    max_pos = folder.config.get("max_position_embeddings")
    if max_pos and cfg.seq_len > max_pos:
        raise BadInputError(f"--seq-len {cfg.seq_len} is above this model's maximum of {max_pos} positions; "
                            f"use --seq-len {max_pos} or less")
    base_dtype = torch.float32 if cfg.method == "full" or precision == "fp32" else _dtype(precision)
    if cfg.method == "qlora" and cfg.qlora_quant == "nf4":
        from onecard.train.qlora import load_nf4_model

        return load_nf4_model(cfg.model, base_dtype, device), folder
    load_device = "cpu" if cfg.method == "qlora" else device
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=base_dtype, attn_implementation="sdpa",
                                                 device_map={"": load_device})
    if cfg.method == "qlora":
        from onecard.train.qlora import quantize_model_int4

        quantize_model_int4(model, cfg.qlora_group_size, _dtype(precision) if precision != "fp32" else torch.float32,
                            device=device, progress=cfg.progress)
        model.to(device)
    return model, folder


def fsdp_sharded(device: str) -> bool:
    """Whether this process's model is sharded by FSDP2: one of several torchrun processes, on a GPU (on CPU the
    processes run plain data parallel)."""
    return device.startswith("cuda") and DistEnv.from_env().is_distributed


def prepare_model(model, cfg: TrainConfig, precision: str, device: str) -> tuple[object, str]:
    """Patch kernels, float8 linears (``precision="fp8"``), enable checkpointing, add LoRA (for lora/qlora).
    Returns (model, patch summary)."""
    from onecard.train.checkpointing import check_no_dropout, enable_checkpointing
    from onecard.train.lora import add_lora
    from onecard.train.patching import patch_model

    summary = "fused kernels off"
    model.config.use_cache = False  # a KV cache in training also disables packed-document masking
    if cfg.fused:
        # Under FSDP2 the head's weight is a sharded DTensor outside the head's own forward, which the fused
        # linear+CE (it reads head.weight, skipping that forward) cannot use: those runs keep HF's loss.
        summary = patch_model(model, fused_cross_entropy=not fsdp_sharded(device)).summary()
    if precision == "fp8":  # before PEFT wraps the linears: LoRA's base layers are then fp8
        from onecard.train.precision import fp8_linear_filter, use_fp8_linears_

        if cfg.method == "full":
            summary += f"; {use_fp8_linears_(model)} float8 linears (torchao)"
        else:
            from onecard.train.fp8_base import use_fp8_bases_

            summary += f"; {use_fp8_bases_(model, fp8_linear_filter)} frozen fp8 base linears"
    if cfg.method == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, offload=cfg.offload_checkpoints)
    if cfg.method != "full":
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    if cfg.offload_checkpoints:
        check_no_dropout(model)
    return model, summary


def _optimizer(cfg: TrainConfig) -> str:
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        if not has_bnb:
            raise MissingExtraError(f"optimizer {cfg.optimizer} needs bitsandbytes, which is not installed; "
                                    f"pip install 'onecard[bnb]', or use --optimizer adamw")
        return cfg.optimizer
    if cfg.optimizer == "auto" and cfg.method == "full":
        if has_bnb:
            return "paged_adamw_8bit"
        log.info("full fine-tuning uses plain AdamW (fp32 states): bitsandbytes is not installed, so no 8-bit/paged "
                 "optimizer")
    return "adamw_torch"


def training_arguments(cfg: TrainConfig, precision: str, device: str, has_eval: bool, model=None, **overrides):
    from transformers import TrainingArguments

    if fsdp_sharded(device):
        # FSDP2 through accelerate's plugin: one unit per decoder layer, DCP checkpoint-N folders. Activation
        # checkpointing stays onecard's (already applied, non-reentrant: composes with FSDP2), not the plugin's.
        from onecard.dist.fsdp import trainer_fsdp_kwargs

        overrides = {**trainer_fsdp_kwargs(model, gradient_checkpointing=False), **overrides}
    args = TrainingArguments(
        output_dir=str(cfg.out), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps, weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm, bf16=precision in ("bf16", "fp8"), fp16=precision == "fp16",
        optim=_optimizer(cfg), logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval and cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps if has_eval and cfg.eval_steps > 0 else None,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False, prediction_loss_only=True,
        disable_tqdm=True, report_to=[], use_cpu=not device.startswith("cuda"), dataloader_num_workers=0,
        **overrides,
    )  # gradient checkpointing is enabled by onecard (checkpointing.py) before PEFT wraps the model
    if device.startswith("cuda") and not fsdp_sharded(device):
        # one process trains on one card: with several GPUs visible, HF would wrap the model in nn.DataParallel,
        # which cannot replicate the int4 base (and is not how onecard scales: --gpus N runs FSDP2)
        _ = args.device
        args._n_gpu = 1
    return args


def make_trainer_class():
    """``OnecardTrainer``: HF Trainer that adds eval perplexity and peak GPU memory to every log line."""
    from transformers import Trainer

    class OnecardTrainer(Trainer):
        def log(self, logs: dict, *args, **kwargs) -> None:
            if "eval_loss" in logs:
                logs["eval_perplexity"] = eval_perplexity(logs["eval_loss"])
            if torch.cuda.is_available():
                logs["peak_gib"] = round(peak_gib(), 3)
            super().log(logs, *args, **kwargs)

    return OnecardTrainer


def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, val_ds, precision: str, device: str,
                  callbacks: list):
    from onecard.train.data import collate

    args = training_arguments(cfg, precision, device, val_ds is not None, model=model)
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                          data_collator=collate, processing_class=tokenizer, callbacks=callbacks)
    return trainer


def onecard_trainer(cfg: TrainConfig, tokenizer, train_ds, val_ds, precision: str, device: str, callbacks: list):
    """Our path: load (int4 for QLoRA), patch fused kernels, checkpointing (offloaded if asked), LoRA, Trainer."""
    torch.manual_seed(cfg.seed)
    model, _folder = load_model(cfg, device, precision)
    model, patch_summary = prepare_model(model, cfg, precision, device)
    return build_trainer(cfg, model, tokenizer, train_ds, val_ds, precision, device, callbacks), patch_summary


def preflight(cfg: TrainConfig, precision: str, memory):
    """Ask the planner before loading anything: raise ``DoesNotFitError`` with the settings that fit instead of an
    OOM mid-step. ``memory`` is the card's ``onecard.plan.CardMemory`` (None: no card, the check is skipped); fp32
    training, which the planner does not model, is not checked either. Returns the plan (or None)."""
    if memory is None or precision == "fp32":
        return None
    return plan_shape(cfg.model, memory, RunShape.of(cfg, _optimizer(cfg)))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train(cfg: TrainConfig, console=None, extra_callbacks: list | None = None, card_memory=None) -> TrainResult:
    """Run the whole job; raises ``OnecardError`` subclasses for anything the user can fix.

    ``card_memory``: plan against this ``onecard.plan.CardMemory`` instead of the live card: the preflight, and
    the settings an out-of-memory error suggests (re-planned with the measured peak, ``oom.py``).
    """
    from onecard.models import open_model_folder
    from onecard.train.data import load_training_data
    from onecard.train.lora import trainable_summary

    env = DistEnv.from_env()
    device = rank_device(resolve_device(cfg.device), env)
    if env.is_distributed:
        check_distributed(cfg)
        cfg.progress = cfg.progress and env.is_main
    precision = resolve_precision(cfg.precision, device, cfg.method)
    resume_from = check_out_dir(cfg.out, cfg.resume)
    if cfg.merge and (cfg.out / "merged" / "config.json").exists():
        raise BadInputError(f"'{cfg.out / 'merged'}' already holds a merged model; remove it or drop --merge")
    open_model_folder(cfg.model)
    from onecard.plan.card_memory import live_card_memory

    memory = card_memory if card_memory is not None else live_card_memory(device)
    plan = preflight(cfg, precision, memory)
    tokenizer = load_tokenizer(cfg.model)
    train_ds, val_ds, report = load_training_data(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.bad_lines,
                                                  cfg.seed, progress=cfg.progress)
    if val_ds is not None and len(val_ds) > cfg.max_eval_rows:
        log.info("evaluating on the first %d of %d validation rows (max_eval_rows)", cfg.max_eval_rows, len(val_ds))
        val_ds = torch.utils.data.Subset(val_ds, range(cfg.max_eval_rows))
    history = LossHistoryCallback()
    callbacks = [history, *(extra_callbacks or [])]
    if cfg.progress:
        callbacks.append(RichProgressCallback(console))
    trainer, patch_summary = onecard_trainer(cfg, tokenizer, train_ds, val_ds, precision, device, callbacks)
    model = trainer.model
    trainable, total = trainable_summary(model)
    if env.is_distributed:  # after the summary, which counts an int4 base by its logical weights
        from onecard.dist.fsdp import int4_base_as_parameters_

        # Before Trainer.train() lets accelerate's FSDP2 plugin shard the model: it shards parameters only, so a
        # QLoRA base left in buffers would stay whole on every GPU.
        int4_base_as_parameters_(model)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    shape = RunShape.of(cfg, _optimizer(cfg))
    t0 = time.perf_counter()
    try:
        with oom_guard(cfg.out, lambda peak, asked: oom_advice(cfg.model, memory, shape, plan, peak, asked),
                       card=memory, step=lambda: trainer.state.global_step):
            out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        for cb in callbacks:
            if isinstance(cb, RichProgressCallback):
                cb.stop()
    seconds = time.perf_counter() - t0
    steps = trainer.state.global_step
    done = steps - (int(resume_from.name.split("-")[1]) if resume_from else 0)
    tokens = done * cfg.batch_size * cfg.grad_accum * cfg.seq_len * env.world_size
    weights_dir = cfg.out / ("model" if cfg.method == "full" else "adapter")
    # Under FSDP every rank holds a shard: gathering the full state is collective, writing it is rank 0's job.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if env.is_distributed else None
    if not env.is_main:
        return _worker_result(cfg, steps, history, seconds, precision, trainable, total, patch_summary, report)
    model.save_pretrained(str(weights_dir), state_dict=state)
    tokenizer.save_pretrained(str(weights_dir))
    merged = None
    if cfg.merge:
        from onecard.train.merge import merge_adapter

        merged = merge_adapter(cfg.model, weights_dir, cfg.out / "merged")
    result = TrainResult(out_dir=cfg.out, weights_dir=weights_dir, merged_dir=merged, steps=steps,
                         train_loss=history.train, eval=history.eval, seconds=seconds,
                         tokens_per_second=tokens / max(seconds, 1e-9), peak_gib=peak_gib(), precision=precision,
                         trainable_parameters=trainable, total_parameters=total, patch_summary=patch_summary,
                         data_summary=asdict(report))
    run = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
           "result": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()},
           "train_runtime_s": out.metrics.get("train_runtime"),
           "allocator_conf": user_alloc_conf()}  # memory figures depend on it (expandable segments or not)
    (cfg.out / RUN_FILE).write_text(json.dumps(run, indent=2, default=str) + "\n")
    if not math.isfinite(out.training_loss):
        log.warning("training loss is not finite (%s); check --lr and the data", out.training_loss)
    return result
