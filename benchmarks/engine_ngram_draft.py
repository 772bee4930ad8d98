"""Host cost of n-gram (prompt-lookup) drafting per speculative step: ``NgramIndex`` vs scanning the context.

    PYTHONPATH=src python benchmarks/engine_ngram_draft.py            # CPU only, ~1 min
    PYTHONPATH=src python benchmarks/engine_ngram_draft.py --smoke    # seconds, temp dir

The draft is made on the host inside every speculative step, serially with
the GPU's verify forward (nothing overlaps a speculative step), so its time
adds to every step: ~0.8 ms for the ~1B copy model of
``benchmarks/engine_speculative.py``. Two ways, same inputs, same process:

- scan: what ``propose_ngram`` did before ``NgramIndex`` (list the earlier positions of the last token, one
  pass over the context, then compare whole n-grams there), kept here as the reference;
- index: ``onecard.engine.speculative.NgramIndex``, one per sequence, updated with the tokens appended since
  its last call.

Each context length L runs a decode of --steps steps from an L-token prompt of
real text's token ids (held-out Python stdlib sources, the copy model's BPE
tokenizer), each step appending 2 tokens (an accepted guess + the model's own,
the copy model's ~1.9 tokens per step), and asks for 8 draft tokens (k = 8).
Both ways' drafts are checked equal at every step. The index's first call
builds it over the whole prompt: reported apart (``index_build_us``, once per
request) and included in ``index_us_per_step``. Writes
docs/results/engine_ngram_draft.json (+ PNG).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from rich.console import Console
from rich.table import Table

from onecard.bench.results import publish, speedup_bars
from onecard.engine.speculative import NgramIndex

K, NGRAM, TOKENS_PER_STEP, VOCAB = 8, 3, 2, 8192


def propose_by_scan(token_ids: list[int], ngram_size: int, num_tokens: int) -> list[int]:
    """The previous drafter: the earlier positions of the last token first, then whole n-grams only there."""
    if num_tokens <= 0 or len(token_ids) < 2:
        return []
    L = len(token_ids)
    last = token_ids[-1]
    ends = [i for i, t in enumerate(token_ids[:-1]) if t == last]
    for n in range(min(ngram_size, L - 1), 0, -1):
        pattern = token_ids[L - n:]
        for end in reversed(ends):
            if end >= n - 1 and token_ids[end - n + 1:end + 1] == pattern:
                return token_ids[end + 1:end + 1 + num_tokens]
    return []


def stdlib_token_ids(n: int) -> list[int]:
    """``n`` token ids of Python's own sources (held-out files) under the copy model's BPE tokenizer (8192 ids,
    ``benchmarks/engine_speculative.py``): real code, with the repeats prompt lookup lives on."""
    from tokenizers import Tokenizer

    from onecard.testing import local_corpus
    from onecard.testing.checkpoints import shared_tokenizer

    tokenizer = Tokenizer.from_file(str(shared_tokenizer(VOCAB) / "tokenizer.json"))
    ids: list[int] = []
    for doc in local_corpus().validation:
        ids += tokenizer.encode(doc).ids
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the held-out stdlib files give {len(ids)} tokens, fewer than {n}: pass shorter --lengths")


def decode(prompt: list[int], continuation: list[int], steps: int, draft) -> tuple[list[float], list[list[int]]]:
    """Per-step seconds and drafts of ``draft(token_ids, K)`` over a decode that appends TOKENS_PER_STEP a step."""
    ids, times, drafts = list(prompt), [], []
    for s in range(steps):
        t0 = time.perf_counter()
        drafts.append(draft(ids, K))
        times.append(time.perf_counter() - t0)
        ids += continuation[s * TOKENS_PER_STEP:(s + 1) * TOKENS_PER_STEP]
    return times, drafts


def measure(length: int, steps: int, repeats: int) -> dict:
    ids = stdlib_token_ids(length + steps * TOKENS_PER_STEP)
    prompt, cont = ids[:length], ids[length:]
    scan, index, build = [], [], []
    for _ in range(repeats):
        t_scan, d_scan = decode(prompt, cont, steps, lambda x, k: propose_by_scan(x, NGRAM, k))
        t_index, d_index = decode(prompt, cont, steps, NgramIndex(NGRAM).propose)
        if d_scan != d_index:
            raise SystemExit(f"drafts differ at context {length}: the index is wrong")
        scan.append(sum(t_scan) / steps)
        index.append(sum(t_index) / steps)
        build.append(t_index[0])
    row = {"context_tokens": length, "steps": steps, "drafts_found": sum(bool(d) for d in d_index),
           "scan_us_per_step": statistics.median(scan) * 1e6, "index_us_per_step": statistics.median(index) * 1e6,
           "index_build_us": statistics.median(build) * 1e6}
    row["speedup_vs_scan"] = row["scan_us_per_step"] / row["index_us_per_step"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="1024,4096,16384,32768", help="prompt lengths, comma list")
    p.add_argument("--steps", type=int, default=256, help="decode steps per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="short contexts, few steps; output to a temp dir")
    p.add_argument("--out", default=None, help="result folder (default docs/results; temp dir in smoke)")
    a = p.parse_args()
    if a.smoke:
        a.lengths, a.steps, a.repeats = "256,1024", 32, 2
        a.out = a.out or tempfile.mkdtemp(prefix="onecard-ngram-")
    console = Console()
    rows = [measure(int(n), a.steps, a.repeats) for n in a.lengths.split(",")]
    t = Table(title=f"n-gram drafting on the host, per step (k={K}, n={NGRAM}, {TOKENS_PER_STEP} tokens a step)")
    for c in ("context", "scan µs", "index µs", "speed-up", "index build µs (once)", "drafts found"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(f"{r['context_tokens']:,}", f"{r['scan_us_per_step']:.1f}", f"{r['index_us_per_step']:.1f}",
                  f"{r['speedup_vs_scan']:.1f}x", f"{r['index_build_us']:.0f}", f"{r['drafts_found']}/{r['steps']}")
    console.print(t)
    data = {"device": "host CPU (drafting runs on the host)", "k": K, "ngram_size": NGRAM,
            "tokens_per_step": TOKENS_PER_STEP, "repeats": a.repeats, "rows": rows,
            **{f"{key}_{r['context_tokens']}": r[key] for r in rows
               for key in ("scan_us_per_step", "index_us_per_step", "index_build_us", "speedup_vs_scan")}}
    fig = speedup_bars({"index vs scan": [r["speedup_vs_scan"] for r in rows]},
                       [f"{r['context_tokens']:,}" for r in rows], "speed-up per step",
                       "n-gram drafting: NgramIndex vs scanning the context")
    publish("engine_ngram_draft", data, fig, a.out, console)


if __name__ == "__main__":
    main()
