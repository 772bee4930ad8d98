"""Load test of ``onecard serve``: N concurrent streaming clients, 10% hang up mid-stream; vs the offline engine.

    PYTHONPATH=src python benchmarks/serve_load.py             # GPU: Llama-2-7B arch, bf16, 256 clients (~10-15 min
                                                              #      incl. writing the 13 GB random checkpoint once)
    PYTHONPATH=src python benchmarks/serve_load.py --smoke     # CPU: tiny model, 100 clients, output to a temp dir

First the offline engine (``LLM.generate``) runs the workload in this
process on the bare card and is freed. Then the server runs as users run it
(``onecard serve`` in a subprocess on 127.0.0.1, ``onecard.serve.launch``);
clients are asyncio + httpx in this process. Two phases on the same server:

1. ``load``: N clients stream at once, ``--disconnect-frac`` of them close the
   connection after a random number of chunks. Checks: every completed request
   is whole ([DONE], finish_reason length, usage = max_tokens, at most one chunk
   per token); afterwards the engine holds no sequence and no KV block and
   aborted == hung up (read from ``/metrics``). Reports p50/p99 TTFT and
   the gap between chunks. A stream whose reader falls behind the engine gets
   several tokens in one chunk (the server coalesces), so chunks are counted
   and tokens come from ``usage``.
2. ``throughput``: the same N requests, none disconnecting: output tok/s.

Then the server is stopped (SIGTERM; exit status checked).
``server_vs_offline_throughput`` = server tok/s / offline tok/s on the
identical requests (target >= 0.9 on GPU).
Exits non-zero if a correctness check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from onecard.bench.results import save_figure, write_result
from onecard.serve.launch import start_server

MODEL_NAME = "bench"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, 100 clients; output to a temp dir")
    p.add_argument("--model", default=None, help="model folder (default: a random-weight --arch checkpoint)")
    p.add_argument("--arch", default="llama-2-7b")
    p.add_argument("--size", default=None, choices=("tiny", "small", "full"), help="default: full (GPU), tiny (smoke)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 (GPU), float32 (smoke)")
    p.add_argument("--clients", type=int, default=None, help="concurrent streaming clients (default 256; smoke 100)")
    p.add_argument("--disconnect-frac", type=float, default=0.1)
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 256 (GPU), 16 (smoke)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 256 (GPU), 24 (smoke)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds the server may take to load")
    p.add_argument("--no-offline", action="store_true", help="skip the offline-engine comparison")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    a = p.parse_args()
    gpu = not a.smoke
    a.size = a.size or ("full" if gpu else "tiny")
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.clients = a.clients or (256 if gpu else 100)
    a.prompt_tokens = a.prompt_tokens or (256 if gpu else 16)
    a.max_tokens = a.max_tokens or (256 if gpu else 24)
    if a.clients < 1 or a.prompt_tokens < 1 or a.max_tokens < 2 or not 0 <= a.disconnect_frac < 1:
        p.error("--clients, --prompt-tokens >= 1, --max-tokens >= 2, 0 <= --disconnect-frac < 1")
    if a.request_timeout <= 0 or a.startup_timeout <= 0:
        p.error("timeouts must be > 0")
    return a


# ---- server process ---------------------------------------------------------------------------------------------


def serve_args(a: argparse.Namespace) -> list[str]:
    return ["--served-model-name", MODEL_NAME, "--dtype", a.dtype, "--max-model-len", str(a.prompt_tokens + a.max_tokens),
            "--max-num-seqs", str(min(a.clients, 256)), "--gpu-memory-utilization", str(a.gpu_memory_utilization),
            "--shutdown-timeout", "10"]


def read_metrics(url: str) -> dict[str, float]:
    """Unlabelled gauges/counters plus label-summed counters, by sample name."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split()[0]
        out[name] = out.get(name, 0.0) + float(line.split()[-1])
    return out


# ---- clients ----------------------------------------------------------------------------------------------------


