"""Structured outputs (xgrammar): every output of a constrained request is in its grammar and ends where the
grammar does, whatever the sampling; the constraint is checked at submission; unconstrained requests in the same
batch are untouched."""

from __future__ import annotations

import json
import re

import pytest

from onecard.engine import LLM, SamplingParams
from onecard.errors import BadInputError

pytest.importorskip("xgrammar")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "def f(x):\n    return {"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "tag": {"type": "string", "enum": ["red", "blue"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model.path, max_model_len=256, max_num_seqs=8, block_size=8)


def _check_schema(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == {"ok", "n", "tag"} and isinstance(obj["ok"], bool)
    assert obj["n"] in range(10) and obj["tag"] in ("red", "blue")


def test_json_schema_greedy_and_sampled(llm):
    params = [SamplingParams(temperature=0, max_tokens=80, json_schema=SCHEMA),
              SamplingParams(temperature=1.0, seed=2, max_tokens=80, json_schema=json.dumps(SCHEMA), n=4),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]  # unconstrained, same batch
    out = llm.generate([PROMPT] * 3, params, use_tqdm=False)
    for o in out[0].outputs + out[1].outputs:
        assert o.finish_reason == "stop"  # ended by the grammar, not by max_tokens
        _check_schema(o.text)
    assert out[2].outputs[0].token_ids == llm.generate([PROMPT], params[2], use_tqdm=False)[0].outputs[0].token_ids
    unconstrained = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=80), use_tqdm=False)
    with pytest.raises(ValueError):  # the model alone writes code here, not this JSON: the grammar did the work
        _check_schema(unconstrained[0].outputs[0].text)
    assert llm.stats()["kv_blocks_used"] == 0


def test_regex_choice_and_json_object(llm):
    out = llm.generate([PROMPT] * 3, [SamplingParams(temperature=0.8, seed=1, max_tokens=30, regex=r"\d{3}-\d{4}"),
                                      SamplingParams(temperature=0, max_tokens=30, choice=["yes", "no", "maybe"]),
                                      SamplingParams(temperature=0, max_tokens=200, json_object=True)],
                       use_tqdm=False)
    assert re.fullmatch(r"\d{3}-\d{4}", out[0].outputs[0].text)
    assert out[1].outputs[0].text in ("yes", "no", "maybe") and out[1].outputs[0].finish_reason == "stop"
    obj = out[2].outputs[0]
    assert obj.text.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)


def test_async_scheduling_and_speculation_step_aside_for_grammars(tiny_model):
    """The mask needs each token on the host: a constrained batch decodes one synchronous token a step."""
    kw = {"max_model_len": 256, "max_num_seqs": 4, "block_size": 8}
    spec = LLM(tiny_model.path, num_speculative_tokens=4, **kw)
    o = spec.generate([PROMPT], SamplingParams(temperature=0, max_tokens=80, json_schema=SCHEMA),
                      use_tqdm=False)[0].outputs[0]
    _check_schema(o.text)
    assert spec.stats()["spec_draft_tokens"] == 0
    overlapped = LLM(tiny_model.path, async_scheduling=True, **kw)
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = overlapped.generate([PROMPT, PROMPT], [SamplingParams(temperature=0, max_tokens=80, json_schema=SCHEMA),
                                                 plain], use_tqdm=False)
    _check_schema(out[0].outputs[0].text)
    assert out[1].outputs[0].token_ids == overlapped.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].token_ids


def test_bad_constraints_are_refused_at_submission(llm):
    with pytest.raises(BadInputError, match="json_schema: xgrammar cannot compile it"):
        llm.generate([PROMPT], SamplingParams(json_schema="{not json"), use_tqdm=False)
    with pytest.raises(BadInputError, match="regex: xgrammar cannot compile it"):
        llm.generate([PROMPT], SamplingParams(regex="(unclosed"), use_tqdm=False)
    with pytest.raises(BadInputError, match="one structured output constraint"):
        SamplingParams(regex="a+", choice=["a"])
    with pytest.raises(BadInputError, match="choice"):
        SamplingParams(choice=[])
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.gpu
def test_constraints_on_the_gpu_path(tiny_model):
    """On CUDA (graphs, async scheduling on, bf16) the mask reaches the device logits: constrained rows keep their
    grammar and a plain row in the same batch decodes as it does alone."""
    llm = LLM(tiny_model.path, dtype="bfloat16", max_model_len=256, max_num_seqs=4, gpu_memory_utilization=0.3,
              async_scheduling=True)
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = llm.generate([PROMPT] * 3, [SamplingParams(temperature=1.0, seed=3, max_tokens=80, json_schema=SCHEMA),
                                      SamplingParams(temperature=0, max_tokens=30, regex=r"\d{3}-\d{4}"), plain],
                       use_tqdm=False)
    _check_schema(out[0].outputs[0].text)
    assert re.fullmatch(r"\d{3}-\d{4}", out[1].outputs[0].text)
    assert out[2].outputs[0].token_ids == llm.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].token_ids
