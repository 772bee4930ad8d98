"""Start-up KV-cache sizing under a per-process memory cap (pure function, the H100's numbers)."""

import pytest

from onecard.engine.model_runner import (
    FIXED_HEADROOM_BYTES,
    cuda_graph_workspace_bytes,
    graph_batch_sizes,
    plan_kv_cache,
)
from onecard.errors import DoesNotFitError

GiB, MiB = 1 << 30, 1 << 20
CARD = int(79.18 * GiB)           # torch.cuda.mem_get_info total on the H100 that hit the OOM
FRACTION = 24 / 79.2              # engine_vs_hf.py: set_per_process_memory_fraction(24 / 79.2)
WEIGHTS = int(12.55 * GiB)        # Llama-2-7B bf16
BLOCK = 16 * MiB // 2             # 0.5 MiB of KV per token (32 layers x 2 x 4096 x 2 bytes) x 16 tokens
ACT_PEAK = int(1.1 * GiB)         # 8192-token prefill + sampling of 256 rows


def h100_plan(reserved=WEIGHTS + 64 * MiB, **kw):
    args = {"card_bytes": CARD, "cap_fraction": FRACTION, "reserved_bytes": reserved,
            "activation_peak_bytes": ACT_PEAK, "block_bytes": BLOCK, "utilization": 0.9,
            "workspace_bytes": cuda_graph_workspace_bytes(graph_batch_sizes(256), 32000, 4096, 2),
            "free_bytes": CARD - reserved - 500 * MiB}
    return plan_kv_cache(**{**args, **kw})


def test_capped_h100_kv_plus_weights_plus_headroom_stays_under_cap():
    plan = h100_plan()
    kv = plan.num_blocks * BLOCK
    assert plan.cap_bytes <= 24 * GiB
    # What the process will have reserved once the cache and graphs exist stays under the 90% budget of the cap.
    assert WEIGHTS + 64 * MiB + kv + ACT_PEAK + plan.workspace_bytes <= 24 * GiB * 0.9
    assert plan.workspace_bytes >= FIXED_HEADROOM_BYTES
    # ...and the cache is not starved: ~7 GiB are really left on a 24 GiB card after 12.55 GiB of weights.
    assert 6 * GiB < kv < 8 * GiB, plan.describe()
    plan.check(max_model_len=4096, block_size=16, weight_bytes=WEIGHTS)


def test_cap_counts_against_reserved_not_driver_free_memory():
    # The uncapped card has ~66 GiB free, but the cap allows only 24 GiB of reserved bytes.
    capped = h100_plan()
    uncapped = h100_plan(cap_fraction=1.0)
    assert capped.num_blocks * BLOCK < 9 * GiB < uncapped.num_blocks * BLOCK
    # More reserved bytes (e.g. a cache left by an earlier engine in the same process) -> a smaller cache.
    assert h100_plan(reserved=WEIGHTS + 3 * GiB).num_blocks < capped.num_blocks


def test_free_memory_held_by_other_processes_limits_the_cache():
    plan = h100_plan(cap_fraction=1.0, free_bytes=20 * GiB)
    assert plan.num_blocks * BLOCK <= 20 * GiB - 0.1 * CARD - ACT_PEAK


def test_too_long_max_model_len_raises_with_numbers_and_knobs():
    plan = h100_plan()
    with pytest.raises(DoesNotFitError) as err:
        plan.check(max_model_len=32768, block_size=16, weight_bytes=WEIGHTS)
    msg = str(err.value)
    assert "\n" not in msg and "16.00 GiB" in msg and "32768" in msg
    assert "max_model_len" in msg and "gpu_memory_utilization" in msg and "rtn-int4" in msg


def test_weights_alone_over_the_cap_leaves_zero_blocks():
    plan = h100_plan(reserved=23 * GiB)
    assert plan.num_blocks == 0
    with pytest.raises(DoesNotFitError):
        plan.check(max_model_len=16, block_size=16, weight_bytes=23 * GiB)


def test_graph_workspace_grows_with_vocab_and_batch():
    small = cuda_graph_workspace_bytes(graph_batch_sizes(8), 32000, 4096, 2)
    big = cuda_graph_workspace_bytes(graph_batch_sizes(256), 128256, 4096, 2)
    assert graph_batch_sizes(8) == [1, 2, 4, 8] and graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert big > 20 * small and big > 512 * MiB  # Llama-3 vocab: each graph's logits stay allocated


def test_async_engine_exposes_max_model_len(tiny_model):
    import asyncio

    from onecard.engine import AsyncEngine

    eng = AsyncEngine(str(tiny_model.path), device="cpu", max_model_len=96, max_num_seqs=4)
    try:
        assert eng.max_model_len == 96
    finally:
        asyncio.run(eng.shutdown())
