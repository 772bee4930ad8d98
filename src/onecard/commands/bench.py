"""``onecard bench MODEL --engine|--precision|--table``: measure inference or training paths side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from onecard.errors import BadInputError


def _engine(model: str, num_prompts: int, dtype: str, out: Path | None, console: Console) -> None:
    from onecard.bench.engine_bench import EngineBenchConfig, results_figure, results_table, run_engine_bench
    from onecard.bench.results import save_figure, write_result

    result = run_engine_bench(EngineBenchConfig(model, dtype=dtype, num_prompts=num_prompts,
                                                hf_prompts=min(64, num_prompts)), console)
    console.print(results_table(result))
    if out is not None:
        console.print(f"wrote {write_result('engine_bench', result, out)} and {save_figure(results_figure(result), 'engine_bench', out)}")


def _precision(model: str, seq_len: int, console: Console) -> None:
    from rich.table import Table

    from onecard.train.precision import benchmark_precision

    table = Table("mode", "tokens/s", "ms/step", "peak GiB", "loss", "note", title="forward+backward, fresh model per mode")
    for r in benchmark_precision(model, seq_len=seq_len):
        fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        table.add_row(r.mode, fmt(r.tokens_per_second, "{:.0f}"), fmt(r.ms_per_step, "{:.1f}"), fmt(r.peak_gib, "{:.2f}"),
                      fmt(r.loss, "{:.3f}"), r.skipped or "")
    console.print(table)


def _table(model: str, quantized: str | None, num_prompts: int | None, smoke: bool, out: Path | None,
           console: Console) -> None:
    from onecard.bench.table import TableConfig, rich_table, run_table, smoke_config, write_table

    cfg = smoke_config(model, quantized) if smoke else TableConfig(model, quantized)
    if num_prompts is not None:
        cfg.num_prompts = num_prompts
    result = run_table(cfg, console)
    console.print(rich_table(result))
    console.print("wrote " + ", ".join(str(p) for p in write_table(result, out_dir=out)))


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        model: str = typer.Argument(..., help="Local Hugging Face model folder."),
        engine: bool = typer.Option(False, "--engine", help="Engine vs HF generate: bs=1 decode, offline throughput, roofline %."),
        precision: bool = typer.Option(False, "--precision", help="Training precision modes: fp32/tf32/fp16/bf16(/fp8)."),
        table: bool = typer.Option(False, "--table", help="The full inference comparison table (bf16/int8/int4/fp8 KV)."),
        num_prompts: int = typer.Option(None, help="Prompts in the offline-throughput workload (--engine: 200, "
                                                    "--table: 1000)."),
        quantized: str = typer.Option(None, help="--table: a GPTQ/AWQ folder of MODEL for the int4 rows (else RTN)."),
        smoke: bool = typer.Option(False, "--smoke", help="--table: tiny workload on the CPU (a pipeline check)."),
        seq_len: int = typer.Option(512, help="--precision: sequence length."),
        dtype: str = typer.Option("bfloat16", help="--engine: weight dtype."),
        out: Path = typer.Option(None, help="Write JSON + PNG results into this folder (--table: default "
                                            "docs/results)."),
    ) -> None:
        """Benchmark one job's paths side by side in one process (default: --engine)."""
        modes = [m for m, on in (("engine", engine), ("precision", precision), ("table", table)) if on] or ["engine"]
        if len(modes) > 1:
            raise BadInputError(f"choose one of --engine, --precision, --table (got {', '.join('--' + m for m in modes)})")
        console = Console()
        if modes[0] == "engine":
            _engine(model, 200 if num_prompts is None else num_prompts, dtype, out, console)
        elif modes[0] == "precision":
            _precision(model, seq_len, console)
        else:
            _table(model, quantized, num_prompts, smoke, out, console)
