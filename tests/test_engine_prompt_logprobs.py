"""prompt_logprobs: every prompt token after the first scored as HF transformers scores it, also when the prompt is
prefilled in chunks, when its leading blocks sit in the prefix cache, and when it is recomputed after preemption."""

from __future__ import annotations

import pytest
import torch

from onecard.engine import LLM, SamplingParams
from onecard.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\nclass Stack:\n"
        "    def __init__(self):\n        self.items = []\n")


def _hf_logprobs(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)  # row p scores token p + 1


def _check(out, hf: torch.Tensor, k: int) -> None:
    ids, lps = out.prompt_token_ids, out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    for p in range(1, len(ids)):
        want = set(hf[p - 1].topk(k).indices.tolist()) | {ids[p]} if k else {ids[p]}
        assert lps[p].keys() == want, p
        assert max(abs(v - hf[p - 1, t].item()) for t, v in lps[p].items()) < 1e-4


def test_prompt_logprobs_match_hf(tiny_model):
    llm = LLM(tiny_model.path, max_model_len=256, max_num_seqs=4, block_size=8, enable_prefix_caching=True,
              enable_chunked_prefill=True, long_prefill_chunk=16)
    ids = llm.engine.tokenizer.encode(TEXT)
    hf = _hf_logprobs(tiny_model.path, ids)
    plain = llm.generate([TEXT], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None  # only when asked; this run also fills the prefix cache
    scored = llm.generate([TEXT], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, n=2),
                          use_tqdm=False)[0]
    _check(scored, hf, 2)  # 16-token chunks, the cached prefix not reused while scoring
    assert scored.outputs[0].token_ids == plain.outputs[0].token_ids
    _check(llm.generate([TEXT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0], hf, 0)
    assert llm.stats()["kv_blocks_used"] == 0


def test_prompt_logprobs_survive_preemption(tiny_model):
    """20 blocks of 8 tokens for three 70-token prompts decoding 40 tokens each: some are preempted and recomputed;
    their prompt logprobs are neither lost nor doubled."""
    llm = LLM(tiny_model.path, max_model_len=160, max_num_seqs=3, block_size=8, num_kv_blocks=20)
    prompts = [TEXT, TEXT.replace("a, b", "x, y"), TEXT.replace("Stack", "Queue")]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1),
                        use_tqdm=False)
    assert llm.stats()["num_preemptions"] > 0
    for out in outs:
        _check(out, _hf_logprobs(tiny_model.path, out.prompt_token_ids), 1)


def test_bad_prompt_logprobs():
    with pytest.raises(BadInputError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


@pytest.mark.gpu
def test_prompt_logprobs_on_the_gpu_path(tiny_model):
    """CUDA, bf16, chunked prefill through the varlen kernels: the scored prompt follows HF's fp32 logprobs within
    bf16's error, with HF's top-1 token kept wherever HF's margin is clear."""
    llm = LLM(tiny_model.path, dtype="bfloat16", max_model_len=256, max_num_seqs=4, gpu_memory_utilization=0.3,
              enable_chunked_prefill=True, long_prefill_chunk=16)
    ids = llm.engine.tokenizer.encode(TEXT)
    hf = _hf_logprobs(tiny_model.path, ids)
    out = llm.generate([TEXT], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1), use_tqdm=False)[0]
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    for p in range(1, len(ids)):
        top2 = hf[p - 1].topk(2)
        assert abs(lps[p][ids[p]] - hf[p - 1, ids[p]].item()) < 0.15, p
        if top2.values[0] - top2.values[1] > 0.3:
            assert top2.indices[0].item() in lps[p], p
