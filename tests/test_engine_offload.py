"""Weight offload (issue 6.4): layers streamed from host memory give the same logits and greedy tokens as resident
ones (bf16/fp32, rtn-int4 and fp8), whichever layers and however many, on CPU and (``gpu``) on CUDA;
the speed estimate's arithmetic."""

from __future__ import annotations

import pytest
import torch

from onecard.engine import LLM, SamplingParams
from onecard.engine.config import EngineConfig
from onecard.engine.offload import expected_tok_s, offloaded_indices, resident_step_bytes
from onecard.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["def add(a, b):\n    return", "import os\nimport sys\n", "class Point:\n    def __init__(self"]


def _llm(path, **kw) -> LLM:
    return LLM(path, max_model_len=128, max_num_seqs=4, block_size=8, device="cpu", **kw)


def _logits(llm: LLM, ids: torch.Tensor) -> torch.Tensor:
    return llm.engine.runner.model.logits(ids)


def test_offloaded_indices_spread_evenly_and_validate():
    assert offloaded_indices(8, 2) == [2, 6]
    assert offloaded_indices(4, 4) == [0, 1, 2, 3]
    assert offloaded_indices(80, 36) == sorted(set(offloaded_indices(80, 36)))  # distinct, ascending
    assert offloaded_indices(5, 0) == []
    with pytest.raises(BadInputError, match="offload_layers=6"):
        offloaded_indices(5, 6)
    with pytest.raises(BadInputError, match="offload_layers"):
        EngineConfig("m", offload_layers=-1)
    with pytest.raises(BadInputError, match="offload_layers"):
        EngineConfig("m", offload_layers="half")


@pytest.mark.parametrize("n", [1, 2, 3, 4])  # one slot, two slots, odd wrap-around, every layer
def test_logits_identical_with_offload(tiny_model, n):
    plain = _llm(tiny_model.path)
    ids = torch.tensor(plain.tokenizer.encode(PROMPTS[0] * 3))
    ref = _logits(plain, ids)
    llm = _llm(tiny_model.path, offload_layers=n)
    streamer = llm.engine.runner.model.offload
    assert len(streamer.layers) == n and streamer.num_slots == min(2, n)
    slot_ptrs = [s.data_ptr() for s in streamer.slots]
    for layer in streamer.layers:  # the forward reads the staging slots, never a private copy
        w = layer.mlp.down_proj.weight
        assert any(p <= w.data_ptr() < p + streamer.layer_bytes for p in slot_ptrs)
    for _ in range(2):  # twice: the second forward starts from the first one's wrap-around prefetch
        assert torch.equal(_logits(llm, ids), ref)


@pytest.mark.parametrize("quantization", [None, "rtn-int4", "fp8"])
def test_greedy_generation_identical_with_offload(random_checkpoint, tiny_model, quantization):
    path = tiny_model.path if quantization is None else random_checkpoint("llama-2-7b")
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = _llm(path, quantization=quantization)
    off = _llm(path, quantization=quantization, offload_layers=2)
    ids = torch.arange(3, 40)
    assert torch.equal(_logits(off, ids), _logits(plain, ids))
    ref = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, sp, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in off.generate(PROMPTS, sp, use_tqdm=False)] == ref
    if quantization:
        from onecard.quant import Fp8Linear, QuantLinear

        want = Fp8Linear if quantization == "fp8" else QuantLinear
        assert isinstance(off.engine.runner.model.offload.layers[0].mlp.down_proj, want)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "rtn-int4", "fp8"])
def test_cuda_decode_identical_with_offload(quantization):
    """On a GPU the streamed layers come from pinned memory on a copy stream, ordered by events: the same logits
    and greedy tokens as the resident model with its CUDA graphs (bf16, our int4 kernels, fp8 ``_scaled_mm``)."""
    from onecard.testing import make_random_checkpoint

    if quantization == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 weights need compute capability 8.9+")
    path = make_random_checkpoint("llama-2-7b", "tiny", dtype="bfloat16")
    kw = dict(max_model_len=256, max_num_seqs=4, dtype="bfloat16", gpu_memory_utilization=0.3,
              quantization=quantization)
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ids = torch.arange(3, 40, device="cuda")
    plain = LLM(path, **kw)
    ref_logits, ref = _logits(plain, ids), [o.outputs[0].token_ids for o in plain.generate(PROMPTS, sp, use_tqdm=False)]
    del plain
    torch.cuda.empty_cache()
    off = LLM(path, offload_layers=2, **kw)
    model = off.engine.runner.model
    assert model.offload.slots[0].is_cuda and len(model.offload.layers) == 2
    assert off.engine.config.enforce_eager, "graphs would replay one layer's copy: offloading runs eager"
    assert torch.equal(_logits(off, ids), ref_logits)
    assert [o.outputs[0].token_ids for o in off.generate(PROMPTS, sp, use_tqdm=False)] == ref


def test_offload_turns_programmatic_launch_off(tiny_model):
    """Offloaded weights arrive on a copy stream and the GEMV kernels read weights before their PDL wait: an
    offloading engine launches without PDL, and asking for both is a one-line error."""
    assert _llm(tiny_model.path, offload_layers=1).engine.config.programmatic_launch is False
    with pytest.raises(BadInputError, match="programmatic_launch=True cannot be combined with offload_layers"):
        _llm(tiny_model.path, offload_layers=1, programmatic_launch=True)


def test_interrupted_forward_recovers(tiny_model):
    """A forward that dies mid-stack leaves the wrong layer in a slot; the next forward must re-copy, not reuse it."""
    llm = _llm(tiny_model.path, offload_layers=4)
    model = llm.engine.runner.model
    ids = torch.arange(3, 30)
    ref = _logits(llm, ids)
    boom = model.layers[2].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model.logits(ids)
    boom.remove()
    assert torch.equal(model.logits(ids), ref)


def test_resident_and_offloaded_bytes_add_up(tiny_model):
    full = resident_step_bytes(_llm(tiny_model.path).engine.runner.model)
    model = _llm(tiny_model.path, offload_layers=3).engine.runner.model
    assert resident_step_bytes(model) + model.offload.offloaded_bytes >= full  # layer buffers are 256-byte aligned
    assert resident_step_bytes(model) + model.offload.offloaded_bytes - full < 3 * 256 * 16
    assert model.offload.offloaded_bytes == 3 * model.offload.layer_bytes


def test_expected_tok_s_is_host_link_plus_card_time():
    # 1 GB over a 25 GB/s link (40 ms) + 10 GB at 1 TB/s (10 ms) = 50 ms per token
    assert expected_tok_s(10**9, 10**10, 25.0, 1000.0) == pytest.approx(20.0)
    assert expected_tok_s(10**9, 10**10, 25.0, None) == pytest.approx(25.0)  # card unknown: host link only

