"""``onecard monitor run -- CMD``: run a command while sampling the GPUs, into one JSONL trace.

The wrapped command inherits ``ONECARD_MONITOR_TRACE``; if it uses
``Monitor`` itself (the benchmarks, trainer callback and engine do), its job
metrics and allocator samples are appended to the same trace. The trace ends
with the command's exit code, which is also ours.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from onecard.errors import BadInputError
from onecard.monitor.guard import DutyCyclePause, GuardPolicy, NvmlPowerWriter, PowerLimiter, ThermalGuard
from onecard.monitor.host import ProcessStats
from onecard.monitor.monitor import TRACE_ENV, Monitor


def make_guard(policy: GuardPolicy, allow_power_limit: bool = False) -> ThermalGuard:
    """A guard for a wrapped command: it logs, may lower the power limit, and (``pause=True`` in
    ``run_wrapped``) may duty-cycle the command with SIGSTOP/SIGCONT.

    The power limiter is a dry run unless ``allow_power_limit`` (and root): it
    then logs the exact change it would make.
    """
    power = None
    try:
        power = PowerLimiter(NvmlPowerWriter(), apply=allow_power_limit)
    except Exception as err:  # no NVML: nothing to limit; the guard still logs
        if allow_power_limit:
            raise BadInputError(f"--allow-power-limit needs NVML, which is unavailable here ({err})") from None
    return ThermalGuard(policy, target=None, power=power)


def run_wrapped(cmd: list[str], log: str | Path, interval: float = 1.0, gpus: list[int] | None = None,
                guard: ThermalGuard | None = None, pause: bool = False) -> int:
    """Run ``cmd`` to completion under a Monitor writing ``log``; returns the command's exit code."""
    if not cmd:
        raise BadInputError("no command to run: put it after --, e.g. onecard monitor run --log run.jsonl -- python train.py")
    import os

    log = Path(log).resolve()
    mon = Monitor(interval=interval, log=log, gpus=gpus, guard=guard, allocator=False,
                  command=shlex.join(cmd), attach=False)  # creates (truncates) the trace before the child appends
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, TRACE_ENV: str(log)})
    except OSError as err:
        mon.writer.close()
        raise BadInputError(f"cannot start {cmd[0]!r}: {err.strerror or err}") from None
    mon.proc = ProcessStats(proc.pid)
    pauser = DutyCyclePause(proc.pid) if pause and guard is not None else None
    if pauser:
        guard.target = pauser
    mon.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT from the terminal; let it finish
        if pauser:
            pauser.close()
        code = proc.wait()
    finally:
        if pauser:
            pauser.close()  # never leave the command stopped
    mon.stop(exit_code=code)
    return code