@dataclass
class ClientResult:
    disconnect_after: int | None  # chunks to read before hanging up (None: read to the end)
    max_tokens: int
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between successive chunks
    chunks: int = 0  # choice chunks received (each holds one or more tokens)
    done: bool = False  # saw data: [DONE]
    finish_reason: str | None = None
    hung_up: bool = False  # left before the last chunk (a fast, coalesced stream may end before disconnect_after)
    usage_tokens: int | None = None
    error: str | None = None
    t_end: float = 0.0

    @property
    def whole(self) -> bool:
        return (self.done and self.error is None and self.finish_reason == "length"
                and self.usage_tokens == self.max_tokens and 1 <= self.chunks <= self.max_tokens)


async def one_client(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int, seed: int,
                     disconnect_after: int | None, timeout: float) -> ClientResult:
    r = ClientResult(disconnect_after, max_tokens)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 1.0, "seed": seed, "stream_options": {"include_usage": True}}

    async def stream() -> None:
        t0 = last = time.perf_counter()
        async with http.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    r.done = True
                    return
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = chunk["error"]["message"]
                    continue
                if chunk.get("usage"):
                    r.usage_tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    now = time.perf_counter()
                    r.chunks += 1
                    if r.ttft is None:
                        r.ttft = now - t0
                    else:
                        r.gaps.append(now - last)
                    last = now
                    r.finish_reason = c.get("finish_reason") or r.finish_reason
                if disconnect_after is not None and r.chunks >= disconnect_after and r.finish_reason is None:
                    r.hung_up = True
                    return  # leaving the 'async with' closes the connection mid-stream

    try:
        await asyncio.wait_for(stream(), timeout)
    except (httpx.HTTPError, asyncio.TimeoutError) as err:
        r.error = f"{type(err).__name__}: {err}"
    r.t_end = time.perf_counter()
    return r


async def run_phase(url: str, prompts: list[list[int]], max_tokens: int, disconnects: dict[int, int],
                    timeout: float) -> tuple[list[ClientResult], float]:
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=60)) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, url, p, max_tokens, i, disconnects.get(i), timeout)
                                         for i, p in enumerate(prompts)))
    return list(results), time.perf_counter() - t0


