"""``onecard bench MODEL --table``: the inference comparison table, every row in one process on one device.

Rows (``ROWS``): HF bf16 eager, HF int8 (bitsandbytes when importable, else
onecard's int8 ``QuantLinear`` inside the HF model: the row says which),
onecard bf16, onecard int8, onecard int4 (RTN on the fly, or the GPTQ/AWQ
folder given as ``quantized``), onecard int4 + fp8 KV cache. A row that cannot
run says why (``status`` "not built" for a ``NotBuiltYetError``, "failed" with
the error otherwise) instead of stopping the table.

Columns, all measured on the same prompts (seeded, from ``engine_bench``):
bs=1 decode tok/s and ms/token; TTFT of a ``ttft_prompt_len``-token prompt;
offline throughput over ``num_prompts`` lognormal prompts (HF on the first
``hf_prompts``, per useful token, the JSON says so); peak GiB (torch allocator,
the engine's preallocated KV cache included); max context of one sequence under
the ``memory_cap_gib`` process cap, found by binary search over max_model_len
(engine: does start-up, profile and KV sizing succeed; HF: does a prefill of
that many tokens with its cache fit); % of the bandwidth roofline (weight +
KV bytes of one decode step / the card's bandwidth from ``onecard.hardware``,
or the measured copy bandwidth where the card is not in the catalog).
Every run is under the cap (a 24 GB card), so peak and throughput are a 4090's
budget. A value that is not measured is None with its reason in ``reasons``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from onecard.bench.engine_bench import (EngineBenchConfig, _engine_decode, _engine_offline, _hf_batched,
                                        _hf_decode_ms, _peak_gib, _peak_reset, _sync, measure_copy_bandwidth,
                                        queued, workload)
from onecard.bench.results import free_memory, memory_capped
from onecard.errors import BadInputError, DoesNotFitError, NotBuiltYetError, OnecardError

ROWS = ("hf-bf16", "hf-int8", "onecard-bf16", "onecard-int8", "onecard-int4", "onecard-int4-fp8kv", "onecard-fp8-fp8kv")
COLUMNS = ("bs1_tok_s", "ms_per_token", "ttft_ms", "offline_tok_s", "peak_gib", "max_context_tokens", "roofline_pct")
COLUMN_TITLES = ("bs=1 tok/s", "ms/token", "TTFT ms", "offline tok/s", "peak GiB", "max context", "% roofline")


@dataclass
class TableConfig:
    model: str | Path
    quantized: str | Path | None = None  # a GPTQ/AWQ folder of the same model for the int4 rows (else RTN)
    dtype: str = "bfloat16"
    device: str | None = None
    rows: tuple[str, ...] = ROWS
    num_prompts: int = 1000
    mean_input: int = 256
    mean_output: int = 256
    hf_prompts: int = 64
    hf_batch: int = 32
    decode_prompt_len: int = 128
    decode_tokens: int = 128
    ttft_prompt_len: int = 2048
    max_model_len: int = 4096
    max_num_seqs: int = 256
    memory_cap_gib: float | None = 24.0
    search_step: int = 1024  # max-context granularity (tokens)
    search_max: int | None = None  # upper end of the search (default: the model's max_position_embeddings)
    cpu_kv_budget_mib: float = 1.0  # CPU only: the fake KV budget the max-context search runs against
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [r for r in self.rows if r not in ROWS]
        if bad:
            raise BadInputError(f"unknown table row {bad[0]!r}; choose from {', '.join(ROWS)}")
        if self.ttft_prompt_len >= self.max_model_len:
            raise BadInputError(f"ttft_prompt_len={self.ttft_prompt_len} must be below max_model_len={self.max_model_len}")
        if self.search_step < 1:
            raise BadInputError("search_step must be a positive number of tokens")

    def bench_config(self) -> EngineBenchConfig:
        """The ``engine_bench`` settings its shared helpers (workload, decode timing) read."""
        return EngineBenchConfig(self.model, self.dtype, self.device, num_prompts=self.num_prompts,
                                 mean_input=self.mean_input, mean_output=self.mean_output, seed=self.seed,
                                 max_model_len=self.max_model_len, decode_prompt_len=self.decode_prompt_len,
                                 decode_tokens=self.decode_tokens, hf_prompts=self.hf_prompts, hf_batch=self.hf_batch,
                                 memory_cap_gib=None, max_num_seqs=self.max_num_seqs)


def smoke_config(model: str | Path, quantized: str | Path | None = None) -> TableConfig:
    """Tiny workload on CPU (< 2 min for a tiny model): every row and column runs, the numbers mean nothing."""
    return TableConfig(model, quantized, dtype="float32", device="cpu", num_prompts=6, mean_input=16, mean_output=8,
                       hf_prompts=4, hf_batch=4, decode_prompt_len=12, decode_tokens=8, ttft_prompt_len=96,
                       max_model_len=192, max_num_seqs=8, memory_cap_gib=None, search_step=64)


def max_fitting(fits: Callable[[int], bool], step: int, hi: int) -> int:
    """Largest multiple of ``step`` in [step, hi] (or ``hi`` itself) for which ``fits`` holds, by binary search
    (``fits`` must be monotone: shorter always fits when longer does); 0 when even ``step`` does not fit."""
    points = [*range(step, hi, step), hi]
    lo, up = 0, len(points)  # points[:lo] fit, points[up:] do not
    while lo < up:
        mid = (lo + up) // 2
        if fits(points[mid]):
            lo = mid + 1
        else:
            up = mid
    return points[lo - 1] if lo else 0


# ---- rows -------------------------------------------------------------------------------------------------------
def _row_spec(row: str, cfg: TableConfig) -> dict:
    """Label, weight format and KV dtype of a row (what its roofline counts)."""
    quant_int4 = "GPTQ/AWQ folder" if cfg.quantized else "RTN g128 on the fly"
    return {
        "hf-bf16": dict(label=f"HF {cfg.dtype} eager", fmt="bf16", kv="auto"),
        "hf-int8": dict(label="HF int8", fmt="int8", kv="auto"),
        "onecard-bf16": dict(label=f"onecard {cfg.dtype}", fmt="bf16", kv="auto"),
        "onecard-int8": dict(label="onecard int8", fmt="int8", kv="auto", note="RTN per-channel on the fly"),
        "onecard-int4": dict(label="onecard int4", fmt="int4", kv="auto", note=quant_int4),
        "onecard-int4-fp8kv": dict(label="onecard int4 + fp8 KV", fmt="int4", kv="fp8", note=quant_int4),
        "onecard-fp8-fp8kv": dict(label="onecard fp8 + fp8 KV", fmt="fp8", kv="fp8",
                                  note="fp8 weights and activations on the fly (W8A8)"),
    }[row]


def _hf_model(row: str, cfg: TableConfig, device: torch.device):
    """(model, note): HF bf16, or HF int8 through bitsandbytes on a GPU where it is importable, else through
    onecard's QuantLinear."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if row == "hf-int8" and device.type == "cuda" and has_bnb:
        from transformers import BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=dtype, device_map={"": device},
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        return model.eval(), "bitsandbytes LLM.int8()"
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=dtype).to(device).eval()
    if row == "hf-bf16":
        return model, "transformers generate, dynamic cache"
    from onecard.quant import quantize_model_

    quantize_model_(model, "int8")
    why = "bitsandbytes not importable" if not has_bnb else "no CUDA (bitsandbytes' LLM.int8() is a GPU path)"
    return model, f"{why}: onecard's int8 QuantLinear inside the HF model"


