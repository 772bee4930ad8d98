"""Speculative decoding at bs=1 on a model that really copies: plain vs n-gram vs a trained draft vs self-draft.

    PYTHONPATH=src python benchmarks/engine_speculative.py            # H100: ~12 min (training ~7, cached after)
    PYTHONPATH=src python benchmarks/engine_speculative.py --smoke    # CPU, tiny models, < 2 min, temp dir

Speculation pays only when the model does what the draft guesses. A random
model never copies (acceptance 0), and no weights can be downloaded, so this
benchmark first trains, in this process, a Llama-architecture model from
scratch on code-editing sequences made from real text every machine has
(Python's stdlib sources, ``onecard.testing.local_corpus``)::

    ### original
    <a block of source lines>
    ### edited
    <the same block with one edit: an identifier renamed throughout, a line
     replaced, inserted or deleted>
    </s>

Induction heads (copy what followed the last occurrence of the current
context) form on such data once every training window holds whole pairs
(``pair_starts``) and after enough steps (a phase change between 800 and 4000
steps here); the script prints the held-out next-token accuracy over the
edited blocks to show the model copies. The target has
Llama-2-7B widths (hidden 4096, MLP 11008, 32 heads) with --layers decoder
layers (default 4: ~0.88B parameters, 1.75 GB in bf16), so bs=1 decode is
bound by weight bytes like a real model's, not by kernel launches. A draft
(hidden 1024, 4 layers, ~67M parameters) trains on the same data for the
draft-model row. Both are cached (``~/.cache/onecard/copy-llama-*``), bf16.

Workload: held-out (validation-split) edit pairs, the prompt cut a few tokens
after the first edited token of the edited block, each continued greedily at
bs=1 for the rest of the block (capped at --output-tokens). Rows, each its own
engine built one after the other in this process: plain (CUDA-graph decode,
the bs=1 GEMV, one-launch attention), plain-verifier-kernels (CUDA: both off), n-gram k for each --k, the
trained draft at the largest k, and the target as its own draft (every guess
accepted: what the machinery costs at best). Speed-ups are against plain.
Speculation verifies k + 1 rows per step with cuBLAS and the three-launch
attention, so the engine turns the bs=1 GEMV and one-launch attention off with
it (their rounding differs); every speculative row's tokens are compared with
plain-verifier-kernels', the plain decoding on the same kernels
(on CPU, with plain's). Also reported:
whether a bf16 matmul row computed at M = k + 1 equals the same row at M = 1
bit for bit (verify runs k + 1 decode rows, plain decode one: where they
differ, greedy outputs may differ at near-ties).

--arch NAME (e.g. llama-3-8b) trains the --layers target at that built-in
architecture's widths (GQA, MLP, rope) instead, then grows it to the
architecture's full depth and vocabulary (``onecard.testing.grown``: added
layers run attention and MLP on random values and add exactly zero to the
residual stream, new vocabulary rows tie token 0), so every row pays the real
architecture's bytes and FLOPs per step while the model copies as the trained
one does; the draft's vocabulary grows to match. Results go to
``engine_speculative_<arch>.json``.

--target-from-draft makes the target from the trained draft instead of training one at the target's widths
(which copies too little in the steps there are: 33 % of edited-block tokens at Llama-3-8B's widths against the
draft's 85 %): ``onecard.testing.grown.widen_checkpoint`` writes the draft at the target's widths computing
exactly its function, then --arch grows it as above. There is no draft-model row then (the draft is the target's
function). Results go to ``engine_speculative[_<arch>]_widened.json``.

--model / --draft skip the training and use the given folders instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import keyword
import random
import re
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from onecard.bench.results import cap_process_memory, free_memory, publish
from onecard.engine import LLM, SamplingParams
from onecard.engine.config import EngineConfig
from onecard.engine.speculative import VERIFIER_KERNELS

ORIGINAL, EDITED = "### original\n", "### edited\n"
IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")
KEYWORDS = set(keyword.kwlist) | {"self", "cls", "None", "True", "False"}
DATA_RECIPE = 2  # bump when the edit-pair recipe changes: it is part of the cached models' key (2: windows start at pairs)

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
          "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
          "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048}
# Llama-2-7B's widths, few layers: weight-bandwidth-bound decode like the real model, trainable in minutes
TARGET = {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
          "num_key_value_heads": 32, "num_hidden_layers": 4, "vocab_size": 8192}
DRAFT = {**_LLAMA, "hidden_size": 1024, "intermediate_size": 2752, "num_attention_heads": 8,
         "num_key_value_heads": 8, "num_hidden_layers": 4, "vocab_size": 8192}
SMOKE_TARGET = {**_LLAMA, "hidden_size": 128, "intermediate_size": 344, "num_attention_heads": 4,
                "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 2048, "max_position_embeddings": 1024}
SMOKE_DRAFT = {**SMOKE_TARGET, "hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 2,
               "num_key_value_heads": 2, "num_hidden_layers": 1}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models trained briefly on CPU; output to a temp dir")
    p.add_argument("--model", default=None, help="target folder (default: train the copy model, see above)")
    p.add_argument("--draft", default=None, help="draft folder (default: train the small copy model)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the trained target")
    p.add_argument("--arch", default=None, help="train at this built-in architecture's widths and grow the trained "
                   "target to its depth and vocabulary (see above); default: Llama-2-7B widths, --layers deep")
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--train-seq-len", type=int, default=1024)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="the target's peak learning rate")
    p.add_argument("--draft-lr", type=float, default=1e-3, help="the (16x narrower) draft's peak learning rate")
    p.add_argument("--target-from-draft", action="store_true",
                   help="the target is the trained draft widened to the target's widths (widen_checkpoint: exactly "
                        "the draft's function at the target's bytes and FLOPs per step), no draft-model row")
    p.add_argument("--loss-on", choices=("all", "edited"), default="all",
                   help="train on every token, or on the edited blocks only (the copies; originals masked)")
    p.add_argument("--block-chars", type=int, default=1200, help="characters of source per edit block (~350 tokens)")
    p.add_argument("--k", default="2,4,8", help="n-gram rows' num_speculative_tokens (comma list); the draft rows "
                                               "use the largest value that is <= 4")
    p.add_argument("--ngram-size", type=int, default=EngineConfig.ngram_size,
                   help="n-gram rows' ngram_size (longest suffix looked up; default: the engine's)")
    p.add_argument("--ngram-min-size", type=int, default=EngineConfig.ngram_min_size,
                   help="n-gram rows' ngram_min_size (shortest suffix that drafts; default: the engine's)")
    p.add_argument("--compare-ngram", default="", help="MIN,MAX: one more n-gram row at the largest k with these "
                   "sizes, in the same process (e.g. 2,5)")
    p.add_argument("--prompts", type=int, default=4, help="held-out edit prompts, each decoded at bs=1")
    p.add_argument("--output-tokens", type=int, default=320, help="cap on tokens generated per prompt")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--no-self-draft", action="store_true", help="skip the target-as-its-own-draft row")
    p.add_argument("--cap-gib", type=float, default=0.0, help="per-process memory cap for the rows (training runs "
                   "before it), 0 = none")
    p.add_argument("--out", default=None, help="result folder (default docs/results; --smoke: a temp dir)")
    return p.parse_args()


# ---- the data: edit pairs from real source --------------------------------------------------------------------
def edit_block(lines: list[str], donor_lines: list[str], rng: random.Random) -> list[str]:
    """The block with one code edit: an identifier renamed everywhere it occurs, or one line replaced by, or
    preceded by, a line from elsewhere, or deleted (the edits a code assistant makes)."""
    kind = rng.choice(("rename", "rename", "replace", "insert", "delete"))
    if kind == "rename":
        names = sorted({m for line in lines for m in IDENT.findall(line)} - KEYWORDS)
        if names:
            old = rng.choice(names)
            new = f"{old}_{rng.choice(('new', 'v2', 'tmp', 'old', 'local', 'x'))}"
            return [re.sub(rf"\b{re.escape(old)}\b", new, line) for line in lines]
        kind = "replace"
    out = list(lines)
    i = rng.randrange(len(out))
    if kind == "replace":
        out[i] = rng.choice(donor_lines)
    elif kind == "insert":
        out.insert(i, rng.choice(donor_lines))
    elif len(out) > 1:
        del out[i]
    return out


def edit_pairs(docs: tuple[str, ...], n: int, block_chars: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (original, edited) text blocks: contiguous lines of a random document, about ``block_chars`` long."""
    rng = random.Random(seed)
    split = [d.splitlines(keepends=True) for d in docs]
    split = [ls for ls in split if sum(map(len, ls)) > 2 * block_chars]
    donors = [line for ls in split[:200] for line in ls if line.strip()]
    pairs = []
    while len(pairs) < n:
        lines = rng.choice(split)
        start = rng.randrange(len(lines))
        block, size = [], 0
        for line in lines[start:]:
            if size >= block_chars:
                break
            block.append(line)
            size += len(line)
        if size < block_chars // 2 or not any(line.strip() for line in block):
            continue
        edited = edit_block(block, donors, rng)
        if edited != block:
            pairs.append(("".join(block), "".join(edited)))
    return pairs


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(``### original`` + block, ``### edited`` + edited block) token ids; the two halves are encoded apart so
    a prompt cut at the boundary tokenizes as in training."""
    ids = tokenizer([t for p in pairs for t in (ORIGINAL + p[0], EDITED + p[1])], add_special_tokens=False)["input_ids"]
    return list(zip(ids[0::2], ids[1::2]))


def header_len(tokenizer, header: str) -> int:
    return len(tokenizer(header, add_special_tokens=False)["input_ids"])


def pair_stream(encoded: list[tuple[list[int], list[int]]], eos: int) -> torch.Tensor:
    return torch.tensor([t for a, b in encoded for t in (*a, *b, eos)], dtype=torch.long)


def pair_starts(encoded: list[tuple[list[int], list[int]]], seq_len: int) -> torch.Tensor:
    """Offsets in ``pair_stream`` where a pair begins (with a whole window after it): training windows start only
    there, so every edited block's original is inside its window. With windows anywhere, about half the edited
    tokens seen had no source to copy from, and a draft-sized model still predicted only 29 % of edited-block
    tokens after 800 steps (36 % / 46 % for target / draft after 3000); from pair starts, 89 % after 4000 steps
    (dev runs on an H100, .device/copy_exp.py)."""
    lens = torch.tensor([len(a) + len(b) + 1 for a, b in encoded])
    starts = torch.cumsum(lens, 0) - lens
    return starts[starts < int(lens.sum()) - seq_len - 1]


def edited_labels(encoded: list[tuple[list[int], list[int]]], eos: int) -> torch.Tensor:
    """``pair_stream``'s labels with the original blocks masked (-100): the loss is on the edited blocks alone,
    the part a model learns by copying, so no gradient goes to predicting unseen source."""
    return torch.tensor([t for a, b in encoded for t in (*[-100] * len(a), *b, eos)], dtype=torch.long)


# ---- the models -----------------------------------------------------------------------------------------------
@torch.no_grad()
def edited_block_accuracy(model, encoded: list[tuple[list[int], list[int]]], header: int, device: str) -> float:
    """Teacher-forced next-token accuracy over the edited blocks (their ``header`` tokens excluded): how well the
    model copies."""
    right = total = 0
    for a, b in encoded:
        ids = torch.tensor([a + b], device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
        start = len(a) + header  # predictions of the edited block's tokens after its header
        right += (pred[start - 1:] == ids[0, start:]).sum().item()
        total += ids.shape[1] - start
    return right / max(total, 1)


def train_copy_model(config: dict, lr: float, a: argparse.Namespace, device: str, dtype: str, label: str,
                     console: Console) -> tuple[Path, dict]:
    """Train (or reuse from the cache) a model of ``config`` on edit pairs; returns its folder and how it went."""
    from transformers import AutoTokenizer

    from onecard.testing import local_corpus
    from onecard.testing.checkpoints import build_random_model, cache_dir, publish_dir, shared_tokenizer
    from onecard.testing.train_lm import train_lm

    settings = [config, a.train_steps, a.train_seq_len, a.train_batch, lr, a.block_chars, dtype,
                sysconfig.get_python_version(), DATA_RECIPE] + ([a.loss_on] if a.loss_on != "all" else [])
    out = cache_dir() / f"copy-llama-{hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]}"
    if (out / "onecard_copy.json").exists():
        info = json.loads((out / "onecard_copy.json").read_text())
        console.print(f"[dim]{label}: cached at {out} (edited-block accuracy {info['edited_block_accuracy']:.3f})[/]")
        return out, info
    tok_dir = shared_tokenizer(config["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    corpus = local_corpus()
    n_pairs = a.train_steps * a.train_batch * a.train_seq_len // (a.block_chars // 2) + 64
    encoded = encode_pairs(tokenizer, edit_pairs(corpus.train, n_pairs, a.block_chars, 0))
    train = pair_stream(encoded, tokenizer.eos_token_id).to(device)
    starts = pair_starts(encoded, a.train_seq_len).to(device)
    labels = edited_labels(encoded, tokenizer.eos_token_id).to(device) if a.loss_on == "edited" else None
    held_out = encode_pairs(tokenizer, edit_pairs(corpus.validation, 32, a.block_chars, 1))
    model = build_random_model(config, device=device).train()
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"[dim]{label}: training {n_params / 1e6:.0f}M parameters for {a.train_steps} steps x "
                  f"{a.train_batch} x {a.train_seq_len} tokens on {len(train) / 1e6:.1f}M tokens of edit pairs...[/]")
    seconds = train_lm(model, train, a.train_steps, a.train_seq_len, a.train_batch, lr,
                       generator=torch.Generator(device).manual_seed(0),
                       autocast_dtype=torch.bfloat16 if device == "cuda" else None, fused=device == "cuda",
                       progress=True, label=label, console=console, train_labels=labels, window_starts=starts)
    model.eval()
    info = {"parameters": n_params, "train_seconds": round(seconds, 1), "train_steps": a.train_steps, "lr": lr,
            "loss_on": a.loss_on,
            "train_tokens": a.train_steps * a.train_batch * a.train_seq_len,
            "edited_block_accuracy": round(edited_block_accuracy(model, held_out, header_len(tokenizer, EDITED), device), 4)}
    console.print(f"{label}: {seconds:.0f} s, held-out edited-block next-token accuracy "
                  f"{info['edited_block_accuracy']:.3f}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(str(tmp), safe_serialization=True)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["torch_dtype"] = dtype
    cfg.pop("dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    (tmp / "onecard_copy.json").write_text(json.dumps(info, indent=2))
    del model, train, labels
    free_memory()
    publish_dir(tmp, out)
    return out, info


def arch_target(arch: str, base: dict, layers: int) -> dict:
    """The trainable target for ``--arch``: the architecture's widths, rope and ties at ``layers`` layers, with
    ``base``'s vocabulary and special tokens (the copy tokenizer's)."""
    from onecard.models.arch import arch_config

    cfg = {k: v for k, v in arch_config(arch).items() if not k.startswith("_")}
    keep = ("vocab_size", "bos_token_id", "eos_token_id")
    return {**cfg, **{k: base[k] for k in keep}, "num_hidden_layers": layers}


def widened(folder: Path, cfg: dict, console: Console) -> Path:
    """``folder`` (the trained draft) at ``cfg``'s widths and depth, cached beside it."""
    from onecard.testing.checkpoints import publish_dir
    from onecard.testing.grown import grow_checkpoint, widen_checkpoint

    out = folder.with_name(f"{folder.name}-wide-{cfg['hidden_size']}-{cfg['intermediate_size']}-"
                           f"{cfg['num_attention_heads']}-{cfg['num_key_value_heads']}-{cfg['num_hidden_layers']}")
    if not (out / "config.json").exists():
        console.print(f"[dim]widening {folder.name} to hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} "
                      "layers...[/]")
        tmp, deep = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".narrow-deep")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(deep, ignore_errors=True)
        grow_checkpoint(folder, deep, cfg["num_hidden_layers"])
        widen_checkpoint(deep, tmp, cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                         cfg["num_key_value_heads"])
        shutil.rmtree(deep)
        publish_dir(tmp, out)
    return out


