"""LLaVA image Q&A on one card: onecard's engine path vs HF ``generate``, same process, random full-size weights.

    PYTHONPATH=src python benchmarks/vision_llava.py               # H100: both parts, ~6-9 min, writes docs/results/
    PYTHONPATH=src python benchmarks/vision_llava.py --part 7b     # 7B only (~4 min)
    PYTHONPATH=src python benchmarks/vision_llava.py --part 13b    # 13B under the 24 GiB cap only (~3-4 min)
    PYTHONPATH=src python benchmarks/vision_llava.py --smoke       # CPU, tiny LLaVA, ~1-2 min, writes to a temp dir

Part 7b (llava-1.5-7b architecture, built on the GPU with random bf16 weights,
no disk): time to first token for one 336x336 image (image preprocessing + CLIP
tower + projector + prefill + first sample) and bs=1 decode tok/s for four
paths: HF generate bf16 (the reference), HF generate with the LM in int4
(``QuantLinear``), onecard engine bf16 and onecard engine int4 (paged KV,
CUDA-graph decode). Each path gets a fresh model with the same seed (same
weights), one warm-up answer, then the median of --repeats answers of
--decode-tokens tokens (end-of-sequence ignored: the weights are random).

Part 13b (llava-1.5-13b architecture): the process is capped at --cap-gib
(``torch.cuda.set_per_process_memory_fraction``, a 24 GB card) *before* the
model touches the GPU; random bf16 weights are drawn on the card tensor by
tensor into a cached folder (``fast_random_checkpoint``), read into host
memory with ``from_pretrained`` (as a user's model is) and streamed layer by
layer to the card,
where the language model becomes int4 (vision tower + projector stay bf16).
Reports peak GiB (allocator), the weights and KV-cache GiB, TTFT and tok/s.
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

from onecard.bench.engine_bench import measure_copy_bandwidth
from onecard.bench.results import save_figure, write_result

GiB = 1 << 30
QUESTION = "What shapes are in this picture, and what colors are they?"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random LLaVA on CPU; output to a temp dir")
    p.add_argument("--part", choices=("7b", "13b", "all"), default="all")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cap-gib", type=float, default=24.0, help="process memory cap for the 13B part")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


def test_image(size: int = 336):
    """A real picture drawn here: shapes and text on a gradient, ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (x * 255 // size, y * 255 // size, 160)
    d = ImageDraw.Draw(img)
    s = size / 336
    d.rectangle([30 * s, 30 * s, 150 * s, 130 * s], fill="red", outline="black", width=3)
    d.ellipse([170 * s, 60 * s, 310 * s, 200 * s], fill="yellow", outline="black", width=3)
    d.polygon([(60 * s, 300 * s), (120 * s, 180 * s), (180 * s, 300 * s)], fill="green")
    d.text((200 * s, 260 * s), "onecard", fill="white")
    return img


def build_llava(arch: str, size: str, dtype: str, device: str, image_size: int | None = None,
                via_folder: bool = False):
    """Random HF LLaVA of ``arch`` (+ processor) in memory; the image token is the test tokenizer's ``<image>``.

    ``via_folder``: read it with ``from_pretrained`` (on ``device``) from a cached folder the fast writer draws on
    the GPU, instead of HF's init on ``device`` (minutes for a 13B in host memory)."""
    from onecard.models.arch import arch_config, scale_config
    from onecard.testing.checkpoints import build_random_model, shared_tokenizer
    from onecard.vision.testing import llava_processor

    cfg = scale_config(arch_config(arch), size)
    cfg.pop("_onecard_source", None)
    if image_size is not None:
        cfg["vision_config"]["image_size"] = image_size
        cfg["image_seq_length"] = (image_size // cfg["vision_config"]["patch_size"]) ** 2
    proc, image_token = llava_processor(shared_tokenizer(4096), cfg["vision_config"]["image_size"],
                                        cfg["vision_config"]["patch_size"])
    cfg["image_token_index"] = image_token  # 4096: inside the real 32064-token vocabulary
    if not via_folder:
        return build_random_model(cfg, dtype, device, seed=0), proc, cfg
    from transformers import LlavaForConditionalGeneration

    from onecard.testing.checkpoints import fast_random_checkpoint

    keep = ("image_token_index", "text_config", "vision_config", "image_seq_length")
    folder = fast_random_checkpoint(arch, size, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu",
                                    overrides={k: v for k, v in cfg.items() if k in keep})
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=getattr(torch, dtype), device_map=device)
    return hf.eval(), proc, cfg


def module_bytes(*mods) -> int:
    return sum(t.numel() * t.element_size() for m in mods if m is not None
               for t in [*m.parameters(), *m.buffers()])


def decode_bytes_per_token(vm) -> int:
    """Weights decode reads per token: the language model's linears + norms + LM head (one embedding row: ~0)."""
    if vm.backend == "engine":
        lm = vm.lm
        return module_bytes(lm.layers, lm.norm, lm.lm_head)
    lm = vm.hf.model.language_model
    return module_bytes(lm.layers, lm.norm, vm.hf.lm_head)


def measure(vm, image, decode_tokens: int, repeats: int, device: torch.device) -> dict:
    vm.generate(image, QUESTION, max_tokens=8, ignore_eos=True)  # warm-up: Triton compiles, cuDNN picks
    answers = [vm.generate(image, QUESTION, max_tokens=decode_tokens, ignore_eos=True) for _ in range(repeats)]
    ttft = statistics.median(a.time_to_first_token_s for a in answers)
    rate = statistics.median(a.decode_tokens_per_s for a in answers)
    a = answers[0]
    return {"backend": a.backend, "ttft_ms": 1000 * ttft, "decode_tok_s": rate, "ms_per_token": 1000 / rate,
            "prompt_tokens": a.num_prompt_tokens, "image_tokens": a.num_image_tokens,
            "generated_tokens": len(a.token_ids), "answer_head": a.text[:60]}


def run_variant(name: str, arch: str, size: str, dtype: str, device: torch.device, int4: bool, backend: str,
                image, a, console, bandwidth_gbs: float | None, host_build: bool = False) -> dict:
    from onecard.vision import VisionConfig, VisionModel

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    hf, proc, _ = build_llava(arch, size, dtype, "cpu" if host_build else str(device),
                              image_size=112 if a.smoke else None, via_folder=host_build)
    built = time.perf_counter() - t0
    cfg = VisionConfig(device=str(device), int4=int4, backend=backend)
    vm = VisionModel(None, proc, hf, cfg, device, getattr(torch, dtype), progress=not a.smoke)
    placed = time.perf_counter() - t0 - built
    r = {"name": name, "arch": arch, "int4_lm": int4, "build_s": built, "place_s": placed}
    r.update(measure(vm, image, a.decode_tokens, a.repeats, device))
    vision = module_bytes(vm.hf.model.vision_tower, vm.hf.model.multi_modal_projector)
    lm_bytes = module_bytes(vm.lm) if vm.backend == "engine" else module_bytes(vm.hf.model.language_model, vm.hf.lm_head)
    r["weights_gib"] = (vision + lm_bytes) / GiB
    r["vision_weights_gib"] = vision / GiB
    r["kv_cache_gib"] = (vm.runner.kv_cache.numel() * vm.runner.kv_cache.element_size() / GiB
                         if vm.backend == "engine" else None)
    if device.type == "cuda":
        r["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        r["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
    if bandwidth_gbs:
        per_token = decode_bytes_per_token(vm)
        r["roofline_tok_s"] = bandwidth_gbs * 1e9 / per_token
        r["roofline_fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]
    console.print(f"[dim]{name}: ttft {r['ttft_ms']:.0f} ms, decode {r['decode_tok_s']:.1f} tok/s[/]")
    del vm, hf
    return r


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("path", "TTFT ms", "decode tok/s", "ms/token", "x HF bf16", "% roofline", "weights GiB", "KV GiB",
                "peak GiB"):
        t.add_column(col, justify="right" if col != "path" else "left")
    base = next((r["decode_tok_s"] for r in rows if r["name"] == "hf_bf16"), None)
    f = lambda v, spec: "-" if v is None else format(v, spec)
    for r in rows:
        t.add_row(r["name"], f(r["ttft_ms"], ".0f"), f(r["decode_tok_s"], ".1f"), f(r["ms_per_token"], ".2f"),
                  f(r["decode_tok_s"] / base if base else None, ".2f"), f(100 * r["roofline_fraction"] if
                  r.get("roofline_fraction") else None, ".0f"), f(r["weights_gib"], ".2f"), f(r["kv_cache_gib"], ".2f"),
                  f(r.get("peak_gib"), ".2f"))
    return t


def figure(rows7: list[dict], row13: dict | None, cap_gib: float | None, image_px: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if row13 else 2, figsize=(15 if row13 else 10, 4))
    names = [r["name"] for r in rows7]
    axes[0].bar(names, [r["decode_tok_s"] for r in rows7], color="tab:blue")
    axes[0].set_title(f"{rows7[0]['arch']}: bs=1 decode tok/s")
    axes[1].bar(names, [r["ttft_ms"] for r in rows7], color="tab:orange")
    axes[1].set_title(f"time to first token (one {image_px} image), ms")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=20)
    if row13:
        parts = {"vision + projector": row13["vision_weights_gib"],
                 "LM int4 + head": row13["weights_gib"] - row13["vision_weights_gib"],
                 "KV cache": row13["kv_cache_gib"] or 0.0}
        bottom = 0.0
        for label, v in parts.items():
            axes[2].bar(["13B int4"], [v], bottom=bottom, label=label)
            bottom += v
        if row13.get("peak_gib"):
            axes[2].axhline(row13["peak_gib"], color="black", ls="--", label=f"peak {row13['peak_gib']:.1f} GiB")
        if cap_gib:
            axes[2].axhline(cap_gib, color="red", label=f"cap {cap_gib:g} GiB")
        axes[2].set_title(f"{row13['arch']}: memory, {row13['decode_tok_s']:.0f} tok/s")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    a = parse()
    console = Console(width=150)
    if a.smoke:
        device, dtype, size = torch.device("cpu"), "float32", "tiny"
        a.decode_tokens, a.repeats = min(a.decode_tokens, 8), 1
        out_dir = a.out or tempfile.mkdtemp(prefix="vision_llava_")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --smoke on CPU")
        device, dtype, size, out_dir = torch.device("cuda", 0), "bfloat16", "full", a.out
    bandwidth = measure_copy_bandwidth(device) if device.type == "cuda" else None
    image = test_image(112 if a.smoke else 336)
    result: dict = {"dtype": dtype, "decode_tokens": a.decode_tokens, "repeats": a.repeats, "measured_bandwidth_gbs": bandwidth,
                    "question": QUESTION, "image_px": f"{image.size[0]}x{image.size[1]}"}
    rows7: list[dict] = []
    row13 = None
    if a.part in ("7b", "all"):
        t_part = time.perf_counter()
        for name, int4, backend in (("hf_bf16", False, "hf"), ("hf_int4", True, "hf"),
                                    ("engine_bf16", False, "engine"), ("engine_int4", True, "engine")):
            rows7.append(run_variant(name, "llava-1.5-7b", size, dtype, device, int4, backend, image, a, console,
                                     bandwidth))
        console.print(table(rows7, f"llava-1.5-7b ({size}, float weights {dtype}), bs=1, {a.decode_tokens} tokens, "
                                   f"one {result['image_px']} image"))
        base = rows7[0]
        for r in rows7:
            for k, v in r.items():
                result[f"7b_{r['name']}_{k}"] = v
        for r in rows7[1:]:
            result[f"7b_{r['name']}_decode_speedup_vs_hf_bf16"] = r["decode_tok_s"] / base["decode_tok_s"]
            result[f"7b_{r['name']}_ttft_ratio_vs_hf_bf16"] = r["ttft_ms"] / base["ttft_ms"]
        result["7b_part_s"] = time.perf_counter() - t_part
        result["7b_target_decode_speedup"] = 3.0
        result["7b_engine_int4_meets_target"] = result["7b_engine_int4_decode_speedup_vs_hf_bf16"] >= 3.0
    if a.part in ("13b", "all"):
        t_part = time.perf_counter()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * GiB / total), device.index)
        row13 = run_variant("engine_int4", "llava-1.5-13b", size, dtype, device, True, "engine", image, a, console,
                            bandwidth, host_build=True)
        cap_note = f"process capped at {a.cap_gib:g} GiB" if device.type == "cuda" else "no cap on CPU"
        console.print(table([row13], f"llava-1.5-13b ({size}), int4 LM, {cap_note}"))
        for k, v in row13.items():
            result[f"13b_{k}"] = v
        result["13b_part_s"] = time.perf_counter() - t_part
        result["13b_cap_gib"] = a.cap_gib if device.type == "cuda" else None
        result["13b_fits_cap"] = (row13.get("peak_reserved_gib", 0.0) <= a.cap_gib) if device.type == "cuda" else None
    path = write_result("vision_llava", result, out_dir)
    if rows7:
        cap = a.cap_gib if device.type == "cuda" else None
        png = save_figure(figure(rows7, row13, cap, result["image_px"]), "vision_llava", out_dir)
        console.print(f"wrote {path} and {png}")
    else:
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
