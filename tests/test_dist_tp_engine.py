"""``LLM(tensor_parallel_size=2)`` on CPU (gloo, 2 processes): the same greedy tokens as one process (bf16-layout, int8,
RTN int4 and GPTQ-folder models), workers that
exit with the LLM (a second TP engine then starts in the same process), and a dead worker reported as a one-line error instead of a hang."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch

from onecard.engine import LLM, SamplingParams
from onecard.errors import BadInputError, OnecardError
from onecard.testing import make_random_checkpoint

PROMPTS = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77], [7, 3, 11], [100] * 12]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# Small engine, but every path: chunked prefill over the paged cache (chunk 8 < prompt 19), shared prefixes
# (two requests with one prompt), decode batches of 1-4, and n-gram speculative verify steps in the GQA case.
ENGINE = {"device": "cpu", "max_model_len": 64, "max_num_seqs": 4, "block_size": 8, "long_prefill_chunk": 8}
CASES = {
    "llama-2-mha": ("llama-2-7b", None, {}),
    "llama-3-gqa": ("llama-3.1-8b", {"num_key_value_heads": 2}, {"num_speculative_tokens": 2}),
    "llama-2-int8": ("llama-2-7b", None, {"quantization": "int8"}),
    "llama-3-gqa-rtn-int4": ("llama-3.1-8b", {"num_key_value_heads": 2}, {"quantization": "rtn-int4-g32"}),
    "qwen2-gptq-folder": ("qwen2-7b", None, {"quantized_folder": 32}),  # GPTQ layout, 4-bit groups of 32
}


def _folder(arch: str, overrides: dict | None, extra: dict, tmp_path) -> tuple[object, dict]:
    """The case's model folder (quantized into ``tmp_path`` when it asks) and the remaining LLM arguments."""
    folder = make_random_checkpoint(arch, "tiny", overrides=overrides)
    extra = dict(extra)
    group = extra.pop("quantized_folder", None)
    if group is not None:
        from onecard.quant import QuantConfig, quantize_model_folder

        folder = quantize_model_folder(folder, tmp_path / "q", QuantConfig("rtn", 4, group), progress=False).out_dir
    return folder, extra


