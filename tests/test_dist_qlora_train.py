"""QLoRA on several processes through the Trainer path (``onecard train --method qlora --gpus 2``).

Two halves, because accelerate has no FSDP on CPU:

- ``train()`` on 2 processes hands ``Trainer.train()`` an int4 base whose codes and scales are frozen parameters, not
  buffers (FSDP2 shards parameters only);
- accelerate's own FSDP2 preparation (``fsdp2_prepare_model``, what ``Trainer`` calls on GPUs), run here on CPU with
  gloo on the QLoRA model ``onecard train`` builds: the int4 codes come out as uint8 shards (half the rows each), not
  cast, upcast or replicated, and 3 steps give the one-process losses;
- the CLI under torchrun on CPU (gloo, plain data parallel): the step losses equal one process, rank 0 alone
  writes the PEFT adapter, and ``--resume`` continues the 2-process run.

The CLI with FSDP2 itself runs only on 2 GPUs (the ``gpu`` test at the end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onecard.dist.launch import spawn
from onecard.testing import make_random_checkpoint

STEPS, ROWS, SEQ, LR, GROUP = 3, 4, 32, 1e-3, 32
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 40
LOSS_RTOL = 1e-4


def _qlora_model(folder: str, dtype: torch.dtype):
    """What ``load_model`` + ``prepare_model`` build for ``--method qlora`` (int4 base, checkpointing, LoRA)."""
    from transformers import AutoModelForCausalLM

    from onecard.train.checkpointing import enable_checkpointing
    from onecard.train.lora import add_lora
    from onecard.train.qlora import quantize_model_int4

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.config.use_cache = False
    quantize_model_int4(model, GROUP, dtype)
    model.requires_grad_(False)
    enable_checkpointing(model)
    return add_lora(model, r=4, alpha=8, seed=0).train()


def _data(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (STEPS, ROWS, SEQ), generator=torch.Generator().manual_seed(1))


def _steps(model) -> list[float]:
    from onecard.dist.fsdp import rank_rows, train_step

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return [train_step(model, opt, rank_rows(b)) for b in _data(model.get_base_model().config.vocab_size)]


def _accelerate_prepare(model, out_dir: str, mixed_precision: str):
    """Shard ``model`` exactly as ``Trainer`` does under FSDP2: our TrainingArguments -> accelerate's plugin ->
    ``fsdp2_prepare_model``. The accelerator is a stand-in holding only what that function reads, since
    accelerate only selects FSDP on GPUs."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from transformers import TrainingArguments

    from onecard.dist.fsdp import int4_base_as_parameters_, trainer_fsdp_kwargs

    int4_base_as_parameters_(model)  # what train() does before Trainer.train()
    args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[],
                             **trainer_fsdp_kwargs(model, gradient_checkpointing=False))
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  parallelism_config=None, mixed_precision=mixed_precision,
                                  is_main_process=int(os.environ["RANK"]) == 0, device=torch.device("cpu"))
    return fsdp2_prepare_model(accelerator, model)


def _int4_layout(model) -> dict:
    """What this rank holds of the first int4 linear, and the dtypes of every kind of parameter."""
    from torch.distributed.tensor import DTensor

    from onecard.train.qlora import Int4Linear

    q = next(m for m in model.modules() if isinstance(m, Int4Linear))
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    return {"dtensor": isinstance(q.qweight, DTensor) and isinstance(q.scales, DTensor),
            "qweight": (q.qweight.dtype, tuple(q.qweight.to_local().shape)),
            "scales": (q.scales.dtype, tuple(q.scales.to_local().shape)), "out_features": q.out_features,
            "buffers": sorted(n for n, _ in q.named_buffers()), "lora": lora}


def _base_seen_by_trainer(tiny: str, out_dir: str) -> dict:
    """What the first int4 linear holds when ``Trainer.train()`` starts under ``train()`` on 2 processes."""
    from transformers import TrainerCallback

    from onecard.train.qlora import Int4Linear
    from onecard.train.trainer import TrainConfig, train

    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            q = next(m for m in model.modules() if isinstance(m, Int4Linear))
            seen.update(buffers=sorted(n for n, _ in q.named_buffers()),
                        frozen=sorted(n for n, p in q.named_parameters(recurse=False) if not p.requires_grad))

    data = Path(out_dir) / "data.txt"
    data.write_text("\n\n".join([TEXT] * 4))
    train(TrainConfig(model=tiny, data=data, out=Path(out_dir) / "run", method="qlora", device="cpu", seq_len=32,
                      max_steps=1, eval_steps=0, val_fraction=0, lora_r=4, progress=False), extra_callbacks=[Look()])
    return seen


def _accelerate_worker(folder: str, tiny: str, out_dir: str) -> None:
    from onecard.dist.launch import init_distributed

    env, _ = init_distributed("cpu")
    seen = _base_seen_by_trainer(tiny, out_dir)
    fp32 = _accelerate_prepare(_qlora_model(folder, torch.float32), out_dir, "no")
    result = {"fp32": _int4_layout(fp32), "losses": _steps(fp32)}
    bf16 = _accelerate_prepare(_qlora_model(folder, torch.bfloat16), out_dir, "bf16")
    result["bf16"] = _int4_layout(bf16)
    result["bf16_loss"] = _steps(bf16)[0]
    if env.rank == 0:
        torch.save({**result, "trainer": seen}, f"{out_dir}/result.pt")


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory, tiny_model):
    folder = str(make_random_checkpoint("llama-3.1-8b", "tiny", overrides={"num_key_value_heads": 2}))
    out = tmp_path_factory.mktemp("accel")
    spawn(_accelerate_worker, 2, (folder, str(tiny_model.path), str(out)), timeout_s=300)
    return folder, torch.load(out / "result.pt")


