"""n-gram (prompt-lookup) speculative decoding: greedy outputs identical to plain decoding, acceptance counted,
no block leaks, logprobs as plain decoding reports them, penalties as plain decoding applies them (sampling:
test_engine_rejection_sampling.py); the drafting and acceptance rules themselves."""

from __future__ import annotations

import gc

import pytest
import torch

from onecard.engine import LLM, SamplingParams
from onecard.engine.speculative import VERIFIER_KERNELS, NgramIndex, accept_greedy
from onecard.errors import BadInputError

CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
        "    return a * b\n\n\ndef div(a, b):\n")


pytestmark = pytest.mark.usefixtures("one_thread")


def propose_ngram(ids: list[int], ngram_size: int, num_tokens: int, min_size: int = 1) -> list[int]:
    return NgramIndex(ngram_size, min_size).propose(ids, num_tokens)


def test_propose_ngram_takes_the_most_recent_longest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3, 2) == [7, 5]  # most recent earlier "1 2 3"
    assert propose_ngram([4, 5, 6, 5], 3, 3) == [6, 5]                          # falls back to the 1-gram "5"
    assert propose_ngram([1, 2, 3], 3, 4) == []
    assert propose_ngram([1, 1, 1], 2, 0) == []
    assert propose_ngram([4, 5, 6, 5], 3, 3, min_size=2) == []                  # a 1-gram is too weak to draft on
    assert propose_ngram([4, 5, 6, 4, 5], 3, 3, min_size=2) == [6, 4, 5]


def _scan(ids: list[int], ngram_size: int, num_tokens: int, min_size: int = 1) -> list[int]:
    """Every earlier position tested, longest n first, most recent first: what the index must return."""
    for n in range(min(ngram_size, len(ids) - 1), min_size - 1, -1):
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == ids[len(ids) - n:]:
                return ids[start + n:start + n + num_tokens] if num_tokens > 0 else []
    return []


def test_ngram_index_equals_the_plain_scan():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
        n, k = rng.randrange(1, 6), rng.randrange(0, 6)
        m = rng.randrange(1, n + 1)
        assert propose_ngram(ids, n, k, m) == _scan(ids, n, k, m), (ids, n, k, m)


def test_ngram_index_follows_a_growing_sequence():
    """One index per sequence, asked every step while tokens arrive one or several at a time (accepted drafts),
    with the last token sometimes a placeholder that is replaced before the next step (async scheduling)."""
    import random

    from onecard.engine.sequence import PLACEHOLDER

    rng = random.Random(1)
    for _ in range(200):
        n = rng.randrange(1, 5)
        m = rng.randrange(1, n + 1)
        ids, index = [rng.randrange(5) for _ in range(rng.randrange(1, 6))], NgramIndex(n, m)
        for _step in range(30):
            k = rng.randrange(0, 6)
            assert index.propose(ids, k) == _scan(ids, n, k, m), (ids, n, k, m)
            if rng.random() < 0.3:  # a step in flight: its token is a placeholder until the next step
                ids.append(PLACEHOLDER)
                assert index.propose(ids, k) == _scan(ids, n, k, m), (ids, n, k, m)
                ids[-1] = rng.randrange(5)
            ids.extend(rng.randrange(5) for _ in range(rng.randrange(1, 4)))


def test_accept_greedy_keeps_the_matching_prefix_plus_one():
    assert accept_greedy([5, 6, 7], [5, 6, 9, 1]) == [5, 6, 9]
    assert accept_greedy([5, 6], [5, 6, 8]) == [5, 6, 8]
    assert accept_greedy([5], [4, 0]) == [4]
    assert accept_greedy([], [3]) == [3]


@pytest.mark.parametrize("arch", ["trained", "llama-2-7b"])
def test_greedy_outputs_identical_with_speculation(arch, tiny_model, random_checkpoint):
    path = tiny_model.path if arch == "trained" else random_checkpoint(arch)
    prompts = [CODE, CODE.replace("a, b", "x, y"), "import os\nimport sys\nimport os\n"]
    sp = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (40, 33, 25)]
    plain = LLM(path, max_model_len=256, max_num_seqs=4, block_size=8)
    spec = LLM(path, max_model_len=256, max_num_seqs=4, block_size=8, num_speculative_tokens=4)
    ref = [o.outputs[0].token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]
    got = spec.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == ref
    assert [len(o.outputs[0].token_ids) for o in got] == [40, 33, 25]  # max_tokens respected with drafts
    st = spec.stats()
    assert st["spec_draft_tokens"] > 0 and st["kv_blocks_used"] == 0
    assert all(b.ref_count == 0 for b in spec.engine.block_manager.blocks)
    if arch == "trained":  # a model trained on code continues the repeated definitions the prompt lays out
        assert st["spec_accepted_tokens"] > 0 and 0 < st["spec_acceptance_rate"] <= 1


