"""Speculative decoding at bs=1 on onecard's engine: plain vs n-gram vs a draft model vs the target as its own draft.

    PYTHONPATH=src python benchmarks/engine_speculative.py            # H100: ~3-4 min (random llama-2-7b bf16)
    PYTHONPATH=src python benchmarks/engine_speculative.py --smoke    # CPU, tiny models, < 1 min, temp dir

One process, one GPU, the same greedy workload for every engine: a
code-editing-like prompt (a block of tokens, a separator, then the block again
up to the point being edited) continued for --output-tokens tokens at bs=1.
Rows (each its own engine, built one after the other):

- plain: no speculation (CUDA-graph decode), the baseline;
- n-gram k: prompt lookup (``num_speculative_tokens=k``);
- draft k: ``speculative_model=`` a small model. Default: the target's
  architecture with --draft-layers decoder layers and random weights, so it
  does not agree with the (random) target and acceptance is ~0: this row is
  the cost of a useless draft (k draft decodes + one verify per token).
  Pass --draft (and --model) with trained checkpoints for a real figure;
- self-draft k: the target as its own draft: every guess is accepted, so
  ``(k + 1)`` tokens per step cost ``k`` target-sized draft decodes plus one
  verify. Its tok/s over plain's bounds what the machinery itself costs: a
  real draft of cost ratio ``c`` and acceptance ``a`` gains roughly where
  ``(expected tokens per step) / (k * c + verify / decode)`` exceeds one.

Every speculative row's output is compared token for token with plain's
(greedy: must be identical). The self-draft row loads the target twice, so the
default is no memory cap (--cap-gib 0); Llama-2-7B bf16 twice is ~27 GiB.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import cap_process_memory, free_memory, publish
from onecard.engine import LLM, SamplingParams
from onecard.testing.checkpoints import benchmark_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llamas on CPU; output to a temp dir")
    p.add_argument("--model", default=None, help="target folder (default: random llama-2-7b, full size, bf16)")
    p.add_argument("--draft", default=None, help="draft folder (default: the target's arch with --draft-layers)")
    p.add_argument("--draft-layers", type=int, default=2, help="decoder layers of the default random draft")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--block-tokens", type=int, default=256, help="length of the repeated block in the prompt")
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--no-self-draft", action="store_true", help="skip the target-as-its-own-draft row")
    p.add_argument("--cap-gib", type=float, default=0.0, help="per-process memory cap, 0 = none (self-draft loads "
                                                              "the target twice)")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()



def workload(vocab: int, block_tokens: int) -> list[int]:
    """A block of source, a separator, then the same block again up to the point being edited."""
    g = torch.Generator().manual_seed(2)
    block = torch.randint(3, vocab, (block_tokens,), generator=g).tolist()
    return block + [7] + block[:16]


def run(model: str, a: argparse.Namespace, device: str, dtype: str, **spec) -> dict:
    llm = LLM(model, dtype=dtype, device=device, max_model_len=a.max_model_len, max_num_seqs=1, **spec)
    prompt = workload(llm.engine.vocab_size, a.block_tokens)
    sp = SamplingParams(temperature=0, max_tokens=a.output_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up
    before = llm.stats()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    dt = time.perf_counter() - t0
    st = llm.stats()
    drafted = st["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = st["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    del llm
    free_memory()
    return {"tok_s": len(out) / dt, "ms_per_token": dt / len(out) * 1e3, "tokens": out,
            "draft_tokens": drafted, "acceptance_rate": accepted / drafted if drafted else 0.0,
            "draft_model_steps": st["spec_draft_model_steps"] - before["spec_draft_model_steps"]}


def main() -> None:
    a = parse()
    console = Console()
    from onecard.testing import make_random_checkpoint

    if a.smoke:
        model = a.model or str(make_random_checkpoint("llama-2-7b", "tiny"))
        draft = a.draft or str(make_random_checkpoint("llama-2-7b", "tiny", overrides={"num_hidden_layers": 1}))
        device, dtype = "cpu", "float32"
        a.block_tokens, a.output_tokens, a.max_model_len = 48, 32, 256
        out_dir = a.out or tempfile.mkdtemp(prefix="engine_speculative_")
    else:
        model = benchmark_model(a.model, "llama-2-7b", console)
        if a.draft is None:
            console.print(f"[dim]building (or reusing) a random {a.draft_layers}-layer llama-2-7b draft...[/]")
            draft = str(make_random_checkpoint("llama-2-7b", "full", dtype="bfloat16", device="cuda",
                                               overrides={"num_hidden_layers": a.draft_layers}))
        else:
            draft = a.draft
        free_memory()
        device, dtype = "cuda", "auto"
        if a.cap_gib:
            cap_process_memory(a.cap_gib)
        out_dir = a.out
    if a.block_tokens + 17 + a.output_tokens > a.max_model_len:
        raise SystemExit("prompt + output do not fit --max-model-len; lower --block-tokens / --output-tokens")
    rows = {"plain": {}, f"n-gram k={a.k}": {"num_speculative_tokens": a.k},
            f"draft k={a.k}": {"num_speculative_tokens": a.k, "speculative_model": draft}}
    if not a.no_self_draft:
        rows[f"self-draft k={a.k}"] = {"num_speculative_tokens": a.k, "speculative_model": model}
    res = {}
    for name, spec in rows.items():
        console.print(f"[dim]{name}...[/]")
        res[name] = run(model, a, device, dtype, **spec)
    base = res["plain"]
    r: dict = {"model": model, "draft": draft, "k": a.k, "block_tokens": a.block_tokens,
               "output_tokens": a.output_tokens, "cap_gib": a.cap_gib or None,
               "weights": "random (acceptance not representative)" if a.model is None else "given --model/--draft"}
    t = Table(title=f"bs=1 greedy decode, {a.output_tokens} tokens after a repeated {a.block_tokens}-token block")
    for col in ("engine", "tok/s", "ms/token", "speed-up", "acceptance", "identical to plain"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for name, v in res.items():
        key = name.split(" ")[0].replace("-", "_")
        same = v["tokens"] == base["tokens"]
        r.update({f"{key}_tok_s": v["tok_s"], f"{key}_ms_per_token": v["ms_per_token"],
                  f"{key}_speedup": v["tok_s"] / base["tok_s"], f"{key}_acceptance_rate": v["acceptance_rate"],
                  f"{key}_draft_tokens": v["draft_tokens"], f"{key}_draft_model_steps": v["draft_model_steps"],
                  f"{key}_outputs_identical": same})
        t.add_row(name, f"{v['tok_s']:.1f}", f"{v['ms_per_token']:.2f}", f"{v['tok_s'] / base['tok_s']:.2f}x",
                  "" if name == "plain" else f"{v['acceptance_rate']:.2f}", "" if name == "plain" else str(same))
    console.print(t)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(res)
    ax.bar(names, [res[n]["tok_s"] for n in names], color=["tab:gray"] + ["tab:green"] * (len(names) - 1))
    for i, n in enumerate(names[1:], 1):
        ax.annotate(f"acc {res[n]['acceptance_rate']:.2f}", (i, res[n]["tok_s"]), ha="center", va="bottom")
    ax.set_ylabel("bs=1 decode tok/s")
    ax.set_title(f"speculative decoding, {'CPU smoke' if a.smoke else torch.cuda.get_device_name(0)}"
                 f"{', random weights' if a.model is None else ''}")
    publish("engine_speculative", r, fig, out_dir, console)


if __name__ == "__main__":
    main()
