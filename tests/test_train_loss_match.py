"""Correctness target: onecard's training path and stock HF Trainer + PEFT give the same loss curve."""

from __future__ import annotations

import pytest

STEPS = 12


def _text_data(tmp_path):
    """One source file: every batch is alike, so 12 LoRA steps visibly lower the loss."""
    from onecard.testing import local_corpus

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "doc.txt").write_text(local_corpus().train[0][:30000])
    return tmp_path


@pytest.mark.timeout(900)
def test_lora_loss_curve_matches_hf_peft_within_1_percent(tiny_model, tmp_path):
    from onecard.train.data import load_training_data
    from onecard.train.reference import compare_loss_curves
    from onecard.train.trainer import TrainConfig, load_tokenizer

    data = _text_data(tmp_path / "data")
    # 12 steps of 2x96 tokens keep this CPU test short; benchmarks/train_vs_hf.py --part loss runs 200 on a GPU
    cfg = TrainConfig(model=tiny_model.path, data=data, out=tmp_path / "unused", seq_len=96, batch_size=2,
                      max_steps=STEPS, lr=2e-3, logging_steps=1, eval_steps=0, save_steps=1000, progress=False,
                      device="cpu", lora_r=8, lora_alpha=16, gradient_checkpointing=False)
    tok = load_tokenizer(cfg.model)
    train_ds, _, _ = load_training_data(cfg.data, tok, cfg.seq_len, 0.0, use_cache=False)
    ours, ref = compare_loss_curves(cfg, tok, train_ds, "fp32", "cpu")
    assert [s for s, _ in ours] == [s for s, _ in ref] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(ours, ref):
        assert abs(a - b) <= 0.01 * abs(b), f"step {step}: onecard {a:.5f} vs HF+PEFT {b:.5f}"
    first, last = (sum(l for _, l in part) / 3 for part in (ours[:3], ours[-3:]))
    assert last < first, f"training should lower the loss (first 3 steps {first:.3f}, last 3 {last:.3f})"