@pytest.mark.gpu
def test_greedy_outputs_identical_with_speculation_on_gpu(tiny_model):
    # the CUDA decode path (Triton attention, CUDA graphs, bf16): verify rows must read the draft rows' keys and
    # values after they are stored, and sum their attention in plain decoding's order; one sequence at a time, as
    # the benchmark runs it (plain decoding's matmuls at M = 1, the verifier's at k + 1), against plain decoding on
    # the verifier's kernels
    prompts = [CODE, CODE.replace("a, b", "x, y")]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = {"max_model_len": 256, "max_num_seqs": 1, "device": "cuda", "dtype": "bfloat16"}
    plain = LLM(tiny_model.path, **VERIFIER_KERNELS, **kw)  # the verifier's matmuls and attention kernels
    ref = [o.outputs[0].token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]
    del plain  # its KV cache holds most of the card: the second engine sizes its own from what is free
    gc.collect()
    torch.cuda.empty_cache()
    spec = LLM(tiny_model.path, num_speculative_tokens=4, **kw)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, sp, use_tqdm=False)] == ref
    assert spec.stats()["spec_accepted_tokens"] > 0


def test_penalized_requests_speculate_with_plain_outputs(tiny_model):
    """Each verify row is penalized as plain decoding penalizes its position (the draft tokens before it counted
    as output): greedy outputs stay identical, drafts still get accepted."""
    kw = {"max_model_len": 256, "max_num_seqs": 4, "block_size": 8}
    spec = LLM(tiny_model.path, num_speculative_tokens=4, **kw)
    plain = LLM(tiny_model.path, **kw)
    prompts = [CODE, CODE.replace("a, b", "x, y")]
    for sp in (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.15),
               SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, frequency_penalty=0.4,
                              presence_penalty=0.3)):
        before = spec.stats()["spec_accepted_tokens"]
        got = [o.outputs[0].token_ids for o in spec.generate(prompts, sp, use_tqdm=False)]
        ref = [o.outputs[0].token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]
        unpenalized = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                     use_tqdm=False)
        assert got == ref and ref != [o.outputs[0].token_ids for o in unpenalized]  # the penalties do bite
        assert spec.stats()["spec_accepted_tokens"] > before


