"""Architectures we do not implement run through HF generate behind the same LLM API (and say so)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from onecard.engine import LLM, SamplingParams
from onecard.errors import BadInputError


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    from onecard.testing.checkpoints import build_random_model, shared_tokenizer

    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2,
           "vocab_size": 2048, "n_positions": 256, "bos_token_id": 1, "eos_token_id": 2}
    out = tmp_path_factory.mktemp("gpt2")
    build_random_model(cfg).save_pretrained(str(out))
    for f in shared_tokenizer(2048).iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_fallback_generates_like_hf_and_logs_once(gpt2_path, caplog):
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.WARNING):
        llm = LLM(gpt2_path, max_model_len=128)
    assert "HF transformers generate" in caplog.text
    assert llm.stats()["backend"] == "hf-fallback"
    out = llm.generate(["def f(x):", "import os"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(str(gpt2_path)).eval()
    ids = llm.tokenizer("def f(x):", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out[0].outputs[0].token_ids == ref and out[0].outputs[0].finish_reason == "length"
    assert out[1].prompt == "import os" and out[1].finished
    with pytest.raises(BadInputError, match="presence_penalty"):
        llm.generate("x", SamplingParams(presence_penalty=0.5), use_tqdm=False)
