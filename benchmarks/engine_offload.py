"""Weight offload on one GPU: a 70B-arch int4 model decoding under a 24 GiB cap, against the PCIe bound.

    PYTHONPATH=src python benchmarks/engine_offload.py           # H100: ~3-5 min, ~40 GiB host RAM, writes docs/results/
    PYTHONPATH=src python benchmarks/engine_offload.py --smoke   # CPU, tiny shapes, < 1 min, writes to a temp dir

Rows (random weights: values do not change the work):
- Llama-2-70B arch, int4 g128 (QuantLinear buffers filled with random codes directly,
  no dense 70B ever exists), under a ``--cap-gib`` process cap; the planner
  (``onecard.plan``) picks how many layers live in pinned host memory (+2 for the
  staging slots it does not count; 4 more at a time if start-up still does not fit). bs=1 decode tok/s vs
  the PCIe bound = measured pinned H2D bandwidth / offloaded bytes per token;
  ``fraction_of_pcie_bound`` (target >= 0.8) and the estimate the engine logs.
- Llama-2-7B arch bf16, 8 layers offloaded vs none (no cap): the cost of
  streaming next to the resident model (the resident run uses CUDA graphs, the
  offloaded one cannot).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.engine_bench import EngineBenchConfig, _engine_decode
from onecard.bench.results import gpu_name, memory_capped, save_figure, write_result
from onecard.testing.random_llama import in_memory_llm, random_llama

GiB = 1 << 30


def decode_row(label: str, model, offload: int, device, bench: EngineBenchConfig, h2d_gbs: float) -> dict:
    from onecard.engine.offload import expected_tok_s, resident_step_bytes

    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    llm, streamer = in_memory_llm(model, device, bench.max_model_len, offload=offload)
    ms, _ = _engine_decode(llm, bench, model.args.vocab_size)
    row = {"row": label, "offload_layers": offload, "num_layers": model.args.num_layers, "tok_s": 1e3 / ms,
           "ms_per_token": ms, "resident_step_gib": resident_step_bytes(model) / GiB,
           "cuda_graphs": bool(llm.engine.runner.graphs),
           "peak_gib": torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None}
    if streamer is not None:
        off = streamer.offloaded_bytes
        row.update(offloaded_gib=off / GiB, pcie_bound_tok_s=h2d_gbs * 1e9 / off,
                   fraction_of_pcie_bound=row["tok_s"] / (h2d_gbs * 1e9 / off),
                   expected_tok_s=expected_tok_s(off, resident_step_bytes(model), h2d_gbs, _card_bw(device)))
    return row


def _card_bw(device) -> float | None:
    from onecard.engine.offload import card_bandwidth_gbs

    return card_bandwidth_gbs(device)


def planned_offload(cfg: dict, cap_gib: float, max_model_len: int) -> int:
    """The planner's layer count for this card with its memory set to the cap."""
    from onecard.plan import plan_inference, resolve_card

    card = resolve_card(None) if torch.cuda.is_available() else resolve_card("4090")
    card = dataclasses.replace(card, memory_gib=cap_gib)
    plan = plan_inference(cfg, card, bits=4, max_model_len=max_model_len, max_num_seqs=1)
    return plan.offload_layers if not plan.fits else 0