def _teacher_forced_logprobs(path, prompt_ids: list[int], out_ids: list[int]) -> torch.Tensor:
    """HF transformers' log-softmax at each generated position: [len(out_ids), V]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + out_ids])).logits[0].float()
    return logits[len(prompt_ids) - 1:-1].log_softmax(-1)


def test_logprobs_with_speculation(tiny_model):
    """Requests with logprobs speculate: greedy ones give plain decoding's tokens and logprobs, and every kept
    token of a sampled one (accepted draft or not) carries the model's logprobs at its position (top-k and
    its own), checked against HF transformers over the whole output."""
    kw = {"max_model_len": 256, "max_num_seqs": 4, "block_size": 8}
    spec = LLM(tiny_model.path, num_speculative_tokens=4, **kw)
    plain = LLM(tiny_model.path, **kw)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=3)
    got = spec.generate([CODE], greedy, use_tqdm=False)[0].outputs[0]
    ref = plain.generate([CODE], greedy, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == ref.token_ids and len(got.logprobs) == 40
    for g, r in zip(got.logprobs, ref.logprobs):
        assert g.keys() == r.keys() and max(abs(g[t] - r[t]) for t in g) < 1e-4
    assert abs(got.cumulative_logprob - ref.cumulative_logprob) < 1e-3
    assert spec.stats()["spec_accepted_tokens"] > 0

    before = spec.stats()["spec_accepted_tokens"]
    sampled = SamplingParams(temperature=0.4, seed=5, max_tokens=40, ignore_eos=True, logprobs=2)
    out = spec.generate([CODE], sampled, use_tqdm=False)[0]
    assert spec.stats()["spec_accepted_tokens"] > before  # some kept tokens were accepted drafts
    toks, lps = out.outputs[0].token_ids, out.outputs[0].logprobs
    hf = _teacher_forced_logprobs(tiny_model.path, out.prompt_token_ids, toks)
    assert len(lps) == len(toks) == hf.shape[0]
    for i, (tok, lp) in enumerate(zip(toks, lps)):
        top_i = hf[i].topk(2).indices
        assert set(top_i.tolist()) | {tok} == lp.keys()
        assert max(abs(lp[t] - hf[i, t].item()) for t in lp) < 1e-4
    assert abs(out.outputs[0].cumulative_logprob - sum(hf[i, t].item() for i, t in enumerate(toks))) < 1e-3


def test_speculative_options_are_validated(random_checkpoint):
    path = random_checkpoint("llama-2-7b")
    with pytest.raises(BadInputError, match="num_speculative_tokens"):
        LLM(path, num_speculative_tokens=-1)
    with pytest.raises(BadInputError, match="ngram_size"):
        LLM(path, num_speculative_tokens=2, ngram_size=0)
    with pytest.raises(BadInputError, match=r"ngram_min_size=4: must be an integer in 1..ngram_size \(3\)"):
        LLM(path, num_speculative_tokens=2, ngram_size=3, ngram_min_size=4)


def test_hf_fallback_refuses_speculation(tmp_path):
    import shutil

    from onecard.errors import NotBuiltYetError
    from onecard.testing.checkpoints import build_random_model, shared_tokenizer

    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2,
           "vocab_size": 2048, "n_positions": 128, "bos_token_id": 1, "eos_token_id": 2}
    build_random_model(cfg).save_pretrained(str(tmp_path))
    for f in shared_tokenizer(2048).iterdir():
        shutil.copy(f, tmp_path / f.name)
    with pytest.raises(NotBuiltYetError, match="num_speculative_tokens"):
        LLM(tmp_path, num_speculative_tokens=2)


def _record_decode_logits(llm: LLM) -> tuple[dict[int, list], list[int]]:
    """Wrap the runner's decode forward: every row's logits, keyed by the row's length (its position + 1), and
    the row count of every call."""
    runner, seen, calls = llm.engine.runner, {}, []
    decode = runner.decode_logits

    def wrapped(rows):
        logits = decode(rows)
        calls.append(len(rows))
        for row, lg in zip(rows, logits):
            seen.setdefault(len(row), []).append(lg.clone())
        return logits

    runner.decode_logits = wrapped
    return seen, calls


def test_verify_rows_are_decode_rows(tiny_model):
    """A verify step runs each draft position as a plain decode row (same attention path as decode; on CUDA the
    Triton kernel inside the decode CUDA graphs): for the same token at the same position its logits equal plain
    decoding's up to the matmul rounding of M = k + 1 rows instead of 1 (CPU BLAS blocks them differently: ~1e-6
    here), and greedy outputs are identical. fp32 everywhere, so the check means the same on a GPU."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(tiny_model.path, dtype="float32", max_model_len=256, max_num_seqs=1, block_size=8)
    spec = LLM(tiny_model.path, dtype="float32", max_model_len=256, max_num_seqs=1, block_size=8,
               num_speculative_tokens=4)
    (ref, _), (got, calls) = _record_decode_logits(plain), _record_decode_logits(spec)
    assert plain.generate([CODE], sp, use_tqdm=False)[0].outputs[0].token_ids == \
        spec.generate([CODE], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert spec.stats()["spec_accepted_tokens"] > 0
    assert max(calls) > 1  # one sequence: a call of several rows is a verify step, its drafts ran as decode rows
    verified = [n for n in got if n in ref]
    assert len(verified) >= 39  # every generated position after the first was compared
    for n in verified:  # a rejected draft token gives its row other logits: the closest row is the accepted one
        diff = min((g - ref[n][0]).abs().max().item() for g in got[n])
        assert diff < 1e-4, f"position {n - 1}: verify logits differ from decode by {diff}"


def test_decode_graphs_hold_every_verify_row():
    """With speculation on, a verify step at max_num_seqs needs (1 + k) rows per sequence in one decode graph;
    the cap still holds."""
    from types import SimpleNamespace

    from onecard.engine.model_runner import graph_batch_sizes, graph_max_batch

    cfg = SimpleNamespace(max_num_seqs=3, num_speculative_tokens=4, cuda_graph_max_batch=256)
    assert graph_max_batch(cfg) == 15 and graph_batch_sizes(graph_max_batch(cfg))[-1] == 15
    assert graph_max_batch(SimpleNamespace(max_num_seqs=3, num_speculative_tokens=0, cuda_graph_max_batch=256)) == 3
    assert graph_max_batch(SimpleNamespace(max_num_seqs=256, num_speculative_tokens=4, cuda_graph_max_batch=256)) == 256


def test_speculation_keeps_the_three_launch_decode_attention():
    """A sequence's verify rows read one another's freshly stored keys/values: the one-launch decode attention
    stores and reads them in no set order (a race that the in-order CPU interpreter never shows; on an H200 a
    12-layer greedy run diverged from plain decoding), so speculation runs the store before the attention."""
    from onecard.engine.config import EngineConfig

    assert EngineConfig("m").fuses_decode_attention()
    assert not EngineConfig("m", num_speculative_tokens=2).fuses_decode_attention()
    assert not EngineConfig("m", fused_decode_attention=False).fuses_decode_attention()


def test_logit_bias_with_and_without_speculation(tiny_model):
    """A +100 bias makes its token the greedy choice at every step; a -100 bias bans the model's favourite; the
    same biased requests speculate (each verify row biased alike) and decode asynchronously with plain outputs."""
    kw = {"max_model_len": 256, "max_num_seqs": 4, "block_size": 8}
    plain = LLM(tiny_model.path, **kw)
    free = plain.generate([CODE], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    favourite = max(set(free[0].outputs[0].token_ids), key=free[0].outputs[0].token_ids.count)
    forced = plain.generate([CODE], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                   logit_bias={favourite: 100.0}), use_tqdm=False)
    assert forced[0].outputs[0].token_ids == [favourite] * 6
    banned = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logit_bias={favourite: -100.0})
    ref = plain.generate([CODE], banned, use_tqdm=False)[0].outputs[0].token_ids
    assert favourite not in ref
    spec = LLM(tiny_model.path, num_speculative_tokens=4, **kw)
    assert spec.generate([CODE], banned, use_tqdm=False)[0].outputs[0].token_ids == ref
    overlapped = LLM(tiny_model.path, async_scheduling=True, **kw)
    assert overlapped.generate([CODE], banned, use_tqdm=False)[0].outputs[0].token_ids == ref
    with pytest.raises(BadInputError, match="logit_bias token id 99999 is outside the vocabulary"):
        plain.generate([CODE], SamplingParams(logit_bias={99999: 1.0}), use_tqdm=False)
    with pytest.raises(BadInputError, match="logit_bias"):
        SamplingParams(logit_bias={1: 500.0})


