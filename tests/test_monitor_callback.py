"""MonitorCallback inside a real (tiny, CPU) Hugging Face Trainer run; the guard's pause between steps."""

from __future__ import annotations

import time

import torch

from onecard.monitor.callbacks import MonitorCallback
from onecard.monitor.guard import PauseBackoff
from onecard.monitor.monitor import Monitor
from onecard.monitor.nvml import GPUSample
from onecard.monitor.trace import load_trace


class Fixed:
    def read(self):
        return [GPUSample(index=0, name="Fake GPU", temp_c=70.0)]

    def close(self):
        pass


class Ids(torch.utils.data.Dataset):
    def __init__(self, vocab, n=16, seq=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i], "attention_mask": torch.ones_like(self.x[i])}


def test_trainer_records_steps_tokens_loss_and_pauses(tmp_path):
    from transformers import Trainer, TrainingArguments

    from onecard.models import arch_config, scale_config
    from onecard.testing.checkpoints import build_random_model

    cfg = scale_config(arch_config("llama-2-7b"), "tiny")
    model = build_random_model(cfg)
    log = tmp_path / "train.jsonl"
    pause = PauseBackoff(0.05)
    pause.back_off(2, "test: pretend the guard backed off")  # 0.1 s between steps
    mon = Monitor(interval=0.05, log=log, reader=Fixed(), attach=False)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    cb = MonitorCallback(mon, tokens_per_step=2 * 16, pause=pause)
    t0 = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=Ids(cfg["vocab_size"]), callbacks=[cb]).train()
    assert time.perf_counter() - t0 >= 4 * 0.1  # the pauses happened
    tr = load_trace(log)
    steps = [r for r in tr.records if "step_time" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["tokens"] == 32 and r["step_time"] > 0 for r in steps)
    assert any("loss" in r for r in tr.records)
    assert len(tr.samples) >= 2 and tr.samples[0].gpus[0].name == "Fake GPU"
