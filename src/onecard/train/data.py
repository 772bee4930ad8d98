"""Training data: plain text packed into seq-len blocks, or JSONL chat / instruction examples.

Packing without cross-document leakage: every block carries ``position_ids``
that restart at 0 for each document. transformers builds a block-diagonal
causal mask from restarting position ids when no attention mask is passed
(``masking_utils.find_packed_sequence_indices``; FlashAttention-2 uses them as
varlen boundaries), so attention stays inside documents. The first token of
each document gets label -100, so no loss term predicts across a boundary.

Chat / instruction JSONL: each line is ``{"messages": [{"role", "content"}...]}``
or ``{"prompt"|"instruction" [, "input"], "response"|"output"|"completion"}``.
The tokenizer's chat template renders it; the loss covers only assistant tokens,
taken from the template's ``{% generation %}`` markers
(``return_assistant_tokens_mask``). Whole examples are packed into blocks.

Tokenized blocks are cached on disk, keyed by the data files (path, size,
mtime), the tokenizer files and every setting that changes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from onecard.errors import BadInputError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
BAD_LINES = ("skip", "stop")
_CACHE_VERSION = 1


@dataclass
class Example:
    """One document / conversation: token ids and labels (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    """What was read, so the CLI can say it."""

    kind: str
    files: int
    documents: int
    train_blocks: int
    val_blocks: int
    train_tokens: int
    loss_tokens: int
    bad_lines: list[int]
    truncated: int
    cached: bool


class PackedDataset(torch.utils.data.Dataset):
    """Blocks of exactly ``seq_len`` tokens: input_ids, labels, position_ids (all LongTensor)."""

    def __init__(self, blocks: dict[str, torch.Tensor]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.blocks.items()}


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; no attention mask, so packed position ids define the documents."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _data_files(path: Path) -> tuple[str, list[Path]]:
    if not path.exists():
        raise BadInputError(f"training data '{path}' does not exist; pass --data a text file, a folder of "
                            f".txt/.md files, or a .jsonl file")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix ==
                                                                         ".jsonl"))
        if not files:
            raise BadInputError(f"data folder '{path}' has no .txt/.md/.rst/.jsonl files; add some or point "
                                f"--data at a file")
    kinds = {"chat" if f.suffix == ".jsonl" else "text" for f in files}
    if len(kinds) > 1:
        raise BadInputError(f"data folder '{path}' mixes .jsonl and text files; put them in separate folders")
    if all(f.stat().st_size == 0 for f in files):
        raise BadInputError(f"training data '{path}' is empty; add text (or JSONL examples) to it")
    return kinds.pop(), files


def _conversation(obj: object) -> list[dict[str, str]] | None:
    if not isinstance(obj, dict):
        return None
    msgs = obj.get("messages")
    if msgs is not None:
        ok = (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     and isinstance(m.get("content"), str) for m in msgs)
              and any(m["role"] == "assistant" for m in msgs))
        return msgs if ok else None
    prompt = obj.get("prompt", obj.get("instruction"))
    answer = next((obj[k] for k in ("response", "output", "completion") if k in obj), None)
    if not isinstance(prompt, str) or not isinstance(answer, str):
        return None
    extra = obj.get("input")
    if isinstance(extra, str) and extra:
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def read_chat_jsonl(files: list[Path], bad_lines: str) -> tuple[list[list[dict]], list[str]]:
    """Parse conversations; returns them and 'file:line' of every bad line (or raises with ``stop``)."""
    convs, bad = [], []
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                conv = _conversation(json.loads(line))
            except json.JSONDecodeError:
                conv = None
            if conv is None:
                bad.append(f"{f.name}:{lineno}")
                if bad_lines == "stop":
                    raise BadInputError(f"bad JSONL line {f}:{lineno} (need 'messages' with an assistant turn, or "
                                        f"'prompt'/'instruction' + 'response'/'output'); fix it or pass "
                                        f"--bad-lines skip")
                continue
            convs.append(conv)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        log.warning("skipped %d bad JSONL line(s): %s", len(bad), shown)
    if not convs:
        raise BadInputError(f"no usable examples in {', '.join(str(f) for f in files)} ({len(bad)} bad lines); "
                            f"see the expected JSONL format in docs/training.md")
    return convs, bad


