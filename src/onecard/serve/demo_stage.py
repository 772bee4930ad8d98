"""``onecard demo`` stage: start ``onecard serve`` on the tiny model, ask it one question with ``openai``, stop it.

The server runs as a user would run it (a subprocess bound to 127.0.0.1 on a
free port), so the stage proves the whole path: CLI, engine load, HTTP,
SSE streaming, /metrics and a SIGTERM shutdown that exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 120.0
MODEL = "tiny"
PROMPT = "def read_config(path):\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: Path, device: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    import onecard

    port = _free_port()
    pkg_root = str(Path(onecard.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "onecard.cli", "serve", str(model_dir), "--port", str(port), "--served-model-name",
           MODEL, "--max-num-seqs", "4", "--gpu-memory-utilization", "0.3", "--shutdown-timeout", "5"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"onecard serve exited with {proc.returncode}: {log_path.read_text()[-500:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"onecard serve not ready after {START_TIMEOUT_S:.0f} s; log: {log_path}")
        time.sleep(0.25)


def demo_stage(ctx):
    import httpx
    import openai

    from onecard.demo import StageResult

    model_dir = Path(ctx.artifacts["model_dir"])
    log_path = Path(ctx.workdir if ctx.workdir else tempfile.mkdtemp()) / "serve.log"
    t0 = time.perf_counter()
    with ctx.console.status("starting onecard serve on the tiny model"):
        proc, url = _start(model_dir, ctx.device, log_path)
    startup = time.perf_counter() - t0
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        t1 = time.perf_counter()
        # The tiny model was trained on Python sources, not chats: a completion prompt is its natural request.
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0.0, stream=True,
                                           stream_options={"include_usage": True})
        text, usage, ttft = [], None, None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                ttft = ttft if ttft is not None else time.perf_counter() - t1
                text.append(chunk.choices[0].text)
            usage = chunk.usage or usage
        elapsed = time.perf_counter() - t1
        metrics = httpx.get(url + "/metrics", timeout=10).text
        if "onecard_generation_tokens_total" not in metrics:
            raise RuntimeError("/metrics lacks onecard_generation_tokens_total")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    if rc != 0:
        raise RuntimeError(f"onecard serve exited with {rc} after SIGTERM (log {log_path})")
    reply = "".join(text)
    ctx.console.print(f"[dim]POST {url}/v1/completions (streamed):[/] {PROMPT}{reply}", highlight=False)
    return StageResult("serve", f"OpenAI API on {url}: ready in {startup:.0f} s, streamed {usage.completion_tokens} "
                                f"tokens (first after {1e3 * (ttft or elapsed):.0f} ms, {elapsed:.1f} s total), "
                                "/metrics ok, SIGTERM -> exit 0")
