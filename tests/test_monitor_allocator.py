"""Fragmentation = 1 - allocated/reserved on a synthetic torch.cuda.memory_stats() dict (ERRATA 6)."""

from __future__ import annotations

import os

import pytest

from onecard.errors import BadInputError
from onecard.monitor.allocator import GIB, allocator_stats, memory_advice, stats_from_memory_stats


def memory_stats(allocated, reserved, inactive_split, retries=0, ooms=0):
    """Shaped like torch.cuda.memory_stats(): flat 'name.pool.stat' keys plus counters."""
    return {
        "allocated_bytes.all.current": allocated, "allocated_bytes.all.peak": allocated + GIB,
        "reserved_bytes.all.current": reserved, "reserved_bytes.all.peak": reserved,
        "inactive_split_bytes.all.current": inactive_split, "num_alloc_retries": retries, "num_ooms": ooms,
        "active_bytes.all.current": allocated, "segment.all.current": 12,
    }


def test_fragmentation_is_share_of_reserved_not_of_card():
    s = stats_from_memory_stats(memory_stats(allocated=12 * GIB, reserved=20 * GIB, inactive_split=6 * GIB))
    assert s.fragmentation == pytest.approx(0.4)           # 1 - 12/20
    assert s.fragmentation != pytest.approx(1 - 12 / 24)   # the seed article's 1 - allocated/total_memory
    assert s.releasable == 2 * GIB                         # 8 GiB free, 6 of it split around live tensors
    assert (s.peak_allocated, s.peak_reserved) == (13 * GIB, 20 * GIB)
    assert s.to_dict()["fragmentation"] == pytest.approx(0.4)


def test_empty_allocator_has_no_fragmentation():
    s = stats_from_memory_stats({})
    assert s.fragmentation == 0.0 and s.releasable == 0
    assert memory_advice(s, expandable=False) == []


def test_high_fragmentation_advice_names_numbers_and_expandable_segments():
    s = stats_from_memory_stats(memory_stats(12 * GIB, 20 * GIB, 6 * GIB, retries=3))
    advice = memory_advice(s, expandable=False)
    assert "fragmentation 40%" in advice[0] and "8.00 GiB" in advice[0] and "6.00 GiB" in advice[0]
    assert "3 allocation retries" in advice[0]
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in advice[0]
    # empty_cache: only the whole free segments (2 GiB), and says it cannot merge split blocks
    assert "empty_cache() would return 2.00 GiB" in advice[1] and "cannot merge the 6.00 GiB" in advice[1]


def test_split_blocks_only_means_empty_cache_is_not_suggested():
    s = stats_from_memory_stats(memory_stats(12 * GIB, 20 * GIB, 8 * GIB))
    advice = memory_advice(s, expandable=False)
    assert len(advice) == 1 and "empty_cache" not in advice[0]


def test_already_expandable_says_so(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:True")
    s = stats_from_memory_stats(memory_stats(12 * GIB, 20 * GIB, 8 * GIB))
    (advice,) = memory_advice(s)
    assert "already on" in advice and "PYTORCH_CUDA_ALLOC_CONF=" not in advice


def test_healthy_or_small_waste_gives_no_advice():
    assert memory_advice(stats_from_memory_stats(memory_stats(19 * GIB, 20 * GIB, GIB // 2)), expandable=False) == []
    # 50 % fragmented but only 100 MiB: not worth acting on
    assert memory_advice(stats_from_memory_stats(memory_stats(100 * 2**20, 200 * 2**20, 100 * 2**20)), expandable=False) == []


def test_bad_thresholds_rejected():
    with pytest.raises(BadInputError):
        memory_advice(stats_from_memory_stats({}), high=1.5)


def test_live_stats_none_without_cuda_in_use():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    assert allocator_stats() is None


def test_prefer_expandable_segments_sets_it_only_where_the_user_did_not(monkeypatch):
    from onecard.monitor.allocator import prefer_expandable_segments

    for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    assert prefer_expandable_segments() is True  # CPU-only here: CUDA never started
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert prefer_expandable_segments() is False  # the user's config stays exactly as given
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