def grown(folder: Path, arch: str, device: str, console: Console, deepen: bool = True) -> Path:
    """``folder`` grown to ``arch``'s vocabulary and (``deepen``) depth, cached beside it."""
    from onecard.models.arch import arch_config
    from onecard.testing.checkpoints import publish_dir
    from onecard.testing.grown import grow_checkpoint

    full = arch_config(arch)
    depth = (full if deepen else json.loads((folder / "config.json").read_text()))["num_hidden_layers"]
    out = folder.with_name(f"{folder.name}-grown-{arch}-{depth}")
    if not (out / "config.json").exists():
        console.print(f"[dim]growing {folder.name} to {depth} layers, vocabulary {full['vocab_size']}...[/]")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        publish_dir(grow_checkpoint(folder, tmp, depth, full["vocab_size"], device=device), out)
    return out


# ---- the workload and the rows --------------------------------------------------------------------------------
def edit_prompts(tokenizer, n: int, block_chars: int, output_tokens: int) -> list[tuple[list[int], int]]:
    """(prompt ids, tokens to generate) from held-out pairs: the prompt stops 4 tokens after the edited block's
    first changed token; the model is asked for the rest of the block (at most ``output_tokens``)."""
    from onecard.testing import local_corpus

    out = []
    ha, hb = header_len(tokenizer, ORIGINAL), header_len(tokenizer, EDITED)
    for a, b in encode_pairs(tokenizer, edit_pairs(local_corpus().validation, 8 * n, block_chars, 2)):
        body_a, body_b = a[ha:], b[hb:]
        first = next((i for i, (x, y) in enumerate(zip(body_a, body_b)) if x != y), min(len(body_a), len(body_b)))
        cut = hb + first + 4
        if len(b) - cut >= 32:
            out.append((a + b[:cut], min(len(b) - cut, output_tokens)))
        if len(out) == n:
            break
    return out


