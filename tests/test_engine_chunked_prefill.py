"""Chunked prefill: greedy outputs and logprobs equal unchunked; running requests keep decoding while a long
prompt prefills; the attention over a cached prefix equals plain causal attention."""

from __future__ import annotations

import pytest
import torch

from onecard.engine import LLM, SamplingParams
from onecard.errors import BadInputError
from onecard.models.llama import prefill_attention, prefill_attention_with_prefix

TEXT = ("import os\nimport sys\n\ndef read_config(path):\n    with open(path) as f:\n        return f.read()\n\n"
        "class Parser:\n    def __init__(self, text):\n        self.text = text\n")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_path(random_checkpoint):
    return random_checkpoint("llama-2-7b")


def test_prefix_attention_equals_causal_attention():
    torch.manual_seed(0)
    H, KV, D, bs, n = 4, 2, 16, 4, 23
    q, k, v = torch.randn(n, H, D), torch.randn(n, KV, D), torch.randn(n, KV, D)
    ref = prefill_attention(q, k, v, [n], D ** -0.5)
    k_cache, v_cache = torch.zeros(10, bs, KV, D), torch.zeros(10, bs, KV, D)
    table = torch.tensor([[7, 2, 9, 0, 5, 1]])  # scattered blocks
    slots = table[0][torch.arange(n) // bs] * bs + torch.arange(n) % bs
    k_cache.view(-1, KV, D)[slots], v_cache.view(-1, KV, D)[slots] = k, v
    got = torch.cat([prefill_attention_with_prefix(q[s:e], k_cache, v_cache, [e - s], [s], table, D ** -0.5)
                     for s, e in [(0, 5), (5, 6), (6, 17), (17, 23)]])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_unchunked(llama_path):
    prompts = [TEXT, TEXT[40:] + "x = 1", "def f():"]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    whole = LLM(llama_path, max_model_len=256, max_num_seqs=4, block_size=8, enable_chunked_prefill=False,
                enable_prefix_caching=False)
    chunked = LLM(llama_path, max_model_len=256, max_num_seqs=4, block_size=8, long_prefill_chunk=7,
                  enable_prefix_caching=False)
    assert len(whole.tokenizer.encode(TEXT)) > 3 * 7  # the long prompt really takes several chunks
    a = whole.generate(prompts, sp, use_tqdm=False)
    b = chunked.generate(prompts, sp, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert lx.keys() == ly.keys()
            assert all(abs(lx[t] - ly[t]) < 1e-4 for t in lx)
    assert chunked.stats()["chunked_prefill"] and chunked.stats()["kv_blocks_used"] == 0


def test_decodes_continue_while_a_long_prompt_prefills(llama_path):
    llm = LLM(llama_path, max_model_len=256, max_num_seqs=4, block_size=8, long_prefill_chunk=8,
              max_num_batched_tokens=8)
    eng = llm.engine
    eng.add_request("short", "def f():", SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    eng.step()  # prefill of the short prompt: it is now decoding
    eng.add_request("long", TEXT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    long_seq = eng.requests["long"].seqs[0]
    short_seq = eng.requests["short"].seqs[0]
    steps, decoded = 0, 0
    while long_seq.num_completion_tokens == 0:
        before = short_seq.num_completion_tokens
        eng.step()
        steps += 1
        decoded += short_seq.num_completion_tokens - before
    assert steps >= 2 * (len(long_seq.token_ids) // 8) - 2  # the prompt took many chunks...
    assert decoded >= steps // 2 - 1  # ...and the short request decoded every other step meanwhile
    while eng.has_unfinished_requests():
        eng.step()
    # The interleaving does not change what the short request generates.
    alone = llm.generate(["def f():"], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    assert short_seq.completion_token_ids == alone[0].outputs[0].token_ids


def test_chunk_options_are_validated(llama_path):
    with pytest.raises(BadInputError, match="long_prefill_chunk"):
        LLM(llama_path, long_prefill_chunk=0)
    with pytest.raises(BadInputError, match="long_prefill_chunk"):
        LLM(llama_path, long_prefill_chunk=8, enable_chunked_prefill=False)
    with pytest.raises(BadInputError, match="enable_chunked_prefill"):
        LLM(llama_path, max_model_len=256, max_num_batched_tokens=64, enable_chunked_prefill=False)
    # with chunking, a budget below max_model_len is fine: long prompts just take several steps
    llm = LLM(llama_path, max_model_len=256, max_num_batched_tokens=64, max_num_seqs=2)
    assert llm.engine.scheduler.long_prefill_chunk == 64


@pytest.mark.gpu
def test_gpu_prefix_cache_chunking_and_speculation_keep_greedy_outputs(tiny_model):
    """On CUDA (graphs, Triton decode, SDPA over the paged cache), fp32: every capacity feature on gives the
    tokens of all of them off."""
    prompts = [TEXT, TEXT + TEXT[:60], "def f():"]
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    off = LLM(tiny_model.path, dtype="float32", max_model_len=512, max_num_seqs=4, gpu_memory_utilization=0.3,
              enable_prefix_caching=False, enable_chunked_prefill=False)
    ref = [o.outputs[0].token_ids for o in off.generate(prompts, sp, use_tqdm=False)]
    del off
    on = LLM(tiny_model.path, dtype="float32", max_model_len=512, max_num_seqs=4, gpu_memory_utilization=0.3,
             long_prefill_chunk=16, num_speculative_tokens=4)
    assert on.stats()["cuda_graphs"]
    for _ in range(2):  # the second round hits the prefix cache
        assert [o.outputs[0].token_ids for o in on.generate(prompts, sp, use_tqdm=False)] == ref
    st = on.stats()
    assert st["prefix_cache_hit_tokens"] > 0 and st["spec_draft_tokens"] > 0 and st["kv_blocks_used"] == 0