def test_train_hands_the_trainer_an_int4_base_in_parameters(accelerate_run):
    # accelerate's FSDP2 shards parameters only: by Trainer.train() the codes and scales must have left the buffers
    assert accelerate_run[1]["trainer"] == {"buffers": [], "frozen": ["qweight", "scales"]}


def test_accelerate_fsdp2_shards_the_int4_base_without_casting(accelerate_run):
    _folder, result = accelerate_run
    for mode, scale_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        got = result[mode]
        rows = got["out_features"] // 2  # rank 0's half of the output rows: codes and their scales
        assert got["dtensor"] and got["buffers"] == [], got
        assert got["qweight"][0] == scale_dtype and got["qweight"][1][0] == rows, got  # codes as compute-dtype bits
        assert got["scales"] == (scale_dtype, (rows, got["scales"][1][1])), got  # frozen: never upcast to fp32
        assert got["lora"] == {torch.float32}, got  # trainable: accelerate keeps (or makes) fp32 masters
    assert torch.isfinite(torch.tensor(result["bf16_loss"]))


def test_accelerate_fsdp2_losses_match_one_process(accelerate_run):
    folder, result = accelerate_run
    ref = _steps(_qlora_model(folder, torch.float32))
    got = result["losses"]
    assert len(got) == STEPS and ref[-1] < ref[0], (got, ref)
    assert all(abs(a - b) <= LOSS_RTOL * abs(b) for a, b in zip(got, ref)), (got, ref)


# --- the CLI under torchrun ------------------------------------------------------------------------------------------

CLI_STEPS = 3
ARGS = ["--method", "qlora", "--seq-len", "32", "--logging-steps", "1", "--eval-steps", "0", "--val-fraction", "0",
        "--lr", "1e-2", "--lora-r", "4", "--save-steps", str(CLI_STEPS)]


def _cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "onecard.cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _run(out: Path) -> dict:
    return json.loads((out / "onecard_train.json").read_text())["result"]


def _losses(out: Path) -> list[float]:
    return [loss for _step, loss in _run(out)["train_loss"]]


def _failure(proc: subprocess.CompletedProcess) -> str:
    """A failed torchrun's worker error lines and the end of rank 0's traceback (torchrun's own summary, at the
    end of stderr, names no cause)."""
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if "Error" in ln and "ChildFailedError" not in ln]
    rank0 = [ln for ln in lines if ln.startswith("[rank0]:")]
    return "\n".join(errors[:20] + ["..."] + rank0[-25:])


def _pair(model: Path, tmp_path: Path, device: str) -> tuple[Path, Path, subprocess.CompletedProcess, list[str]]:
    """1 process x 2 rows in this process, 2 processes x 1 row through the real CLI: the same global batch."""
    from onecard.train.trainer import TrainConfig, train

    data = tmp_path / "data.txt"
    data.write_text("\n\n".join([TEXT] * 20))
    train(TrainConfig(model=model, data=data, out=tmp_path / "one", method="qlora", device=device, batch_size=2,
                      progress=False, seq_len=32, max_steps=CLI_STEPS, logging_steps=1, eval_steps=0, val_fraction=0,
                      lr=1e-2, lora_r=4, save_steps=CLI_STEPS))
    base = [str(model), "--data", str(data), "--device", device, *ARGS, "--batch-size", "1", "--gpus", "2",
            "--out", str(tmp_path / "two")]
    two = _cli([*base, "--max-steps", str(CLI_STEPS)])
    assert two.returncode == 0, _failure(two)
    return tmp_path / "one", tmp_path / "two", two, base


def test_cli_qlora_gpus_2_matches_one_process_and_resumes_on_cpu(tiny_model, tmp_path, one_thread):
    from safetensors.torch import load_file

    one, two, proc, base = _pair(tiny_model.path, tmp_path, "cpu")
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == CLI_STEPS and a[-1] < a[0], (a, b)
    assert all(abs(x - y) <= LOSS_RTOL * abs(x) for x, y in zip(a, b)), (a, b)
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports and writes; rank 1 stays quiet
    w1, w2 = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (one, two))
    assert w1.keys() == w2.keys() and all("lora_" in k for k in w1)  # PEFT adapter only: no int4 base inside
    # Adam turns reduction-order noise in near-zero gradients into up to ~lr-sized steps on a few elements: seen
    # 5e-5 on 0.003 % of them (weights up to 0.07, lr 1e-2); a wrong gradient average moves every element ~1e-2
    assert all(torch.allclose(w1[k], w2[k], atol=2e-4) for k in w1)
    assert json.loads((two / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    resumed = _cli([*base, "--max-steps", str(CLI_STEPS + 2), "--resume"])
    assert resumed.returncode == 0, _failure(resumed)
    run = _run(two)
    assert run["steps"] == CLI_STEPS + 2 and [s for s, _ in run["train_loss"]] == [CLI_STEPS + 1, CLI_STEPS + 2]
    assert any(not torch.equal(w2[k], t) for k, t in load_file(two / "adapter" / "adapter_model.safetensors").items())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cli_qlora_gpus_2_shards_with_fsdp2_on_cuda(tiny_model, tmp_path):
    one, two, _, base = _pair(tiny_model.path, tmp_path, "cuda")
    a, b = _losses(one), _losses(two)
    assert all(abs(x - y) <= 2e-2 * abs(x) for x, y in zip(a, b)), (a, b)  # bf16 compute, other reduction order
    assert (two / "adapter" / "adapter_model.safetensors").exists()
    resumed = _cli([*base, "--max-steps", str(CLI_STEPS + 2), "--resume"])  # from the DCP checkpoint-3
    assert resumed.returncode == 0, _failure(resumed)
    assert _run(two)["steps"] == CLI_STEPS + 2
