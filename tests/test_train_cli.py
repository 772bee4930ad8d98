"""``onecard train`` end to end on the tiny model: adapter + merged folder, refusing an old run, --resume, bad targets."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from onecard.errors import BadInputError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from onecard.testing import local_corpus

    d = tmp_path_factory.mktemp("train-data")
    for i, text in enumerate(local_corpus().train[:12]):
        (d / f"doc{i}.txt").write_text(text[:4000])
    return d


def _invoke(*args):
    from onecard.cli import app

    return CliRunner().invoke(app, ["train", *map(str, args)])


@pytest.mark.timeout(900)
def test_train_merge_refuse_then_resume(tiny_model, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    base = [tiny_model.path, "--data", data_dir, "--out", out, "--seq-len", "32", "--batch-size", "2",
            "--save-steps", "1", "--eval-steps", "2", "--logging-steps", "1", "--device", "cpu", "--lr", "1e-2",
            "--lora-r", "4", "--no-gradient-checkpointing"]
    r = _invoke(*base, "--max-steps", "2", "--merge")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "checkpoint-2").is_dir()
    assert "2 steps" in r.output and "eval perplexity" in r.output
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model.path))
    ids = torch.randint(3, 1000, (1, 8))
    assert not torch.allclose(merged(input_ids=ids).logits, original(input_ids=ids).logits)  # the adapter is in
    from onecard.models import open_model_folder

    assert open_model_folder(out / "merged").quantization_config is None  # what the engine and quantizer open

    again = _invoke(*base, "--max-steps", "2")
    assert isinstance(again.exception, BadInputError) and "--resume" in str(again.exception)

    resumed = _invoke(*base, "--max-steps", "3", "--resume")
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    run = json.loads((out / "onecard_train.json").read_text())
    assert run["result"]["steps"] == 3


@pytest.mark.timeout(600)
def test_nf4_qlora_trains_evaluates_and_merges(tiny_model, data_dir, tmp_path):
    """``--method qlora --qlora-quant nf4`` (bitsandbytes' base) end to end on CPU: train, evaluate (the tiny
    model's 688-wide MLP is what bitsandbytes' CPU repack refuses, ``nf4_generic_cpu_path_``), save the adapter
    and merge it into the original weights."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nf4"
    r = _invoke(tiny_model.path, "--data", data_dir, "--out", out, "--method", "qlora", "--qlora-quant", "nf4",
                "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--eval-steps", "1", "--logging-steps",
                "1", "--device", "cpu", "--lora-r", "4", "--merge")
    assert r.exit_code == 0, r.output + repr(r.exception)
    run = json.loads((out / "onecard_train.json").read_text())
    assert run["config"]["qlora_quant"] == "nf4" and run["result"]["steps"] == 2 and run["result"]["eval"]
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # merged into the original weights


def test_lora_target_that_matches_nothing_is_one_line_error(tiny_model, data_dir, tmp_path):
    r = _invoke(tiny_model.path, "--data", data_dir, "--out", tmp_path / "x", "--lora-targets", "c_attn",
                "--device", "cpu", "--max-steps", "1", "--seq-len", "32")
    assert isinstance(r.exception, BadInputError) and "c_attn match no linear layer" in str(r.exception)


def test_resume_without_checkpoint_is_refused(tiny_model, data_dir, tmp_path):
    r = _invoke(tiny_model.path, "--data", data_dir, "--out", tmp_path / "new", "--resume", "--device", "cpu")
    assert isinstance(r.exception, BadInputError) and "no checkpoint-N folder" in str(r.exception)


def test_demo_stage_trains_and_hands_over_the_adapter(tiny_model, tmp_path):
    # twice in one work folder, as a second `onecard demo` runs (the first run's folder must not stop it)
    from rich.console import Console

    from onecard.demo import DemoContext
    from onecard.train.demo_stage import demo_stage

    for _ in range(2):
        ctx = DemoContext(tmp_path, "cpu", Console(quiet=True), {"model_dir": tiny_model.path})
        res = demo_stage(ctx)
        assert res.ok, res.summary
        assert (ctx.artifacts["lora_dir"] / "adapter_config.json").exists()