def wait_idle(url: str, seconds: float = 60.0) -> dict[str, float]:
    """Poll /metrics until the engine holds nothing (bounded); returns the last reading."""
    deadline = time.monotonic() + seconds
    while True:
        m = read_metrics(url)
        idle = (m.get("onecard_num_requests_running", 1) == 0 and m.get("onecard_num_requests_waiting", 1) == 0
                and m.get("onecard_kv_cache_blocks_used", 1) == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


# ---- workload ---------------------------------------------------------------------------------------------------


def make_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens of real text (Python stdlib sources), all different."""
    from onecard.testing import local_corpus

    corpus = local_corpus(max_bytes=max(1_000_000, n * length * 6))
    ids = tokenizer.encode("\n".join(corpus.validation + corpus.train))
    if len(ids) < length * n:
        raise SystemExit(f"the local corpus has {len(ids)} tokens, fewer than {n} x {length}; lower --clients or "
                         "--prompt-tokens")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def offline_throughput(model: Path, a: argparse.Namespace, prompts: list[list[int]]) -> tuple[float, int, float]:
    """The engine alone (``LLM.generate``) on the server's workload; its GPU memory is given back before returning,
    so the server that starts next gets the same card."""
    import gc

    import torch

    from onecard.engine import LLM, SamplingParams

    threads = torch.get_num_threads()
    if a.smoke:
        # The server's engine steps in a background thread, where torch uses one CPU thread; the main thread's
        # default team spins and runs ~10x slower on a shared 2-core machine. Same threads, same comparison.
        torch.set_num_threads(1)
    llm = LLM(model, dtype=a.dtype, gpu_memory_utilization=a.gpu_memory_utilization,
              max_model_len=a.prompt_tokens + a.max_tokens, max_num_seqs=min(a.clients, 256),
              device="cpu" if a.smoke else None)
    params = [SamplingParams(max_tokens=a.max_tokens, ignore_eos=True, temperature=1.0, seed=i)
              for i in range(len(prompts))]
    llm.generate(prompts[:min(8, len(prompts))], params[:min(8, len(prompts))], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    del llm, outs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated() / 2**30
        if left > 1.0:
            raise SystemExit(f"the offline engine left {left:.1f} GiB allocated on the GPU; the server would start "
                             "on a smaller card than the engine had")
    torch.set_num_threads(threads)
    return tokens / dt, tokens, dt


# ---- main -------------------------------------------------------------------------------------------------------


def main() -> int:
    a = parse()
    console = Console()
    from transformers import AutoTokenizer

    if a.model:
        model = Path(a.model)
    else:
        import torch

        from onecard.testing import make_random_checkpoint

        with console.status(f"random-weight {a.arch} ({a.size}, {a.dtype}) checkpoint (cached after the first run)"):
            model = make_random_checkpoint(a.arch, a.size, dtype=a.dtype,
                                           device="cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
        if torch.cuda.is_available():  # give the GPU memory of the freshly built weights back for the server
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = make_prompts(tokenizer, a.clients, a.prompt_tokens)
    rng = random.Random(0)
    n_disc = round(a.clients * a.disconnect_frac)
    disconnects = {i: rng.randint(1, a.max_tokens // 2) for i in rng.sample(range(a.clients), n_disc)}

    offline_tok_s = offline_tokens = offline_s = None
    if not a.no_offline:  # first, on the bare card, then freed: the server gets the same GPU memory
        with console.status("offline engine (LLM.generate) on the same requests"):
            offline_tok_s, offline_tokens, offline_s = offline_throughput(model, a, prompts)
        console.print(f"offline engine: {offline_tok_s:.0f} output tok/s ({offline_tokens} tokens in {offline_s:.1f} s)")

    failures: list[str] = []
    console.print("starting onecard serve (the model loads; /health says 200 when ready)")
    with start_server(model, serve_args(a), cpu=a.smoke, timeout=a.startup_timeout) as server:
        url = server.url
        before = read_metrics(url)
        console.print(f"[bold]load[/]: {a.clients} streaming clients, {n_disc} disconnect mid-stream")
        load, load_s = asyncio.run(run_phase(url, prompts, a.max_tokens, disconnects, a.request_timeout))
        after_load = wait_idle(url)
        console.print(f"[bold]throughput[/]: {a.clients} streaming clients, none disconnect")
        thr, thr_s = asyncio.run(run_phase(url, prompts, a.max_tokens, {}, a.request_timeout))
        after_thr = wait_idle(url)
    rc = server.returncode
    if rc != 0:
        failures.append(f"server exit status after SIGTERM was {rc}, not 0 (log {server.log_path})")

    completed = [r for r in load if r.disconnect_after is None]
    broken = [r for r in completed + thr if not r.whole]
    if broken:
        b = broken[0]
        failures.append(f"{len(broken)} completed requests not whole (e.g. done={b.done} finish={b.finish_reason} "
                        f"chunks={b.chunks} usage={b.usage_tokens} error={b.error})")
    disc_errors = [r for r in load if r.disconnect_after is not None and r.error]
    if disc_errors:
        failures.append(f"{len(disc_errors)} disconnecting clients failed before hanging up: {disc_errors[0].error}")
    for label, m in (("load", after_load), ("throughput", after_thr)):
        for key in ("onecard_kv_cache_blocks_used", "onecard_num_requests_running", "onecard_num_requests_waiting"):
            if m.get(key, -1) != 0:
                failures.append(f"after the {label} phase {key} = {m.get(key)} (leak)")
    hung_up = sum(r.hung_up for r in load)
    if n_disc and not hung_up:
        failures.append(f"none of the {n_disc} disconnecting clients hung up before its stream ended")
    aborted = after_load.get("onecard_requests_aborted_total", 0) - before.get("onecard_requests_aborted_total", 0)
    if aborted != hung_up:
        failures.append(f"{aborted:.0f} requests aborted for {hung_up} clients that hung up mid-stream")

    ttft = [r.ttft for r in load if r.ttft is not None]
    gaps = [x for r in load for x in r.gaps]
    server_tokens = sum(r.usage_tokens or 0 for r in thr)
    server_tok_s = server_tokens / thr_s

    data = {
        "model": f"{a.arch} ({a.size}, random weights)" if not a.model else str(a.model),
        "dtype": a.dtype, "clients": a.clients, "disconnecting_clients": n_disc, "hung_up_mid_stream": hung_up,
        "prompt_tokens": a.prompt_tokens,
        "max_tokens": a.max_tokens, "server_startup_s": round(server.startup_s, 2),
        "load_phase_s": round(load_s, 3), "completed_whole": sum(r.whole for r in completed),
        "completed_total": len(completed), "aborted_by_disconnect": aborted,
        "kv_blocks_used_after": after_load.get("onecard_kv_cache_blocks_used"),
        "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
        "chunk_gap_p50_ms": 1e3 * pct(gaps, 50) if gaps else None,
        "chunk_gap_p99_ms": 1e3 * pct(gaps, 99) if gaps else None,
        "chunk_gap_mean_ms": 1e3 * statistics.fmean(gaps) if gaps else None,
        "server_tokens_per_chunk": server_tokens / max(1, sum(r.chunks for r in thr)),
        "load_chunks_per_s": sum(r.chunks for r in load) / load_s,
        "server_output_tok_s": server_tok_s, "server_tokens": server_tokens, "server_phase_s": round(thr_s, 3),
        "offline_output_tok_s": offline_tok_s, "offline_tokens": offline_tokens,
        "offline_s": round(offline_s, 3) if offline_s else None,
        "server_vs_offline_throughput": server_tok_s / offline_tok_s if offline_tok_s else None,
        "target_server_vs_offline": 0.9, "server_exit_status": rc, "checks_passed": not failures,
        "failures": failures,
    }
    out = a.out or (tempfile.mkdtemp(prefix="serve_load_") if a.smoke else None)
    path = write_result("serve_load", data, out)
    table = Table("metric", "value", title=f"onecard serve load test ({data['model']}, {a.dtype})")
    for k in ("clients", "disconnecting_clients", "hung_up_mid_stream", "completed_whole", "completed_total", "aborted_by_disconnect",
              "kv_blocks_used_after", "ttft_p50_ms", "ttft_p99_ms", "chunk_gap_p50_ms", "chunk_gap_p99_ms",
              "server_tokens_per_chunk", "server_output_tok_s",
              "offline_output_tok_s", "server_vs_offline_throughput", "server_exit_status"):
        v = data[k]
        table.add_row(k, f"{v:.3g}" if isinstance(v, float) else str(v))
    console.print(table)
    fig_path = plot(data, ttft, gaps, out)
    console.print(f"wrote {path} and {fig_path}")
    for f in failures:
        console.print(f"[bold red]FAIL[/] {f}")
    return 1 if failures else 0


def plot(data: dict, ttft: list[float], gaps: list[float], out) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].hist([1e3 * t for t in ttft], bins=40, color="tab:blue")
    ax[0].set(title=f"TTFT, {data['clients']} clients (p50 {data['ttft_p50_ms']:.0f} ms)", xlabel="ms", ylabel="requests")
    if gaps:
        ax[1].hist([1e3 * t for t in gaps], bins=60, color="tab:orange")
        ax[1].set(title=f"gap between chunks (p50 {data['chunk_gap_p50_ms']:.1f} ms, "
                        f"{data['server_tokens_per_chunk']:.2f} tokens/chunk)", xlabel="ms", ylabel="chunks")
    bars = {"server": data["server_output_tok_s"]}
    if data["offline_output_tok_s"]:
        bars["offline engine"] = data["offline_output_tok_s"]
    ax[2].bar(list(bars), list(bars.values()), color=["tab:green", "tab:gray"][:len(bars)])
    ratio = data["server_vs_offline_throughput"]
    ratio = f" (server/offline {ratio:.2f})" if ratio else ""
    ax[2].set(title=f"output tok/s{ratio}", ylabel="tokens / s")
    fig.tight_layout()
    return save_figure(fig, "serve_load", out)


if __name__ == "__main__":
    sys.exit(main())
