"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, per-sequence block tables, reference counts.

Reference counts and the per-block ``hash``/``token_ids`` fields are there for
prefix caching (blocks shared between sequences with the same prefix); until
that lands every block has exactly one owner.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from onecard.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1
    token_ids: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"block {block_id} on the free list is still referenced"
        block.ref_count = 1
        block.hash, block.token_ids = -1, []
        self.used_block_ids.add(block_id)
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.used_block_ids.remove(block_id)
            self.free_block_ids.append(block_id)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= seq.num_blocks(self.block_size)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its current tokens (its prefill)."""
        assert not seq.block_table, "sequence already holds blocks"
        seq.block_table = [self._take() for _ in range(seq.num_blocks(self.block_size))]

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Can the sequence's next decode step (which writes KV for its last token) be given a slot?"""
        return len(seq.block_table) >= seq.num_blocks(self.block_size) or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._take())
