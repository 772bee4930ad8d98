"""``onecard demo`` stage: start ``onecard serve`` on the tiny model, ask it one question with ``openai``, stop it.

The server runs as a user would run it (a subprocess bound to 127.0.0.1 on a
free port), so the stage proves the whole path: CLI, engine load, HTTP,
SSE streaming, /metrics and a SIGTERM shutdown that exits 0.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 120.0
MODEL = "tiny"
PROMPT = "def read_config(path):\n"
SERVE_ARGS = ("--served-model-name", MODEL, "--max-num-seqs", "4", "--gpu-memory-utilization", "0.3",
              "--shutdown-timeout", "5")


def demo_stage(ctx):
    import httpx
    import openai

    from onecard.demo import StageResult
    from onecard.serve.launch import start_server

    model_dir = Path(ctx.artifacts["model_dir"])
    log_path = Path(ctx.workdir if ctx.workdir else tempfile.mkdtemp()) / "serve.log"
    with ctx.console.status("starting onecard serve on the tiny model") as status, start_server(
            model_dir, SERVE_ARGS, cpu=ctx.device == "cpu", timeout=START_TIMEOUT_S, stop_timeout=30,
            log_path=log_path) as server:
        status.update("onecard serve: one streamed request")
        url = server.url
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
    startup = server.startup_s
    if server.returncode != 0:
        raise RuntimeError(f"onecard serve exited with {server.returncode} after SIGTERM (log {log_path})")
    reply = "".join(text)
    ctx.console.print(f"[dim]POST {url}/v1/completions (streamed):[/] {PROMPT}{reply}", highlight=False)
    return StageResult("serve", f"OpenAI API on {url}: ready in {startup:.0f} s, streamed {usage.completion_tokens} "
                                f"tokens (first after {1e3 * (ttft or elapsed):.0f} ms, {elapsed:.1f} s total), "
                                "/metrics ok, SIGTERM -> exit 0")