def _generate(llm: LLM) -> list[list[int]]:
    outs = llm.generate([*PROMPTS, PROMPTS[0]], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _gone(pids: list[int], within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
                    alive += [pid] if f.read().split()[2] != "Z" else []
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_tp2_async_scheduling_generates_the_single_process_tokens():
    """Async scheduling over 2 ranks: the driver launches step t+1 before reading step t, and the worker takes each
    in-flight row's input token from the sample the driver broadcast. Requests of different lengths and a sampled
    one (seeded) leave and join the decode batch at different steps, so rows move between steps; a penalized one
    decodes with its steps in flight too."""
    folder = make_random_checkpoint("llama-2-7b", "tiny")
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (9, 3, 6)]
    params.append(SamplingParams(temperature=0.8, seed=3, max_tokens=7, ignore_eos=True))
    # penalties count the in-flight token on the device; a logit bias rides along
    params.append(SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, frequency_penalty=0.7,
                                 repetition_penalty=1.3, logit_bias={5: 3.0}))
    prompts = [*PROMPTS, PROMPTS[1], PROMPTS[0]]

    def run(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    ref = run(LLM(folder, **ENGINE, async_scheduling=False))
    llm = LLM(folder, tensor_parallel_size=2, async_scheduling=True, **ENGINE)
    assert llm.engine.overlap
    assert run(llm) == ref
    assert [len(t) for t in ref] == [9, 3, 6, 7, 8]
    llm.engine.runner.close()


@pytest.mark.parametrize("case", CASES)
def test_tp2_generates_the_single_process_tokens(case, tmp_path):
    folder, extra = _folder(*CASES[case], tmp_path)
    ref = _generate(LLM(folder, **ENGINE, **extra))
    llm = LLM(folder, tensor_parallel_size=2, **ENGINE, **extra)
    runner = llm.engine.runner
    pids = [p.pid for p, _ in runner._workers]
    assert len(pids) == 1 and _gone(pids, within_s=0) is False
    a = runner.model.args
    assert a.num_kv_heads == max(1, runner.model.full_args.num_kv_heads // 2)  # this rank's heads (1: replicated)
    assert runner.kv_cache.shape[4] == a.num_kv_heads
    got = _generate(llm)
    assert got == ref
    assert all(len(t) == GREEDY.max_tokens for t in got)
    quantized = llm.engine.runner.model.layers[0].mlp.down_proj.linear
    assert (type(quantized).__name__ == "QuantLinear") == (case not in ("llama-2-mha", "llama-3-gqa"))
    if extra.get("num_speculative_tokens"):
        assert llm.stats()["spec_draft_tokens"] > 0  # the verify path ran on both ranks
    del llm, runner
    gc.collect()
    assert _gone(pids), "the worker outlived its LLM"


def test_quantized_split_that_cuts_a_group_is_refused_before_starting():
    folder = make_random_checkpoint("llama-2-7b", "tiny")  # MLP 704 wide: 352 per rank, not whole groups of 128
    with pytest.raises(BadInputError, match="not a multiple of the group size 128"):
        LLM(folder, tensor_parallel_size=2, quantization="rtn-int4", **ENGINE)
    assert not torch.distributed.is_initialized()


def test_dead_worker_is_a_one_line_error():
    folder = make_random_checkpoint("llama-2-7b", "tiny")
    llm = LLM(folder, tensor_parallel_size=2, **ENGINE)
    proc, _ = llm.engine.runner._workers[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    t0 = time.monotonic()
    with pytest.raises(OnecardError, match="worker rank 1 exited") as err:
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert time.monotonic() - t0 < 30 and "\n" not in str(err.value)
    llm.engine.runner.close()
    assert not torch.distributed.is_initialized()  # the group is left: the next TP engine can start here


_CUDA_CHILD = """
import gc, json, sys
import torch
from onecard.dist.tp import symm_mem_unavailable
from onecard.engine import LLM
from onecard.testing import make_random_checkpoint
sys.path.insert(0, sys.argv[2])
from test_dist_tp_engine import ENGINE, _generate

folder = make_random_checkpoint("llama-3.1-8b", "tiny", overrides={"num_key_value_heads": 2})
gpu = {**ENGINE, "device": "cuda", "dtype": "float32", "gpu_memory_utilization": 0.3}
one = LLM(folder, quantization=sys.argv[1], **gpu)
ref = _generate(one)
del one
gc.collect()
torch.cuda.empty_cache()
llm = LLM(folder, quantization=sys.argv[1], tensor_parallel_size=2, **gpu)
model = llm.engine.runner.model
print(json.dumps({"ref": ref, "tp": _generate(llm), "graphs": bool(llm.stats()["cuda_graphs"]),
                  "async": llm.engine.overlap,
                  "base": type(model.layers[0].mlp.down_proj.linear).__name__,
                  "symm": model.layers[0].mlp.down_proj.fast is not None,
                  "symm_expected": symm_mem_unavailable(torch.device("cuda", 0), 2) is None}))
llm.engine.runner.close()
"""


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("quantization", ["int8", "rtn-int4-g32"])
def test_tp2_quantized_on_cuda_generates_the_single_gpu_tokens(quantization):
    """On GPUs the shards run our Triton int8/int4 kernels, with the all-reduces (symmetric memory where the GPUs
    reach each other, else NCCL) inside each rank's CUDA graphs, async scheduling on (fp32 activations, so a different summation order
    cannot flip a greedy token of the random model). Each case runs in its own process: a process whose NCCL
    all-reduces were graph-captured cannot leave its group cleanly (pytorch#115388), so cannot start a second."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    run = subprocess.run([sys.executable, "-c", _CUDA_CHILD, quantization, str(here)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["graphs"] and r["async"] and r["base"] == "QuantLinear" and r["symm"] == r["symm_expected"]
    assert r["tp"] == r["ref"]


def test_nccl_teardown_that_hangs_does_not_hang_close(monkeypatch, caplog):
    """destroy/abort of an NCCL group whose all-reduces sit in CUDA graphs can block forever (pytorch#115388):
    close() gives up after the timeout with a warning instead of never returning."""
    import threading
    import time

    import torch.distributed as dist

    from onecard.engine import tp_engine

    stuck, called = threading.Event(), []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda *a: called.append(1) or stuck.wait())
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="onecard.engine.tp_engine"):
        tp_engine.leave_group(timeout_s=0.3)
    stuck.set()
    assert called and time.monotonic() - t0 < 5
    assert "did not tear down" in caplog.text
