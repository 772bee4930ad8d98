"""Process-group setup that works the same under ``torchrun``, ``accelerate launch`` and our own ``spawn``.

torchrun (``python -m torch.distributed.run``) exports RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``DistEnv.from_env`` reads exactly
those, so one code path serves the CLI, the tests and the benchmarks. The
backend follows the device: NCCL between GPUs, gloo on CPU (what CI tests on).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from onecard.errors import BadInputError, OnecardError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise BadInputError(f"bad distributed environment: RANK={self.rank} WORLD_SIZE={self.world_size} "
                                f"LOCAL_RANK={self.local_rank}; launch with torchrun --nproc-per-node N")

    @classmethod
    def from_env(cls) -> DistEnv:
        """The torchrun variables (all absent = one process)."""
        try:
            return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                       int(os.environ.get("LOCAL_RANK", "0")))
        except ValueError as e:
            raise BadInputError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); launch with torchrun") from None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_distributed(device: str | None = None) -> tuple[DistEnv, str]:
    """Join the process group torchrun described; returns (env, this process's device).

    A torchrun launch (MASTER_ADDR set) gets a process group even with one
    process, so FSDP's 1-GPU baseline runs the same code as N GPUs.

    On CUDA each process takes GPU ``LOCAL_RANK``; a world larger than the
    visible GPUs is an error rather than two processes silently sharing a card.
    """
    env = DistEnv.from_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if env.local_rank >= torch.cuda.device_count():
            raise BadInputError(f"process LOCAL_RANK={env.local_rank} has no GPU: only {torch.cuda.device_count()} "
                                "visible; use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(env.local_rank)
        device = f"cuda:{env.local_rank}"
    if (env.is_distributed or "MASTER_ADDR" in os.environ) and not dist.is_initialized():  # torchrun, even 1 proc
        dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size,
                                device_id=torch.device(device) if device.startswith("cuda") else None)
    return env, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a worker process here, after it left its group, without interpreter finalization.

    At finalization gloo's C++ threads can still drop tensors that hold Python
    references; taking the GIL from a thread the dying interpreter stops aborts
    the process ("terminate called without an active exception", SIGABRT), so
    a rank that finished its work is reported as failed (seen on CI). The
    worker's results are already written and its group left, so nothing is
    lost by skipping finalization.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes on a shared CPU: one thread each, or they fight over cores
    try:
        fn(*args)
    finally:
        shutdown()
    exit_worker(0)  # an exception instead goes to torch's spawn wrapper, which reports it to the parent


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """The command that re-runs ``python -m module args`` as ``nproc`` processes under torchrun (one per GPU).

    ``--standalone`` gives a local rendezvous on a free port, so two jobs on one
    machine do not collide; torchrun exports RANK/WORLD_SIZE/LOCAL_RANK.
    """
    import sys

    if nproc < 1:
        raise BadInputError(f"--gpus {nproc}: need at least 1 process")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` minus ``name VALUE`` / ``name=VALUE`` (how ``--gpus N`` is dropped before torchrun re-runs the CLI)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def spawn(fn: Callable, nprocs: int, args: tuple = (), timeout_s: float = 300) -> None:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes with torchrun's variables set (tests, ``--smoke``).

    ``fn`` must be importable (module level). A hung collective cannot block
    forever: after ``timeout_s`` the workers are killed and this raises.
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(fn, nprocs, free_port(), args), nprocs=nprocs, join=False,
                             start_method="spawn")
    import time

    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise OnecardError(f"distributed workers did not finish within {timeout_s:.0f} s (a rank hung in a "
                               "collective?)")
