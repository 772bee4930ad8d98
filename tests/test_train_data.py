"""Training data: packing keeps documents apart, chat loss only on assistant tokens, bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from onecard.errors import BadInputError
from onecard.train.data import Example, load_training_data, pack, tokenize_chat


@pytest.fixture(scope="module")
def tok(tiny_model):
    from onecard.train.trainer import load_tokenizer

    return load_tokenizer(tiny_model.path)


def test_pack_restarts_positions_and_masks_first_label_of_each_document():
    exs = [Example([10, 11, 12], [10, 11, 12]), Example([20, 21, 22, 23, 24, 25, 26], [20, 21, 22, 23, 24, 25, 26])]
    rows = pack(exs, seq_len=6, pad_id=0, split_long=True)
    assert rows["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22], [23, 24, 25, 26, 0, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    assert rows["labels"].tolist() == [[-100, 11, 12, -100, 21, 22], [23, 24, 25, 26, -100, -100]]


def test_pack_keeps_chat_examples_whole():
    exs = [Example([1, 2, 3, 4], [-100, -100, 3, 4]), Example([5, 6, 7], [-100, 6, 7])]
    rows = pack(exs, seq_len=6, pad_id=0, split_long=False)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4, 0, 0], [5, 6, 7, 0, 0, 0]]


def test_packed_attention_stays_inside_documents(random_checkpoint):
    """A document's logits do not change when another document shares its row (training: no KV cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(random_checkpoint("llama-3.1-8b")), attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 200, (1, 7), generator=g), torch.randint(3, 200, (1, 9), generator=g)
    alone = model(input_ids=b, use_cache=False).logits
    packed = model(input_ids=torch.cat([a, b], 1),
                   position_ids=torch.cat([torch.arange(7), torch.arange(9)])[None], use_cache=False).logits[:, 7:]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_chat_labels_cover_only_assistant_tokens(tok):
    conv = [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "four"}]
    ex = tokenize_chat(tok, conv)
    kept = [t for t, l in zip(ex.input_ids, ex.labels) if l != -100]
    assert kept and tok.decode(kept).replace(" ", "").startswith("four")
    assert "2+2" not in tok.decode(kept)


def test_text_folder_is_split_by_document_and_cached(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("ONECARD_CACHE", str(tmp_path / "cache"))
    for i in range(20):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " + "word " * 50)
    train, val, rep = load_training_data(tmp_path, tok, 64, val_fraction=0.1)
    assert rep.kind == "text" and rep.documents == 20 and not rep.cached
    assert len(train) > 0 and val is not None and len(val) > 0
    assert set(train[0]) == {"input_ids", "labels", "position_ids"} and train[0]["input_ids"].shape == (64,)
    _, _, rep2 = load_training_data(tmp_path, tok, 64, val_fraction=0.1)
    assert rep2.cached


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_bad_lines_stop_names_the_line(tok, tmp_path):
    good = json.dumps({"prompt": "hi", "response": "hello"})
    f = _jsonl(tmp_path / "d.jsonl", [good, "{not json", good])
    with pytest.raises(BadInputError, match=r"d.jsonl:2.*--bad-lines skip"):
        load_training_data(f, tok, 64, val_fraction=0.0, bad_lines="stop", use_cache=False)


def test_jsonl_bad_lines_skip_reports_them(tok, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    f = _jsonl(tmp_path / "d.jsonl", [good, json.dumps({"prompt": "no answer"}), good, "[]"])
    train, _, rep = load_training_data(f, tok, 64, val_fraction=0.0, bad_lines="skip", use_cache=False)
    assert rep.bad_lines == ["d.jsonl:2", "d.jsonl:4"] and rep.documents == 2 and len(train) >= 1
    assert (train[0]["labels"] != -100).any()


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "e.txt").write_text("") and None or p / "e.txt", "is empty"),
    (lambda p: (p / "sub").mkdir() or p / "sub", "no .txt"),
])
def test_missing_or_empty_data_is_one_line_error(tok, tmp_path, make, match):
    with pytest.raises(BadInputError, match=match) as err:
        load_training_data(make(tmp_path), tok, 64, use_cache=False)
    assert "\n" not in str(err.value)