def test_accept_drafts_biases_every_verify_row():
    """Row 0 of a verify step is biased like every other: the banned token is neither accepted nor emitted."""
    from onecard.engine.sequence import Sequence
    from onecard.engine.speculative import accept_drafts

    seq = Sequence("r", 0, [1, 2, 3], SamplingParams(temperature=0, logit_bias={4: -100.0}), None)
    seq.draft_tokens = [4, 5]
    logits = torch.zeros(3, 8)
    logits[:, 4], logits[:, 5] = 2.0, 1.0  # unbiased, every row's argmax is 4: the draft's first token
    assert accept_drafts([seq], logits, {}) == [[5]]
    seq.params = SamplingParams(temperature=0)
    assert accept_drafts([seq], logits, {}) == [[4, 4]]


def test_min_tokens_holds_back_stops_with_and_without_speculation(tiny_model):
    """The model's favourite token made a stop token: plain decoding stops on it at once; with min_tokens=12 it
    cannot stop before 12 tokens, and speculation and async scheduling give the same tokens."""
    kw = {"max_model_len": 256, "max_num_seqs": 4, "block_size": 8}
    plain = LLM(tiny_model.path, **kw)
    first = plain.generate([CODE], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0].outputs[0]
    stop = first.token_ids[0]
    quick = plain.generate([CODE], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert quick.token_ids == [stop] and quick.finish_reason == "stop"
    held = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop], min_tokens=12)
    ref = plain.generate([CODE], held, use_tqdm=False)[0].outputs[0]
    assert len(ref.token_ids) > 12 and stop not in ref.token_ids[:12]
    for other in (LLM(tiny_model.path, num_speculative_tokens=4, **kw), LLM(tiny_model.path, async_scheduling=True, **kw)):
        assert other.generate([CODE], held, use_tqdm=False)[0].outputs[0].token_ids == ref.token_ids
    with pytest.raises(BadInputError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_accept_drafts_counts_drafts_toward_min_tokens():
    """Verify row i's token comes after i draft tokens: the stop ban lifts on the row that reaches min_tokens."""
    from onecard.engine.sequence import Sequence
    from onecard.engine.speculative import accept_drafts

    seq = Sequence("r", 0, [1, 2, 3], SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4]), None)
    seq.token_ids.append(9)  # one token generated: rows 0 and 1 make tokens 2 and 3 (banned), row 2 token 4
    seq.stop_ids, seq.draft_tokens = [4], [5, 6]
    logits = torch.zeros(3, 8)
    logits[:, 4] = 3.0  # the stop token is every row's favourite
    logits[0, 5] = logits[1, 6] = logits[2, 7] = 2.0  # then the draft's tokens, then 7
    assert accept_drafts([seq], logits, {}) == [[5, 6, 4]]