def _hf_ttft_ms(model, n: int, vocab: int, seed: int) -> float:
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (1, n), generator=g).to(dev) for _ in range(2)]
    times = []
    for x in ids:  # the first is the warm-up
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, pad_token_id=0)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return times[-1] * 1e3


def _hf_fits(model, n: int, vocab: int) -> bool:
    """Does HF's prefill of ``n`` tokens, keeping its cache, fit under the cap (one forward, last logits only)?"""
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(torch.randint(3, vocab, (1, n), device=dev), use_cache=True, logits_to_keep=1)
        del out
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        free_memory()


def _hf_offline_fitting(model, reqs, batch: int, progress) -> tuple[int, float]:
    """(batch, useful tok/s) of HF batched generate at the largest batch, halving from ``batch``, that fits the
    cap: what an HF user under a 24 GiB card would settle for, rather than no figure at all."""
    while True:
        try:
            seconds, useful, _ = _hf_batched(model, reqs, batch, progress)
            return batch, useful / seconds
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
        finally:
            free_memory()


def run_hf_row(row: str, cfg: TableConfig, reqs, device: torch.device, progress, vocab: int, hi: int) -> dict:
    out: dict = {"reasons": {}}
    model, out["note"] = _hf_model(row, cfg, device)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    prompt = torch.randint(3, vocab, (1, cfg.decode_prompt_len), generator=g).to(device)
    with torch.no_grad():
        ms = _hf_decode_ms(model, prompt, cfg.decode_tokens)
        out.update(bs1_tok_s=1e3 / ms, ms_per_token=ms, ttft_ms=_hf_ttft_ms(model, cfg.ttft_prompt_len, vocab, cfg.seed + 5))
        first = min(cfg.hf_batch, cfg.hf_prompts)
        batch, offline = _hf_offline_fitting(model, queued(reqs[:cfg.hf_prompts], cfg.bench_config().offline_order),
                                             first, progress)
    out["offline_tok_s"] = offline
    out["reasons"]["offline_tok_s"] = (f"HF batched generate on {min(cfg.hf_prompts, len(reqs))} of {len(reqs)} prompts "
                                       f"(batches of {batch}" + (f"; {first} ran out of memory under the cap"
                                                                 if batch < first else "")
                                       + "), per useful token")
    out["peak_gib"] = _peak_gib(device)
    if device.type == "cuda":
        out["max_context_tokens"] = max_fitting(lambda n: _hf_fits(model, n, vocab), cfg.search_step, hi)
    else:
        out["max_context_tokens"] = None
        out["reasons"]["peak_gib"] = "CPU: no CUDA allocator peak"
        out["reasons"]["max_context_tokens"] = "CPU: no memory cap for an HF prefill to search under"
    model = None  # free it (a closure above holds the name)
    return out


