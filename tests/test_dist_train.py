"""``onecard train --gpus 2``: the CLI re-runs itself under torchrun and the 2-process run matches one process.

On CPU (gloo) accelerate has no FSDP, so the two processes are plain data parallel: this covers the launcher,
the per-rank data split, gradient averaging and rank-0-only output. FSDP2 sharding itself is tested on CPU in
test_dist_fsdp.py (the same fully_shard units) and through this CLI on 2 GPUs by the ``gpu`` test below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Same global batch both ways: 1 process x 2 rows == 2 processes x 1 row. The text is one paragraph repeated,
# so any two rows are near copies and the loss hardly depends on which rows a step draws.
STEPS = 3
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 40
ARGS = ["--seq-len", "32", "--max-steps", str(STEPS), "--logging-steps", "1", "--eval-steps", "0",
        "--val-fraction", "0", "--lr", "1e-2", "--lora-r", "4", "--save-steps", "100"]
LOSS_RTOL = 1e-4  # measured: the step losses agree to ~2e-7 relative on CPU (fp32, same rows)


def _cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "onecard.cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _allocator_conf(out: Path) -> str | None:
    return json.loads((out / "onecard_train.json").read_text())["allocator_conf"]


def _expected_alloc_conf() -> str:
    """What the CLI leaves the workers: the caller's own allocator config, else expandable segments."""
    from onecard.monitor.allocator import user_alloc_conf

    return user_alloc_conf() or "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"


def _losses(out: Path) -> list[float]:
    return [loss for _step, loss in json.loads((out / "onecard_train.json").read_text())["result"]["train_loss"]]


def _run_pair(model: Path, tmp_path: Path, device: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The 1-process reference in this process (no second start-up), the 2-process run through the real CLI."""
    from onecard.train.trainer import TrainConfig, train

    data = tmp_path / "data.txt"
    data.write_text("\n\n".join([TEXT] * 20))
    opts = dict(zip(ARGS[::2], ARGS[1::2]))
    train(TrainConfig(model=model, data=data, out=tmp_path / "one", device=device, batch_size=2, progress=False,
                      seq_len=int(opts["--seq-len"]), max_steps=STEPS, logging_steps=1, eval_steps=0, val_fraction=0,
                      lr=float(opts["--lr"]), lora_r=int(opts["--lora-r"]), save_steps=int(opts["--save-steps"])))
    two = _cli([str(model), "--data", str(data), "--device", device, *ARGS, "--batch-size", "1", "--gpus", "2",
                "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-2000:]
    return tmp_path / "one", tmp_path / "two", two


def test_gpus_2_matches_one_process_on_cpu(tiny_model, tmp_path, one_thread):
    one, two, proc = _run_pair(tiny_model.path, tmp_path, "cpu")
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == STEPS and a[-1] < a[0]
    assert all(abs(x - y) <= LOSS_RTOL * abs(x) for x, y in zip(a, b)), (a, b)
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports; rank 1 stays quiet
    assert _allocator_conf(two) == _expected_alloc_conf()
    from safetensors.torch import load_file

    w1, w2 = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (one, two))
    # one process runs the fused q/k/v and gate/up Functions (FSDP2 runs the layers one by one): the same sums in
    # another order, and Adam turns a rounding-sized difference of a near-zero gradient into up to ~1e-3 of a step
    # (measured: 2.2e-5 at most, on weights of 0.02-0.07, lr 1e-2); a wrong gradient moves weights by ~lr
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], rtol=0, atol=1e-4) for k in w1)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpus_2_shards_with_fsdp2_on_cuda(tiny_model, tmp_path):
    one, two, _ = _run_pair(tiny_model.path, tmp_path, "cuda")
    a, b = _losses(one), _losses(two)
    assert all(abs(x - y) <= 2e-2 * abs(x) for x, y in zip(a, b)), (a, b)  # bf16 compute, other reduction order
    assert (two / "adapter" / "adapter_model.safetensors").exists()
    assert _allocator_conf(two) == _expected_alloc_conf()  # FSDP2 ranks ran on expandable segments