def tokenize_chat(tokenizer, conv: list[dict]) -> Example:
    """Chat template -> ids; labels only where the template marks assistant generation."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError("the model's tokenizer has no chat template; train on plain text or add a "
                            "chat_template to tokenizer_config.json")
    if "{% generation %}" not in tokenizer.chat_template and "{%- generation %}" not in tokenizer.chat_template:
        raise BadInputError("the tokenizer's chat template has no {% generation %} markers, so assistant tokens "
                            "cannot be found; add them around the assistant content")
    enc = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])
    mask = list(enc["assistant_masks"])
    return Example(ids, [t if m else -100 for t, m in zip(ids, mask)])


def tokenize_text(tokenizer, text: str) -> Example:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


def pack(examples: list[Example], seq_len: int, pad_id: int, split_long: bool) -> dict[str, torch.Tensor]:
    """Greedy packing into ``seq_len`` rows; position ids restart per document, first label of each masked.

    Text documents longer than a row continue in the next row (``split_long``); chat examples are kept whole
    (truncated to ``seq_len`` by the caller) and start a new row when they do not fit.
    """
    rows_ids, rows_lab, rows_pos = [], [], []
    ids, lab, pos = [], [], []

    def flush():
        nonlocal ids, lab, pos
        if not ids:
            return
        n = seq_len - len(ids)
        rows_ids.append(ids + [pad_id] * n)
        rows_lab.append(lab + [-100] * n)
        rows_pos.append(pos + list(range(n)))  # padding is its own "document": nobody attends to it
        ids, lab, pos = [], [], []

    for ex in examples:
        e_ids, e_lab = ex.input_ids, list(ex.labels)
        e_lab[0] = -100  # never predict a document's first token from the previous document
        if not split_long and len(ids) + len(e_ids) > seq_len:
            flush()
        start = 0
        while start < len(e_ids):
            room = seq_len - len(ids)
            take = e_ids[start:start + room]
            ids += take
            lab += e_lab[start:start + room]
            pos += list(range(len(take)))
            start += len(take)
            if len(ids) == seq_len:
                flush()
    flush()
    if not rows_ids:
        return {k: torch.empty((0, seq_len), dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}
    return {"input_ids": torch.tensor(rows_ids), "labels": torch.tensor(rows_lab),
            "position_ids": torch.tensor(rows_pos)}


def _cache_key(files: list[Path], tokenizer, settings: dict) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(tokenizer.name_or_path.encode())
    h.update(str(len(tokenizer)).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:16]


def data_cache_dir() -> Path:
    root = Path(os.environ.get("ONECARD_CACHE", Path.home() / ".cache" / "onecard")) / "train-data"
    root.mkdir(parents=True, exist_ok=True)
    return root


def load_training_data(path: str | Path, tokenizer, seq_len: int, val_fraction: float = 0.05,
                       bad_lines: str = "stop", seed: int = 0, progress: bool = False,
                       use_cache: bool = True) -> tuple[PackedDataset, PackedDataset | None, DataReport]:
    """Read, tokenize (cached), split by document, pack. Raises BadInputError on unusable data."""
    if bad_lines not in BAD_LINES:
        raise BadInputError(f"--bad-lines must be one of {', '.join(BAD_LINES)}, not '{bad_lines}'")
    if not 0 <= val_fraction < 0.5:
        raise BadInputError(f"validation fraction {val_fraction} must be in [0, 0.5)")
    kind, files = _data_files(Path(path))
    settings = {"v": _CACHE_VERSION, "kind": kind, "seq_len": seq_len, "val": val_fraction, "seed": seed,
                "bad": bad_lines}
    cache = data_cache_dir() / f"{_cache_key(files, tokenizer, settings)}.pt"
    if use_cache and cache.exists():
        saved = torch.load(cache)
        report = DataReport(**{**saved["report"], "cached": True})
        if report.bad_lines:
            log.warning("skipped %d bad JSONL line(s) (cached): %s", len(report.bad_lines), ", ".join(report.bad_lines[:10]))
        val = PackedDataset(saved["val"]) if saved["val"] is not None else None
        return PackedDataset(saved["train"]), val, report

    bad: list[str] = []
    if kind == "chat":
        convs, bad = read_chat_jsonl(files, bad_lines)
        items, tok_fn = convs, (lambda c: tokenize_chat(tokenizer, c))
    else:
        items = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        items = [t for t in items if t.strip()]
        tok_fn = lambda t: tokenize_text(tokenizer, t)  # noqa: E731
    examples = _tokenize_all(items, tok_fn, progress, f"tokenizing {len(items)} {kind} item(s)")
    truncated = 0
    if kind == "chat":
        for ex in examples:
            if len(ex.input_ids) > seq_len:
                ex.input_ids, ex.labels = ex.input_ids[:seq_len], ex.labels[:seq_len]
                truncated += 1
        if truncated:
            log.warning("%d example(s) longer than --seq-len %d were truncated", truncated, seq_len)
        examples = [ex for ex in examples if any(t != -100 for t in ex.labels[1:])]
        if not examples:
            raise BadInputError(f"no example keeps an assistant token within --seq-len {seq_len}; raise --seq-len")

    train_ex, val_ex = _split(examples, val_fraction, seed)
    train = pack(train_ex, seq_len, tokenizer.pad_token_id or 0, split_long=kind == "text")
    val = pack(val_ex, seq_len, tokenizer.pad_token_id or 0, split_long=kind == "text") if val_ex else None
    if train["input_ids"].shape[0] == 0:
        raise BadInputError(f"training data '{path}' produced no tokens; add text to it")
    report = DataReport(kind=kind, files=len(files), documents=len(examples), train_blocks=train["input_ids"].shape[0],
                        val_blocks=0 if val is None else val["input_ids"].shape[0],
                        train_tokens=sum(len(e.input_ids) for e in train_ex),
                        loss_tokens=int((train["labels"] != -100).sum()), bad_lines=bad, truncated=truncated,
                        cached=False)
    if use_cache:
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"train": train, "val": val, "report": report.__dict__}, tmp)
        tmp.replace(cache)
    return PackedDataset(train), (PackedDataset(val) if val is not None else None), report


def _split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out whole documents; a single document is split at a token boundary instead."""
    if val_fraction == 0:
        return examples, []
    if len(examples) == 1:
        ex = examples[0]
        cut = int(len(ex.input_ids) * (1 - val_fraction))
        if cut < 2 or len(ex.input_ids) - cut < 2:
            return examples, []
        return [Example(ex.input_ids[:cut], ex.labels[:cut])], [Example(ex.input_ids[cut:], ex.labels[cut:])]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val_idx], [examples[i] for i in sorted(val_idx)]


def _tokenize_all(items, fn, progress: bool, label: str) -> list[Example]:
    if not progress:
        return [fn(x) for x in items]
    from rich.progress import Progress

    out = []
    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for x in items:
            out.append(fn(x))
            bar.advance(task)
    return out
