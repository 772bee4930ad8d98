"""The inference comparison table (issue 6.6): HF bf16/int8 vs onecard bf16/int8/int4/int4+fp8 KV, one process, one GPU.

    PYTHONPATH=src python benchmarks/bench_table.py            # H100: ~6-7 min (first run also builds the checkpoint)
    PYTHONPATH=src python benchmarks/bench_table.py --smoke    # CPU, tiny random model, ~1-2 min, writes to a temp dir
    # rows in two device calls on the same card, then one table:
    ... bench_table.py --rows hf-bf16,hf-int8,onecard-bf16 --out A; ... --rows onecard-int8,... --out B
    PYTHONPATH=src python benchmarks/bench_table.py --merge A/bench_table.json B/bench_table.json

Model: the random Llama-3.1-8B-arch bf16 checkpoint (Llama-3-8B weights shape
with a 128k rope context, so the max-context search under the 24 GiB cap has
room to find the limit), built on the GPU once and cached. Every row runs under
a ``--cap-gib`` process cap; see ``onecard.bench.table`` for what each column
measures. Writes docs/results/bench_table.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from onecard.bench.table import (
    ROWS,
    TableConfig,
    merge_tables,
    rich_table,
    run_table,
    smoke_config,
    write_table,
)
from onecard.testing.checkpoints import benchmark_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on the CPU; output to a temp dir")
    p.add_argument("--model", default=None, help="model folder (default: random llama-3.1-8b bf16, built on the GPU)")
    p.add_argument("--quantized", default=None, help="GPTQ/AWQ folder of the same model for the int4 rows (else RTN)")
    p.add_argument("--num-prompts", type=int, default=200, help="offline workload (1000 takes ~3 min more per row)")
    p.add_argument("--hf-prompts", type=int, default=32, help="prompts HF batched generate runs (per useful token)")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="write one table from bench_table JSONs of disjoint --rows runs on the same card")
    a = p.parse_args()
    console = Console()
    if a.merge:
        result = merge_tables([json.loads(Path(f).read_text()) for f in a.merge])
        console.print(rich_table(result))
        console.print("wrote " + ", ".join(str(p) for p in write_table(result, out_dir=a.out)))
        return
    rows = tuple(r for r in a.rows.split(",") if r)
    if a.smoke:
        from onecard.testing import make_random_checkpoint

        cfg = replace(smoke_config(a.model or make_random_checkpoint("llama-3-8b", "tiny"), a.quantized), rows=rows)
        out = a.out or tempfile.mkdtemp(prefix="bench_table_")
    else:
        model = benchmark_model(a.model, "llama-3.1-8b", console)
        cfg = TableConfig(model, a.quantized, rows=rows, num_prompts=a.num_prompts, hf_prompts=a.hf_prompts,
                          memory_cap_gib=a.cap_gib)
        out = a.out
    result = run_table(cfg, console)
    console.print(rich_table(result))
    console.print("wrote " + ", ".join(str(p) for p in write_table(result, out_dir=out)))


if __name__ == "__main__":
    main()
