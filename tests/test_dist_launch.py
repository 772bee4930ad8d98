"""Launch plumbing: torchrun variables, spawn's timeout, and the trainer's refusal to run N unsharded copies."""

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


def test_train_refuses_unsharded_multi_process(monkeypatch, tmp_path):
    from onecard.train.trainer import TrainConfig, train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NotBuiltYetError, match="WORLD_SIZE > 1"):
        train(TrainConfig(model=tmp_path, data=tmp_path, out=tmp_path / "run"))
