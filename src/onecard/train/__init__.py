"""Fine-tuning on one card: HF Trainer + PEFT recipe with onecard's fused kernels, packing and int4 QLoRA.

Entry point: ``onecard.train.trainer.train(TrainConfig(...))``.
"""
