"""int4 / int8 weight-only decode and prefill vs bf16 through onecard's engine, one process, one GPU.

    PYTHONPATH=src python benchmarks/quant_decode.py           # H100: ~6-10 min; random Llama-2-7B arch (bf16, ~13 GB cached)
    PYTHONPATH=src python benchmarks/quant_decode.py --smoke   # CPU, tiny random model, ~1 min, writes to a temp dir

Arms: bf16 engine; ``quantization="int8"`` (per-channel RTN) and ``"rtn-int4"``
(group 128, the GPTQ-g128 layout — speed does not depend on how the codes were
chosen) with onecard's kernels (the default: Triton, and on CUDA the Gluon tensor-core kernel
``kernels.wo_mma``: int4 at 2-64 rows, int8 at 1-32), on CUDA also without that kernel (``int4-triton-only``,
``int8-triton-only``: the same-process A/B)
and with PyTorch's tinygemm kernel (``int4_kernel="tinygemm"``); and ``"fp8"`` (e4m3 weights and activations, not weight-only:
``Fp8Linear``). Each arm: bs=1 and bs=16 decode (ms per step, tok/s; ``--more-batches`` adds batch sizes),
2k-token prefill (ms), peak GiB, and % of the bandwidth roofline: the bytes one
decode step must read (quantized linears' codes + scales + zeros, plus norms and
the LM head; the embedding reads one row) over the measured copy bandwidth.
A kernel table times QuantLinear vs nn.Linear alone on the 7B shapes at M = 1, 16, 2048.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import save_figure, write_result
from onecard.engine.offload import resident_step_bytes
from onecard.kernels import wo_mma
from onecard.testing.checkpoints import benchmark_model

GiB = 2**30
# arms without kernels.wo_mma, for the same-process A/B: arm -> the arm it is the A of
TRITON_ONLY = {"int4-triton-only": "int4", "int8-triton-only": "int8"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on CPU; output to a temp dir")
    p.add_argument("--model", default=None, help="float model folder (default: random llama-2-7b, bf16, built on the GPU)")
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--more-batches", default="", help="more decode batch sizes per arm, comma-separated (e.g. "
                   "2,4,8,32,64: from wo_matmul.dequant_min_rows rows int4/int8 take the dequantize + cuBLAS path)")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_ms(llm, batch: int, prompt_len: int, n: int, vocab: int) -> float:
    """Steady-state ms per decode step with ``batch`` sequences decoding together."""
    from onecard.engine import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    outs = llm.generate(prompts, sp, use_tqdm=False)
    first = max(o.metrics["first_token_time"] for o in outs)
    last = max(o.metrics["finished_time"] for o in outs)
    return (last - first) / (n - 1) * 1e3


def prefill_ms(llm, length: int, vocab: int, repeats: int = 5) -> float:
    from onecard.engine import SamplingParams

    g = torch.Generator().manual_seed(7)
    times = []
    for r in range(repeats + 1):
        prompt = torch.randint(3, vocab, (length,), generator=g).tolist()  # fresh tokens: no prefix-cache hits
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
        if r:
            times.append((out.metrics["first_token_time"] - out.metrics["arrival_time"]) * 1e3)
    return statistics.median(times)


def batch_sizes(a) -> list[int]:
    """The decode batches besides bs=1: ``--batch`` (the headline column) and ``--more-batches``."""
    return sorted({a.batch, *(int(b) for b in a.more_batches.split(",") if b.strip())} - {1})


def run_arm(model_dir, quantization, dtype: str, device: str, a, bandwidth_gbs: float, **engine_kwargs) -> dict:
    from onecard.engine import LLM

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    llm = LLM(str(model_dir), dtype=dtype, device=device, quantization=quantization,
              max_model_len=a.prefill_len + 64, max_num_seqs=max(batch_sizes(a), default=1),
              gpu_memory_utilization=0.85,
              **engine_kwargs)
    model = llm.engine.runner.model
    vocab = model.args.vocab_size
    nbytes = resident_step_bytes(model)  # every weight and quantized buffer, one embedding row
    r = {"bs1_ms_per_token": decode_ms(llm, 1, a.prompt_len, a.decode_tokens, vocab)}
    for b in batch_sizes(a):
        r[f"bs{b}_ms_per_step"] = decode_ms(llm, b, a.prompt_len, a.decode_tokens, vocab)
        r[f"bs{b}_tok_s"] = b * 1e3 / r[f"bs{b}_ms_per_step"]
    r["bs1_tok_s"] = 1e3 / r["bs1_ms_per_token"]
    r[f"prefill{a.prefill_len}_ms"] = prefill_ms(llm, a.prefill_len, vocab)
    r["step_weight_gib"] = nbytes / GiB
    r["bs1_roofline_ms"] = nbytes / (bandwidth_gbs * 1e9) * 1e3
    r["bs1_roofline_fraction"] = r["bs1_roofline_ms"] / r["bs1_ms_per_token"]
    r["peak_gib"] = torch.cuda.max_memory_allocated() / GiB if device.startswith("cuda") else None
    del llm, model
    gc.collect()
    return r


def kernel_table(device: str, dtype: torch.dtype, shapes, ms_list) -> dict:
    """QuantLinear (int4 g128, int8) vs nn.Linear alone: us per call and effective GB/s."""
    import copy

    from onecard.quant.linear import QuantLinear

    res = {}
    for K, N in shapes:
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        q4 = QuantLinear.from_linear(lin, 4, 128 if K % 128 == 0 else 32, sym=False)
        q8 = QuantLinear.from_linear(lin, 8, -1, sym=True)
        mods = [("float", lin), ("int8", q8), ("int4", q4)]
        tg = copy.deepcopy(q4)
        if device.startswith("cuda") and dtype == torch.bfloat16 and tg.to_tinygemm_():
            mods.append(("int4-tinygemm", tg))
        for M in ms_list:
            x = torch.randn(M, K, device=device, dtype=dtype)
            for name, mod in mods:
                with torch.no_grad():
                    for _ in range(3):
                        mod(x)
                    _sync(device)
                    reps = 50 if device.startswith("cuda") else 3
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        mod(x)
                    _sync(device)
                us = (time.perf_counter() - t0) / reps * 1e6
                wbytes = K * N * lin.weight.element_size() if name == "float" else mod.weight_bytes()
                res[f"kernel_{name}_{K}x{N}_m{M}_us"] = us
                res[f"kernel_{name}_{K}x{N}_m{M}_weight_gbs"] = wbytes / us / 1e3
    return res


def main() -> None:
    a = parse()
    console = Console()
    if a.smoke:
        from onecard.testing import make_random_checkpoint

        model_dir = a.model or make_random_checkpoint("llama-2-7b", "tiny")
        device, dtype, tdtype = "cpu", "float32", torch.float32
        a.decode_tokens, a.prompt_len, a.batch, a.prefill_len = 8, 16, 4, 128
        shapes, ms_list = [(256, 256)], [1, 16]
        out_dir = a.out or tempfile.mkdtemp(prefix="quant_decode_")
    else:
        model_dir = benchmark_model(a.model, "llama-2-7b", console)
        device, dtype, tdtype = "cuda", "bfloat16", torch.bfloat16
        shapes, ms_list = [(4096, 4096), (4096, 11008), (11008, 4096)], [1, 16, 2048]
        out_dir = a.out
    from onecard.bench.engine_bench import measure_copy_bandwidth

    bw = measure_copy_bandwidth(torch.device(device))
    fl = "bf16" if dtype == "bfloat16" else "fp32"  # the float arm, named for what it really ran
    arms = ((fl, None, {}), ("int8", "int8", {}), ("int4", "rtn-int4", {}))
    if device == "cuda":
        arms += (("int4-triton-only", "rtn-int4", {}), ("int8-triton-only", "int8", {}),
                 ("int4-tinygemm", "rtn-int4", {"int4_kernel": "tinygemm"}))
    arms += (("fp8", "fp8", {}),)
    result: dict = {"model": str(model_dir), "dtype": dtype, "copy_bandwidth_gbs": bw, "decode_tokens": a.decode_tokens,
                    "prompt_len": a.prompt_len, "batch": a.batch, "batches": batch_sizes(a),
                    "prefill_len": a.prefill_len}
    for name, quant, kw in arms:
        console.print(f"[bold]{name}[/] ...")
        wo_mma.set_enabled(name not in TRITON_ONLY)
        for k, v in run_arm(model_dir, quant, dtype, device, a, bw, **kw).items():
            result[f"{name}_{k}"] = v
    wo_mma.set_enabled(True)
    b = a.batch
    for name in [n for n, _, _ in arms[1:]]:
        result[f"{name}_speedup_bs1_vs_{fl}"] = result[f"{fl}_bs1_ms_per_token"] / result[f"{name}_bs1_ms_per_token"]
        for bb in batch_sizes(a):
            result[f"{name}_speedup_bs{bb}_vs_{fl}"] = (result[f"{fl}_bs{bb}_ms_per_step"]
                                                       / result[f"{name}_bs{bb}_ms_per_step"])
        result[f"{name}_prefill{a.prefill_len}_speed_ratio_vs_{fl}"] = (result[f"{fl}_prefill{a.prefill_len}_ms"]
                                                                       / result[f"{name}_prefill{a.prefill_len}_ms"])
    if device == "cuda":  # the same-process A/B of kernels.wo_mma
        for off, on in TRITON_ONLY.items():
            for bb in (1, *batch_sizes(a)):
                key = "bs1_ms_per_token" if bb == 1 else f"bs{bb}_ms_per_step"
                result[f"{on}_speedup_bs{bb}_vs_triton_only"] = result[f"{off}_{key}"] / result[f"{on}_{key}"]
    result.update(kernel_table(device, tdtype, shapes, ms_list))

    t = Table("arm", "bs=1 ms/tok", "bs=1 tok/s", f"bs={b} tok/s", f"prefill {a.prefill_len} ms", "step GiB",
              "% roofline", "speedup bs=1", f"speedup bs={b}", "peak GiB", title=f"quantized decode ({device}, {bw:.0f} GB/s copy)")
    for name, _, _ in arms:
        g = lambda k: result.get(f"{name}_{k}")  # noqa: E731
        t.add_row(name, f"{g('bs1_ms_per_token'):.2f}", f"{g('bs1_tok_s'):.1f}", f"{g(f'bs{b}_tok_s'):.1f}",
                  f"{g(f'prefill{a.prefill_len}_ms'):.1f}", f"{g('step_weight_gib'):.2f}",
                  f"{100 * g('bs1_roofline_fraction'):.0f}%", f"{g(f'speedup_bs1_vs_{fl}') or 1:.2f}x",
                  f"{g(f'speedup_bs{b}_vs_{fl}') or 1:.2f}x", "-" if g("peak_gib") is None else f"{g('peak_gib'):.1f}")
    console.print(t)
    if len(batch_sizes(a)) > 1:
        bt = Table("arm", *(f"bs={bb} tok/s" for bb in batch_sizes(a)), title=f"decode over batch sizes (x {fl})")
        for name, _, _ in arms:
            bt.add_row(name, *(f"{result[f'{name}_bs{bb}_tok_s']:,.0f} "
                               f"({result.get(f'{name}_speedup_bs{bb}_vs_{fl}') or 1:.2f}x)" for bb in batch_sizes(a)))
        console.print(bt)
    tg = any(k.startswith("kernel_int4-tinygemm") for k in result)
    kt = Table("shape KxN", "M", f"{fl} us", "int8 us", "int4 us", "int4 weight GB/s", *(["tinygemm us"] if tg else []),
               title="QuantLinear vs nn.Linear (host time per call: launch-bound for small shapes)")
    for K, N in shapes:
        for M in ms_list:
            g = lambda n, s="us": result[f"kernel_{n}_{K}x{N}_m{M}_{s}"]  # noqa: E731
            kt.add_row(f"{K}x{N}", str(M), f"{g('float'):.1f}", f"{g('int8'):.1f}", f"{g('int4'):.1f}",
                       f"{g('int4', 'weight_gbs'):.0f}", *([f"{g('int4-tinygemm'):.1f}"] if tg else []))
    console.print(kt)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n, _, _ in arms]
    for i, (key, label) in enumerate([("bs1_tok_s", "bs=1 decode tok/s"), (f"bs{b}_tok_s", f"bs={b} decode tok/s")]):
        vals = [result[f"{n}_{key}"] for n in names]
        ax[i].bar(names, vals, color=["#888", "#4a90d9", "#2e7d32", "#81c784", "#90caf9", "#9ccc65", "#f9a825"][:len(names)])
        ax[i].set_title(label)
        for j, v in enumerate(vals):
            ax[i].text(j, v, f"{v:.0f}", ha="center", va="bottom")
    fig.suptitle(f"onecard weight-only quantization, {result['model'].rsplit('/', 1)[-1]} ({device})")
    path = write_result("quant_decode", result, out_dir)
    png = save_figure(fig, "quant_decode", out_dir)
    console.print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