def big_row(a, device, bench: EngineBenchConfig, h2d: float, console) -> dict:
    """70B-arch int4 under the cap; retries with 4 more layers offloaded while start-up does not fit."""
    from onecard.errors import DoesNotFitError

    size = "full" if not a.smoke else "tiny"
    t0 = time.perf_counter()
    model, cfg = random_llama("llama-2-70b", size, 4, torch.bfloat16 if device.type == "cuda" else torch.float32,
                              bench.max_model_len)
    build_s = time.perf_counter() - t0
    planned = planned_offload(cfg, a.cap_gib, bench.max_model_len)
    # + 2: the planner does not count the two staging slots, each one layer big
    n = min(model.args.num_layers, planned + 2) if not a.smoke else 2
    with memory_capped(device, a.cap_gib):
        row = None
        while row is None:
            console.print(f"[dim]70B-arch int4: {n} of {model.args.num_layers} layers offloaded...[/]")
            try:
                row = decode_row("llama-2-70b int4, cap", model, n, device, bench, h2d)
            except (DoesNotFitError, torch.cuda.OutOfMemoryError):
                if n >= model.args.num_layers:
                    raise
            if row is None:  # outside the except: the failed try's GPU tensors are released before the rebuild
                n = min(model.args.num_layers, n + 4)
                del model
                torch.cuda.empty_cache() if device.type == "cuda" else None
                model, cfg = random_llama("llama-2-70b", size, 4, torch.bfloat16 if device.type == "cuda"
                                          else torch.float32, bench.max_model_len)
    row.update(planned_offload_layers=planned, cap_gib=a.cap_gib if device.type == "cuda" else None, build_s=build_s)
    del model
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; output to a temp dir")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--decode-tokens", type=int, default=24)
    p.add_argument("--skip-7b", action="store_true", help="only the 70B-arch row")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    console = Console()
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke on CPU")
    device = torch.device("cpu" if a.smoke else "cuda")
    from onecard.engine.offload import measure_h2d_bandwidth

    h2d = measure_h2d_bandwidth(device, 256 << 20, 5)
    bench = EngineBenchConfig("<in-memory>", device=str(device), max_model_len=256 if a.smoke else 1024,
                              decode_prompt_len=16 if a.smoke else 32, decode_tokens=8 if a.smoke else a.decode_tokens)
    rows = [big_row(a, device, bench, h2d, console)]
    if not a.skip_7b:
        dtype = torch.float32 if a.smoke else torch.bfloat16
        size = "tiny" if a.smoke else "full"
        for n in (0, 2 if a.smoke else 8):
            model, _ = random_llama("llama-2-7b", size, None, dtype, bench.max_model_len)
            rows.append(decode_row(f"llama-2-7b {str(dtype).removeprefix('torch.')}, {n} offloaded", model, n, device,
                                   bench, h2d))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {"device_name": gpu_name(), "h2d_gbs": h2d, "decode_prompt_len": bench.decode_prompt_len,
              "decode_tokens": bench.decode_tokens, "rows": rows, **{k: v for k, v in rows[0].items() if k in (
                  "tok_s", "pcie_bound_tok_s", "fraction_of_pcie_bound", "expected_tok_s", "offload_layers")}}
    t = Table("row", "offloaded", "tok/s", "PCIe bound", "fraction", "estimate", "peak GiB",
              title=f"weight offload on {result['device_name']} (H2D {h2d:.1f} GB/s)")
    for r in rows:
        f = lambda k, fmt="{:.2f}": "-" if r.get(k) is None else fmt.format(r[k])  # noqa: E731
        t.add_row(r["row"], f"{r['offload_layers']}/{r['num_layers']}", f("tok_s"), f("pcie_bound_tok_s"),
                  f("fraction_of_pcie_bound"), f("expected_tok_s"), f("peak_gib"))
    console.print(t)
    out = a.out or (tempfile.mkdtemp(prefix="engine_offload_") if a.smoke else None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r["row"] for r in rows], [r["tok_s"] for r in rows], color="tab:blue", label="measured")
    ax.barh([r["row"] for r in rows if "pcie_bound_tok_s" in r], [r["pcie_bound_tok_s"] for r in rows
            if "pcie_bound_tok_s" in r], fill=False, edgecolor="tab:red", label="PCIe bound")
    ax.set_xlabel("bs=1 decode tok/s")
    ax.legend()
    fig.tight_layout()
    console.print(f"wrote {write_result('engine_offload', result, out)} and {save_figure(fig, 'engine_offload', out)}")


if __name__ == "__main__":
    main()
