"""The plain HF Trainer + PEFT path with the same settings: the baseline onecard is measured against.

No onecard code touches the model here: stock ``AutoModelForCausalLM`` (SDPA),
HF's own gradient checkpointing through ``TrainingArguments``, PEFT LoRA, stock
``Trainer``. Only the data (the same packed rows) and the arguments are shared,
so a difference in loss, speed or memory comes from the model path alone.
"""

from __future__ import annotations

import torch

from onecard.train.trainer import TrainConfig, _dtype, training_arguments


def hf_peft_trainer(cfg: TrainConfig, tokenizer, train_ds, val_ds, precision: str, device: str, callbacks: list):
    """Stock transformers + PEFT trainer for ``cfg`` (method lora or full; QLoRA here would need bitsandbytes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer

    from onecard.train.data import collate

    if cfg.method == "qlora":
        raise ValueError("the HF reference path compares LoRA or full fine-tuning (QLoRA needs bitsandbytes there)")
    torch.manual_seed(cfg.seed)
    dtype = torch.float32 if cfg.method == "full" or precision == "fp32" else _dtype(precision)
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": device})
    model.config.use_cache = False
    if cfg.method != "full":
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        torch.manual_seed(cfg.seed)
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none",
                                                 task_type="CAUSAL_LM"))
    gc = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    args = training_arguments(cfg, precision, device, val_ds is not None, **(gc if cfg.gradient_checkpointing else {}))
    return Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=collate,
                   processing_class=tokenizer, callbacks=callbacks)


def compare_loss_curves(cfg: TrainConfig, tokenizer, train_ds, precision: str, device: str
                        ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Train ``cfg`` twice from the same seed and data order: onecard's path, then stock HF + PEFT.

    Returns both (step, loss) curves as logged every ``cfg.logging_steps`` steps.
    """
    from onecard.train.callbacks import LossHistoryCallback
    from onecard.train.trainer import onecard_trainer

    curves = []
    for build in ("onecard", "hf"):
        hist = LossHistoryCallback()
        if build == "onecard":
            trainer, _ = onecard_trainer(cfg, tokenizer, train_ds, None, precision, device, [hist])
        else:
            trainer = hf_peft_trainer(cfg, tokenizer, train_ds, None, precision, device, [hist])
        trainer.train()
        curves.append(hist.train)
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return curves[0], curves[1]