def _one_document(tmp_path):
    """A data folder of one short document: what the GPU tests' adapters memorize (on CPU in fp32 the fp8 test's
    recipe takes the loss from 4.96 to 2.28 in 30 steps), so "learns" is unmistakable; the loose corpus slice the
    other tests use barely moves a trained model."""
    from onecard.testing import local_corpus

    data = tmp_path / "data"
    data.mkdir()
    (data / "doc.txt").write_text(local_corpus().train[3][:1500])
    return data


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_fp8_lora_on_cuda_learns_like_bf16(tiny_model, tmp_path):
    """``--precision fp8`` on a GPU (Ada/Hopper): the frozen fp8 bases train the adapter (``_one_document``) as
    bf16 does."""
    data = _one_document(tmp_path)
    curves = {}
    for precision in ("bf16", "fp8"):
        out = tmp_path / precision
        r = _invoke(tiny_model.path, "--data", data, "--out", out, "--seq-len", "64", "--batch-size", "4",
                    "--max-steps", "30", "--lr", "5e-3", "--eval-steps", "0", "--val-fraction", "0",
                    "--logging-steps", "5", "--save-steps", "1000", "--device", "cuda", "--precision", precision)
        assert r.exit_code == 0, r.output + repr(r.exception)
        if precision == "fp8":
            assert "frozen fp8 base linears" in r.output
        curves[precision] = [loss for _, loss in json.loads((out / "onecard_train.json").read_text())["result"]["train_loss"]]
    bf16, fp8 = curves["bf16"], curves["fp8"]
    assert bf16[-1] < bf16[0] - 1.0, f"the bf16 reference does not learn: {bf16}"
    assert abs(fp8[-1] - bf16[-1]) < 0.1 * bf16[-1], f"fp8 {fp8} vs bf16 {bf16}"  # lands where bf16 does


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_nf4_qlora_on_cuda_learns_like_the_int4_base(tiny_model, tmp_path):
    """``--qlora-quant nf4`` on a GPU (bitsandbytes' CUDA kernels under onecard's fused Triton ones): the adapter
    learns the document the int4 base's adapter learns, to about the same loss."""
    pytest.importorskip("bitsandbytes")
    data = _one_document(tmp_path)
    curves = {}
    for quant in ("int4", "nf4"):
        out = tmp_path / quant
        r = _invoke(tiny_model.path, "--data", data, "--out", out, "--method", "qlora", "--qlora-quant", quant,
                    "--seq-len", "64", "--batch-size", "4", "--max-steps", "30", "--lr", "5e-3", "--eval-steps", "0",
                    "--val-fraction", "0", "--logging-steps", "5", "--save-steps", "1000", "--device", "cuda")
        assert r.exit_code == 0, r.output + repr(r.exception)
        run = json.loads((out / "onecard_train.json").read_text())
        curves[quant] = [loss for _, loss in run["result"]["train_loss"]]
    int4, nf4 = curves["int4"], curves["nf4"]
    assert int4[-1] < int4[0] - 1.0, f"the int4 reference does not learn: {int4}"
    assert nf4[-1] < nf4[0] - 1.0 and abs(nf4[-1] - int4[-1]) < 0.15 * int4[-1], f"nf4 {nf4} vs int4 {int4}"


def test_train_command_asks_for_expandable_segments_unless_the_user_configured_the_allocator(tmp_path, monkeypatch):
    import os

    if torch.cuda.is_initialized():
        pytest.skip("CUDA already started in this process: the allocator can no longer be configured")
    for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(k, "")  # recorded, so the teardown restores the variables as they were
        monkeypatch.delenv(k)
    r = _invoke(tmp_path / "no-model", "--data", tmp_path)  # fails on the missing folder, after the allocator step
    assert r.exit_code != 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    _invoke(tmp_path / "no-model", "--data", tmp_path)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
