"""Launch plumbing: torchrun variables, spawn's timeout, the --gpus re-launch command, multi-process refusals."""

from __future__ import annotations

import time

import pytest

from onecard.dist.launch import DistEnv, backend_for, spawn
from onecard.errors import BadInputError, NotBuiltYetError, OnecardError


def test_env_from_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert DistEnv.from_env() == DistEnv(0, 1, 0) and not DistEnv.from_env().is_distributed
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = DistEnv.from_env()
    assert env.is_distributed and not env.is_main and env.local_rank == 1
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(BadInputError, match="RANK=2 WORLD_SIZE=2"):
        DistEnv.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(BadInputError, match="integers"):
        DistEnv.from_env()
    assert backend_for("cuda:1") == "nccl" and backend_for("cpu") == "gloo"


def _hang() -> None:
    time.sleep(120)


def test_spawn_kills_hung_workers():
    t0 = time.monotonic()
    with pytest.raises(OnecardError, match="did not finish within 3 s"):
        spawn(_hang, 2, timeout_s=3)
    assert time.monotonic() - t0 < 60


def _write_at_exit(path: str, fail: bool) -> None:
    import atexit
    from pathlib import Path

    atexit.register(Path(path).write_text, "finalized")
    if fail:
        raise ValueError("rank failed on purpose")


def test_spawned_workers_skip_finalization_but_report_failures(tmp_path):
    """A finished rank exits without interpreter finalization (where gloo's threads can abort it: SIGABRT on CI);
    a failing one still reaches the parent with its error."""
    done = tmp_path / "done"
    spawn(_write_at_exit, 2, (str(done), False), timeout_s=120)
    assert not done.exists()  # atexit handlers are part of finalization: they did not run
    with pytest.raises(Exception, match="rank failed on purpose"):
        spawn(_write_at_exit, 2, (str(tmp_path / "failed"), True), timeout_s=120)


def test_train_refuses_offloaded_checkpoints_on_several_gpus(monkeypatch, tmp_path):
    from onecard.train.trainer import TrainConfig, train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NotBuiltYetError, match="offload-checkpoints"):
        train(TrainConfig(model=tmp_path, data=tmp_path, out=tmp_path / "run", offload_checkpoints=True, device="cpu"))


def test_torchrun_command_drops_gpus():
    import sys

    from onecard.dist.launch import torchrun_command, without_option

    args = without_option(["m", "--gpus", "2", "--data", "d", "--gpus=4", "--seq-len", "8"], "--gpus")
    assert args == ["m", "--data", "d", "--seq-len", "8"]
    cmd = torchrun_command(2, "onecard.cli", ["train", *args])
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:8] == ["-m", "onecard.cli", "train"]
    with pytest.raises(BadInputError, match="--gpus 0"):
        torchrun_command(0, "onecard.cli", [])