def _engine_fits(model, cfg: TableConfig, kv: str, device: torch.device, n: int) -> bool:
    """Do start-up, profile and KV sizing succeed for one ``n``-token sequence (the weights already loaded)?"""
    from onecard.engine.config import EngineConfig
    from onecard.engine.model_runner import ModelRunner, kv_bytes_per_token

    ec = EngineConfig(cfg.model, cfg.dtype, max_model_len=n, max_num_seqs=1, enforce_eager=True,
                      kv_cache_dtype=kv, device=str(device))
    ec.resolve(model.args.max_position_embeddings)
    if device.type == "cpu":  # CPU sizes its cache without a budget: give it the fake one
        block_bytes = kv_bytes_per_token(model, next(model.parameters()).dtype) * ec.block_size
        ec.num_kv_blocks = max(1, int(cfg.cpu_kv_budget_mib * (1 << 20)) // block_bytes)
    try:
        runner = ModelRunner(model, ec, device)
        del runner
        return True
    except (DoesNotFitError, torch.cuda.OutOfMemoryError):
        return False
    finally:
        for layer in model.layers:  # drop this try's cache before the next one allocates
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        free_memory()


def run_engine_row(row: str, cfg: TableConfig, reqs, device: torch.device, progress, vocab: int, hi: int) -> dict:
    from onecard.engine import LLM, SamplingParams

    spec = _row_spec(row, cfg)
    out: dict = {"reasons": {}, "note": spec.get("note", "")}
    quantized = row in ("onecard-int4", "onecard-int4-fp8kv") and cfg.quantized is not None
    quantization = {"onecard-int8": "int8", "onecard-int4": "rtn-int4", "onecard-int4-fp8kv": "rtn-int4",
                    "onecard-fp8-fp8kv": "fp8"}.get(row)
    llm = LLM(cfg.quantized if quantized else cfg.model, dtype=cfg.dtype, device=str(device),
              max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs, kv_cache_dtype=spec["kv"],
              quantization=None if quantized else quantization)
    ecfg = cfg.bench_config()
    ms, _ = _engine_decode(llm, ecfg, vocab)
    out.update(bs1_tok_s=1e3 / ms, ms_per_token=ms)
    g = torch.Generator().manual_seed(cfg.seed + 5)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for _ in range(2):  # the first is the warm-up; fresh random tokens each time, so no prefix-cache hit
        r = llm.generate([torch.randint(3, vocab, (cfg.ttft_prompt_len,), generator=g).tolist()], sp, use_tqdm=False)[0]
    out["ttft_ms"] = (r.metrics["first_token_time"] - r.metrics["arrival_time"]) * 1e3
    out["offline_tok_s"] = _engine_offline(llm, queued(reqs, ecfg.offline_order), progress, row)["output_tok_s"]
    out["peak_gib"] = _peak_gib(device)
    if device.type == "cpu":
        out["reasons"]["peak_gib"] = "CPU: no CUDA allocator peak"
        out["reasons"]["max_context_tokens"] = f"CPU: searched against a fake {cfg.cpu_kv_budget_mib} MiB KV budget"
    model = llm.engine.runner.model
    del llm
    for layer in model.layers:
        layer.self_attn.k_cache = layer.self_attn.v_cache = None
    _peak_reset(device)
    out["max_context_tokens"] = max_fitting(lambda n: _engine_fits(model, cfg, spec["kv"], device, n), cfg.search_step, hi)
    return out


# ---- the table --------------------------------------------------------------------------------------------------
def _bandwidth(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        from onecard.hardware import find_gpu

        try:
            card = find_gpu(torch.cuda.get_device_name(device))
            return card.bandwidth_gbs, f"{card.name} catalog bandwidth ({card.source})"
        except BadInputError:
            pass
    return measure_copy_bandwidth(device), "measured copy bandwidth (device not in the catalog)"


def run_table(cfg: TableConfig, console=None) -> dict:
    """Run every row; returns the flat result (``rows`` is a list of dicts keyed by ``COLUMNS`` + row facts)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from onecard.bench.results import gpu_name
    from onecard.engine.llm import resolve_device
    from onecard.plan import resolve_model
    from onecard.plan import memory as M
    from onecard.plan.speed import decode_bytes_per_step

    console = console or Console()
    device = resolve_device(cfg.device)
    spec = resolve_model(str(cfg.model))
    vocab = spec.args.vocab_size
    reqs = workload(cfg.bench_config(), vocab)
    hi = min(cfg.search_max or spec.args.max_position_embeddings, spec.args.max_position_embeddings)
    bw, bw_basis = _bandwidth(device)
    avg_ctx = cfg.decode_prompt_len + cfg.decode_tokens / 2
    result = {"model": str(cfg.model), "architecture": spec.args.architecture, "parameters": spec.num_parameters(),
              "device": str(device), "device_name": gpu_name(), "bandwidth_gbs": bw, "bandwidth_basis": bw_basis,
              "memory_cap_gib": cfg.memory_cap_gib if device.type == "cuda" else None,
              "workload_mean_input": sum(len(p) for p, _ in reqs) / len(reqs),
              "workload_mean_output": sum(o for _, o in reqs) / len(reqs),
              **{f"config_{k}": v for k, v in asdict(cfg).items() if k != "model"}, "rows": []}
    with memory_capped(device, cfg.memory_cap_gib):
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            for row in cfg.rows:
                rs = _row_spec(row, cfg)
                step_bytes = decode_bytes_per_step(spec, rs["fmt"]) + avg_ctx * M.kv_bytes_per_token(spec, rs["kv"])
                entry = {"row": row, "label": rs["label"], "weight_format": rs["fmt"], "kv_cache_dtype": rs["kv"],
                         "bytes_per_step": step_bytes, "status": "ok", "note": rs.get("note", "")}
                _peak_reset(device)
                try:
                    run = run_hf_row if row.startswith("hf-") else run_engine_row
                    entry.update(run(row, cfg, reqs, device, progress, vocab, hi))
                    entry["roofline_pct"] = 100 * entry["bs1_tok_s"] * step_bytes / (bw * 1e9)
                except NotBuiltYetError as exc:
                    entry.update(status="not built", reason=str(exc))
                except (OnecardError, RuntimeError) as exc:  # recorded, not hidden: one row failing is a finding
                    entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                finally:
                    _peak_reset(device)
                for col in COLUMNS:
                    entry.setdefault(col, None)
                result["rows"].append(entry)
                console.print(f"[dim]{rs['label']}: {entry['status']}[/]")
    return result


def merge_tables(parts: list[dict]) -> dict:
    """One table from runs of disjoint row sets (``--rows``) on the same card, model and settings: a table whose
    rows together outlast one device call. Rows come back in ``ROWS`` order; ``command`` lists every part's."""
    if len(parts) < 2:
        raise BadInputError("merge needs two or more bench_table JSON files")
    same = ("gpu", "torch", "model", "device_name", "bandwidth_gbs", "memory_cap_gib",
            *(k for k in parts[0] if k.startswith("config_") and k != "config_rows"))
    for part in parts[1:]:
        diff = [k for k in same if part.get(k) != parts[0].get(k)]
        if diff:
            raise BadInputError(f"cannot merge tables that differ in {', '.join(diff)}: rerun the rows with the same "
                                "settings on the same card")
    rows = [e for part in parts for e in part["rows"]]
    names = [e["row"] for e in rows]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadInputError(f"rows measured twice across the merged tables: {twice}; merge disjoint --rows runs")
    rows.sort(key=lambda e: ROWS.index(e["row"]))
    return {**parts[0], "date": max(p["date"] for p in parts), "command": " && ".join(p["command"] for p in parts),
            "config_rows": [e["row"] for e in rows], "rows": rows}


def _cell(entry: dict, col: str) -> str:
    v = entry.get(col)
    if v is None:
        return "-"
    return f"{v:,}" if col == "max_context_tokens" else f"{v:,.2f}" if col in ("ms_per_token", "peak_gib") else f"{v:,.1f}"


def table_markdown(r: dict) -> str:
    """The table as Markdown, with the device, the cap and every row's note or reason under it."""
    lines = [f"{r['architecture']} on {r['device_name']}"
             + (f", {r['memory_cap_gib']:g} GiB process cap" if r.get("memory_cap_gib") else "")
             + f"; roofline: {r['bandwidth_basis']}, {r['bandwidth_gbs']:.0f} GB/s", "",
             "| path | " + " | ".join(COLUMN_TITLES) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    notes = []
    for e in r["rows"]:
        if e["status"] != "ok":
            lines.append(f"| {e['label']} | {e['status']}: see note |" + " |" * (len(COLUMNS) - 1))
            notes.append(f"- {e['label']}: {e['status']}: {e['reason']}")
            continue
        lines.append(f"| {e['label']} | " + " | ".join(_cell(e, c) for c in COLUMNS) + " |")
        why = "; ".join([e["note"]] * bool(e["note"]) + [f"{c}: {w}" for c, w in e.get("reasons", {}).items()])
        if why:
            notes.append(f"- {e['label']}: {why}")
    return "\n".join(lines + [""] + notes) + "\n"


def table_figure(r: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in r["rows"] if e["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, col, title in zip(axes, ("bs1_tok_s", "offline_tok_s", "max_context_tokens"),
                              ("bs=1 decode tok/s", "offline output tok/s", "max context (one sequence)")):
        rows = [e for e in ok if e[col] is not None]
        ax.barh([e["label"] for e in rows], [e[col] for e in rows], color="tab:blue")
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle(f"{r['architecture']} on {r['device_name']}"
                 + (f", {r['memory_cap_gib']:g} GiB cap" if r.get("memory_cap_gib") else ""))
    fig.tight_layout()
    return fig


def write_table(r: dict, name: str = "bench_table", out_dir: str | Path | None = None) -> list[Path]:
    """``<name>.json`` (with run facts), ``<name>.md`` and ``<name>.png`` into ``out_dir`` (default docs/results)."""
    from onecard.bench.results import RESULTS_DIR, save_figure, write_result

    json_path = write_result(name, r, out_dir)
    md = Path(out_dir if out_dir is not None else RESULTS_DIR) / f"{name}.md"
    md.write_text(table_markdown(r))
    return [json_path, md, save_figure(table_figure(r), name, out_dir)]


def rich_table(r: dict):
    from rich.table import Table

    t = Table("path", *COLUMN_TITLES, title=table_markdown(r).splitlines()[0])
    for e in r["rows"]:
        cells = [_cell(e, c) for c in COLUMNS] if e["status"] == "ok" else [e["status"]] + [""] * (len(COLUMNS) - 1)
        t.add_row(e["label"], *cells)
    return t
