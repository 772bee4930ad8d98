"""What a card offers one process: total bytes, free bytes now, the per-process cap; and the budget that leaves.

The planner's verdicts for a catalog card and the engine/trainer preflight on
the live card go through the same ``CardMemory`` and the same budget rule as
the engine's KV sizing (``onecard.engine.model_runner.plan_kv_cache``), so a
plan made before loading agrees with what start-up will measure. Tests build a
``CardMemory`` by hand (a "24 GiB card with 20 GiB free") instead of touching
``torch.cuda``.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.errors import BadInputError

GIB = 1024**3


@dataclass(frozen=True)
class CardMemory:
    """One card as seen by this process, before the job loads anything.

    ``free_bytes`` is what the driver reports free (the CUDA context and other
    processes already taken out); ``reserved_bytes`` is what this process's
    torch allocator already holds; ``cap_fraction`` is
    ``torch.cuda.set_per_process_memory_fraction`` (1.0 when unset).
    """

    total_bytes: int
    free_bytes: int
    cap_fraction: float = 1.0
    reserved_bytes: int = 0
    name: str = "card"

    def __post_init__(self) -> None:
        if self.total_bytes <= 0 or not 0 <= self.free_bytes <= self.total_bytes:
            raise BadInputError(f"card memory needs 0 <= free ({self.free_bytes}) <= total ({self.total_bytes}) bytes")
        if not 0 < self.cap_fraction <= 1:
            raise BadInputError(f"cap_fraction must be in (0, 1], got {self.cap_fraction}")

    @property
    def cap_bytes(self) -> int:
        return int(self.total_bytes * self.cap_fraction)

    @property
    def outside_bytes(self) -> int:
        """Device memory in use outside this process's allocator: the CUDA context and other processes."""
        return max(self.total_bytes - self.free_bytes - self.reserved_bytes, 0)

    def budget_bytes(self, utilization: float) -> int:
        """Bytes this process's allocator may still reserve at ``utilization``.

        The rule of ``plan_kv_cache``: under the cap, ``cap x utilization`` minus
        what is already reserved, and never more than what is free minus the
        ``(1 - utilization)`` share of the cap kept spare.
        """
        return int(min(self.cap_bytes * utilization - self.reserved_bytes,
                       self.free_bytes - (1 - utilization) * self.cap_bytes))

    @classmethod
    def for_card(cls, memory_gib: float, context_bytes: int, name: str = "card") -> "CardMemory":
        """A catalog card with nothing on it but this process's CUDA context."""
        total = int(memory_gib * GIB)
        return cls(total, max(total - context_bytes, 0), 1.0, 0, name)


def live_card_memory(device=None) -> CardMemory | None:
    """The live CUDA card's memory (initialises the CUDA context, which is then counted as used); None without CUDA.

    The engine and trainer preflights call this one function, so a test hands
    them a fake card by passing ``card_memory=`` to the public API instead.
    """
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    from onecard.bench.results import free_memory

    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    # Blocks this process's allocator caches but no tensor uses (a finished engine, a training run before) are
    # memory the job can have: hand them back first, or the budget counts them as taken (measured on an H200: a
    # second engine in one process was refused with 0.0 GiB "available" out of 42).
    free_memory()
    free, total = torch.cuda.mem_get_info(index)
    return CardMemory(total, free, torch.cuda.get_per_process_memory_fraction(index),
                      torch.cuda.memory_reserved(index), torch.cuda.get_device_name(index))