def run(model: str, prompts: list[tuple[list[int], int]], a: argparse.Namespace, device: str, dtype: str,
        **spec) -> dict:
    llm = LLM(model, dtype=dtype, device=device, max_model_len=a.max_model_len, max_num_seqs=1, **spec)
    llm.generate([prompts[0][0]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    steps = 0
    step = llm.engine.step

    def counted(*args, **kwargs):
        nonlocal steps
        steps += 1
        return step(*args, **kwargs)

    llm.engine.step = counted
    before = llm.stats()
    tokens, seconds = [], 0.0
    for prompt, n in prompts:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        seconds += time.perf_counter() - t0
        tokens.append(out[0].outputs[0].token_ids)
    st = llm.stats()
    drafted = st["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = st["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    total = sum(map(len, tokens))
    del llm
    free_memory()
    return {"tok_s": total / seconds, "ms_per_token": seconds / total * 1e3, "tokens": tokens,
            "tokens_per_step": total / steps, "draft_tokens": drafted,
            "acceptance_rate": accepted / drafted if drafted else 0.0}


def matmul_rows_bitwise_equal(rows: int, hidden: int, device: str, dtype: torch.dtype) -> bool:
    """Whether row 0 of ``x @ W`` at M = ``rows`` equals the same row computed alone (M = 1), bit for bit: the
    part of a verify step's numerics that the paged decode attention cannot make identical to plain decode."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=g)
    w = torch.randn(3 * hidden, hidden, device=device, dtype=dtype, generator=g) / hidden ** 0.5
    return torch.equal(torch.nn.functional.linear(x[:1], w), torch.nn.functional.linear(x, w)[:1])


def main() -> None:
    a = parse()
    console = Console()
    ks = sorted({int(k) for k in a.k.split(",")})
    if a.smoke:
        device, dtype = "cpu", "float32"
        target_cfg, draft_cfg = SMOKE_TARGET, SMOKE_DRAFT
        # a pipeline check, not a measurement: a few steps on a shared CPU do not teach copying
        a.train_steps, a.train_seq_len, a.train_batch, a.lr, a.draft_lr = 8, 256, 4, 3e-3, 3e-3
        a.block_chars, a.prompts, a.output_tokens, a.max_model_len = 300, 1, 24, 512
        ks = ks[:2]
        out_dir = a.out or tempfile.mkdtemp(prefix="engine_speculative_")
    else:
        device, dtype = "cuda", "bfloat16"
        target_cfg, draft_cfg = {**TARGET, "num_hidden_layers": a.layers}, DRAFT
        out_dir = a.out
    if a.arch:
        target_cfg = arch_target(a.arch, target_cfg, 2 if a.smoke else a.layers)
        if a.smoke:  # the pipeline at tiny widths: the architecture's depth and vocabulary, 128-wide layers
            target_cfg.update({k: SMOKE_TARGET[k] for k in ("hidden_size", "intermediate_size")},
                              num_attention_heads=4, num_key_value_heads=2)
    draft_k = max([k for k in ks if k <= 4] or ks[:1])
    trained: dict[str, dict] = {}
    if a.target_from_draft:
        if a.model or a.draft:
            raise SystemExit("--target-from-draft trains the draft and widens it: drop --model / --draft")
        narrow, trained["draft"] = train_copy_model(draft_cfg, a.draft_lr, a, device, dtype, "draft", console)
        model, draft = widened(Path(narrow), target_cfg, console), None
        trained["target"] = {"widened_from": "draft", "edited_block_accuracy": trained["draft"]["edited_block_accuracy"]}
    else:
        if a.model is None:
            model, trained["target"] = train_copy_model(target_cfg, a.lr, a, device, dtype, "target", console)
        else:
            model = a.model
        if a.draft is None and a.model is None:
            draft, trained["draft"] = train_copy_model(draft_cfg, a.draft_lr, a, device, dtype, "draft", console)
        else:
            draft = a.draft
    if a.arch:
        model = grown(Path(model), a.arch, device, console)
        draft = draft and grown(Path(draft), a.arch, device, console, deepen=False)
    model, draft = str(model), draft and str(draft)
    if a.cap_gib and device == "cuda":  # the rows run under the cap; the copy models' training did not
        cap_process_memory(a.cap_gib)

    from transformers import AutoTokenizer

    prompts = edit_prompts(AutoTokenizer.from_pretrained(model), a.prompts, a.block_chars, a.output_tokens)
    if max(len(p) + n for p, n in prompts) + max(ks) + 1 > a.max_model_len:
        raise SystemExit("a prompt + its output do not fit --max-model-len; lower --block-chars / --output-tokens")
    rows: dict[str, dict] = {"plain": {}}
    if device == "cuda":  # plain's bs=1 GEMV and one-launch attention round unlike the verifier's kernels (speculation
        rows["plain-verifier-kernels"] = VERIFIER_KERNELS  # turns them off): identity is checked against plain on those
    sizes = {"ngram_size": a.ngram_size, "ngram_min_size": a.ngram_min_size}
    rows.update({f"n-gram k={k}": {"num_speculative_tokens": k, **sizes} for k in ks})
    if a.compare_ngram:
        lo, hi = (int(v) for v in a.compare_ngram.split(","))
        rows[f"n-gram k={max(ks)} {lo}..{hi}-grams"] = {"num_speculative_tokens": max(ks), "ngram_size": hi,
                                                        "ngram_min_size": lo}
    if draft:
        rows[f"draft k={draft_k}"] = {"num_speculative_tokens": draft_k, "speculative_model": draft}
    if not a.no_self_draft:
        rows[f"self-draft k={draft_k}"] = {"num_speculative_tokens": draft_k, "speculative_model": model}
    res = {}
    for name, spec in rows.items():
        console.print(f"[dim]{name}...[/]")
        res[name] = run(model, prompts, a, device, dtype, **spec)
    base = res["plain"]  # speed-ups are against the fastest plain decoding (the default)
    ref = res.get("plain-verifier-kernels", base)  # greedy identity against plain decoding on the same kernels

    hidden = json.loads((Path(model) / "config.json").read_text())["hidden_size"]
    r: dict = {"model": model, "draft": draft, "trained": trained, "k": ks, "draft_k": draft_k, "arch": a.arch,
               "grown": json.loads((Path(model) / "onecard_grown.json").read_text()) if a.arch else None,
               "target_from_draft": a.target_from_draft, "ngram_size": a.ngram_size, "ngram_min_size": a.ngram_min_size,
               "compare_ngram_min_max": a.compare_ngram or None,
               "tokens_per_step": "generated tokens / engine steps (prefill included)",
               "prompts": len(prompts), "prompt_tokens": [len(p) for p, _ in prompts],
               "output_tokens": [n for _, n in prompts], "cap_gib": a.cap_gib or None,
               "matmul_row_bitwise_equal_m1_vs": {str(k + 1): matmul_rows_bitwise_equal(
                   k + 1, hidden, device, getattr(torch, dtype)) for k in ks}}
    t = Table(title=f"bs=1 greedy, {len(prompts)} held-out edit prompts, {sum(map(len, base['tokens']))} tokens")
    for col in ("engine", "tok/s", "ms/token", "speed-up", "acceptance", "tokens/step", "identical to plain*"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for name, v in res.items():
        key = re.sub(r"\W+", "_", name.replace(" k=", "_k")).strip("_")  # n-gram k=8 1..3-grams: n_gram_k8_1_3_grams
        same = v["tokens"] == ref["tokens"]
        first_diff = next((i for i, (x, y) in enumerate(zip(v["tokens"], ref["tokens"])) if x != y), None)
        r[key] = {"tok_s": v["tok_s"], "ms_per_token": v["ms_per_token"], "speedup": v["tok_s"] / base["tok_s"],
                  "acceptance_rate": v["acceptance_rate"], "draft_tokens": v["draft_tokens"],
                  "tokens_per_step": v["tokens_per_step"], "outputs_identical": same,
                  "first_differing_prompt": first_diff}
        t.add_row(name, f"{v['tok_s']:.1f}", f"{v['ms_per_token']:.2f}", f"{v['tok_s'] / base['tok_s']:.2f}x",
                  "" if name == "plain" else f"{v['acceptance_rate']:.2f}", f"{v['tokens_per_step']:.2f}",
                  "" if v is ref else str(same))
    t.caption = ("* plain-verifier-kernels' tokens (cuBLAS, three-launch attention)" if ref is not base
                 else "* plain's tokens")
    r["identity_reference"] = "plain_verifier_kernels" if ref is not base else "plain"
    r["plain_gemv_vs_cublas_identical"] = base["tokens"] == ref["tokens"]
    console.print(t)
    for who, info in trained.items():
        how = ("the draft widened" if "widened_from" in info else
               f"{info['parameters'] / 1e6:.0f}M params, trained {info['train_seconds']} s")
        console.print(f"{who}: {how}, held-out edited-block accuracy {info['edited_block_accuracy']:.3f}")
    console.print(f"matmul row at M=k+1 bit-equal to M=1 ({dtype}): {r['matmul_row_bitwise_equal_m1_vs']}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(res)
    ax.bar(names, [res[n]["tok_s"] for n in names], color=["tab:gray"] + ["tab:green"] * (len(names) - 1))
    for i, n in enumerate(names[1:], 1):
        ax.annotate(f"{res[n]['tok_s'] / base['tok_s']:.2f}x, acc {res[n]['acceptance_rate']:.2f}",
                    (i, res[n]["tok_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bs=1 decode tok/s")
    ax.set_title(f"speculative decoding on code edits, {'CPU smoke' if a.smoke else torch.cuda.get_device_name(0)}")
    name = "engine_speculative" + ("_" + re.sub(r"\W+", "_", a.arch) if a.arch else "") + \
        ("_widened" if a.target_from_draft else "")
    publish(name, r, fig, out_dir, console)


if __name__ == "__main__":
    main()
