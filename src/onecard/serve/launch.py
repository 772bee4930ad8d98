"""Start ``onecard serve`` as a subprocess, the way users run it, and wait until ``/health`` says 200.

The demo's serve stage, ``benchmarks/serve_load.py`` and the server tests all
need the real server (CLI, uvicorn, engine load, SIGTERM) rather than an app
in the same process; ``start_server`` is that one routine: a free port on
127.0.0.1, ``PYTHONPATH`` pointing at this onecard, the log in a file, a
bounded wait for health, and on leaving the ``with`` block a SIGTERM whose exit
status is kept for the caller to check.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from onecard.errors import OnecardError


class ServerStartError(OnecardError):
    """``onecard serve`` exited, or did not become healthy in time; the message ends with its log's tail."""


@dataclass
class ServerProcess:
    """A running ``onecard serve``: its process, base URL (no ``/v1``), log file and start-up time."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    startup_s: float = 0.0
    returncode: int | None = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait (the server's graceful shutdown); kill after ``timeout`` s (then ``returncode`` is the
        kill's, not 0). Returns the exit status; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(cpu: bool = False) -> dict[str, str]:
    """This process's environment with this onecard first on ``PYTHONPATH``; no visible GPU with ``cpu``."""
    import onecard

    pkg_root = str(Path(onecard.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@contextmanager
def start_server(model: str | Path, args: Sequence[str] = (), *, cpu: bool = False, timeout: float = 180.0,
                 stop_timeout: float = 60.0, log_path: str | Path | None = None,
                 while_loading: Callable[[str], None] | None = None) -> Iterator[ServerProcess]:
    """``onecard serve MODEL --port FREE ARGS...`` until healthy; yields it, and stops it (SIGTERM) on exit.

    ``while_loading(url)`` runs on each poll that finds the server up but not yet healthy (tests use it to see
    the 503 of a loading engine). Raises ``ServerStartError`` if the server exits or is not healthy in ``timeout``.
    """
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="onecard_serve_", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    cmd = [sys.executable, "-m", "onecard.cli", "serve", str(model), "--port", str(port), *args]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=serve_env(cpu), stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, url, log_path)
    try:
        while True:
            if proc.poll() is not None:
                raise ServerStartError(f"onecard serve exited with {proc.returncode} while starting; log "
                                       f"{log_path}: {server.log_tail(1500)}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
                if while_loading is not None:
                    while_loading(url)
            except httpx.TransportError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise ServerStartError(f"onecard serve not healthy after {timeout:.0f} s; log {log_path}: "
                                       f"{server.log_tail(1500)}")
            time.sleep(0.2)
        server.startup_s = time.perf_counter() - t0
        yield server
    finally:
        server.stop(stop_timeout)
