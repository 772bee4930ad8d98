"""This process's torch CUDA caching-allocator state: fragmentation and what to do about it.

Fragmentation is memory the allocator has reserved from the driver but cannot
hand out for the next request: ``1 - allocated / reserved`` (ERRATA 6: *not*
``1 - allocated / total_memory``, which is just free memory). Part of it is
whole free segments (``empty_cache()`` can return those to the driver), part
is free pieces of segments that still hold live tensors ("inactive split"
blocks) - ``empty_cache()`` cannot touch those; only not splitting segments
in the first place (``expandable_segments:True``) avoids them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30


@dataclass
class AllocatorStats:
    allocated: int            # bytes in live tensors' blocks
    reserved: int             # bytes held from the driver (segments)
    peak_allocated: int
    peak_reserved: int
    inactive_split: int       # free bytes inside segments that also hold live blocks
    num_alloc_retries: int    # cudaMalloc failed -> freed cache and retried (slow; a fragmentation symptom)
    num_ooms: int

    @property
    def fragmentation(self) -> float:
        """Share of reserved memory not in live blocks (0 when nothing is reserved)."""
        return 1.0 - self.allocated / self.reserved if self.reserved else 0.0

    @property
    def releasable(self) -> int:
        """Bytes in whole free segments: what ``empty_cache()`` would give back to the driver."""
        return max(0, self.reserved - self.allocated - self.inactive_split)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fragmentation": self.fragmentation, "releasable": self.releasable}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AllocatorStats":
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


def stats_from_memory_stats(ms: dict[str, Any]) -> AllocatorStats:
    """Build from a dict shaped like ``torch.cuda.memory_stats()`` (missing keys count as 0)."""
    g = lambda k: int(ms.get(k, 0) or 0)  # noqa: E731
    return AllocatorStats(
        allocated=g("allocated_bytes.all.current"),
        reserved=g("reserved_bytes.all.current"),
        peak_allocated=g("allocated_bytes.all.peak"),
        peak_reserved=g("reserved_bytes.all.peak"),
        inactive_split=g("inactive_split_bytes.all.current"),
        num_alloc_retries=g("num_alloc_retries"),
        num_ooms=g("num_ooms"),
    )


def allocator_stats(device: int | None = None) -> AllocatorStats | None:
    """Live stats of this process's allocator on ``device``; None when CUDA is not in use here."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None  # torch not imported / CUDA not in use: do not import it or create a context just to look
    return stats_from_memory_stats(torch.cuda.memory_stats(device))


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def expandable_segments_on() -> bool:
    """Whether the allocator config in the environment already asks for expandable segments."""
    conf = ",".join(os.environ.get(k, "") for k in ALLOC_CONF_VARS)
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def user_alloc_conf() -> str | None:
    """``NAME=value`` of the allocator config the environment sets (the first of ``ALLOC_CONF_VARS``), or None."""
    return next((f"{k}={os.environ[k]}" for k in ALLOC_CONF_VARS if os.environ.get(k)), None)


def prefer_expandable_segments() -> bool:
    """Ask for expandable segments before this process first touches CUDA, unless the user configured the
    allocator; returns whether they are on.

    Why: a long-context step allocates and frees activations of many sizes, and a split segment's free pieces
    cannot serve a larger request, so the run hits the cap with memory free (QLoRA r=32 on a Llama-3-8B arch
    under 24 GiB: an OOM at 131,072 tokens with 21.9 GiB in live tensors; ``train_vs_hf.py --part qlora-ctx``).
    Unsloth sets the same on import. A user's own ``PYTORCH_CUDA_ALLOC_CONF`` is left exactly as given, and
    once CUDA is up the setting can no longer apply, so then nothing changes."""
    import sys

    torch = sys.modules.get("torch")
    started = torch is not None and torch.cuda.is_initialized()
    if not started and user_alloc_conf() is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return expandable_segments_on()


def memory_advice(stats: AllocatorStats, high: float = 0.25, min_waste_gib: float = 0.5,
                  expandable: bool | None = None) -> list[str]:
    """Plain advice with the numbers; empty when the allocator is healthy.

    Fragmentation is only worth acting on when it is both a large share
    (``high``) and a large amount (``min_waste_gib``), or when the allocator
    already had to retry / ran out of memory.
    """
    if not 0 < high < 1 or min_waste_gib < 0:
        from onecard.errors import BadInputError

        raise BadInputError(f"memory_advice needs 0 < high < 1 and min_waste_gib >= 0, got {high}, {min_waste_gib}")
    expandable = expandable_segments_on() if expandable is None else expandable
    waste = stats.reserved - stats.allocated
    frag_high = stats.fragmentation >= high and waste >= min_waste_gib * GIB
    out: list[str] = []
    if frag_high or stats.num_alloc_retries or stats.num_ooms:
        what = (f"fragmentation {stats.fragmentation:.0%}: {waste / GIB:.2f} GiB reserved but not in live tensors "
                f"({stats.allocated / GIB:.2f} of {stats.reserved / GIB:.2f} GiB in use; "
                f"{stats.inactive_split / GIB:.2f} GiB in split blocks around live tensors)")
        if stats.num_alloc_retries or stats.num_ooms:
            what += f"; {stats.num_alloc_retries} allocation retries, {stats.num_ooms} OOMs"
        if expandable:
            out.append(what + "; expandable_segments is already on: lower peak memory instead "
                       "(smaller batch or context, gradient checkpointing)")
        else:
            out.append(what + "; set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting "
                       "so segments grow instead of splitting")
    if out and stats.releasable >= min_waste_gib * GIB:  # cached free segments are normal unless memory is a problem
        out.append(f"torch.cuda.empty_cache() would return {stats.releasable / GIB:.2f} GiB of whole free segments "
                   "to the driver: worth it only if another process or a non-torch library needs that memory; "
                   f"it cannot merge the {stats.inactive_split / GIB:.2f} GiB of split blocks (live tensors do not move)")
    return out
