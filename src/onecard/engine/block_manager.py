"""Paged KV-cache bookkeeping: fixed-size blocks, an LRU free list, per-sequence block tables, prefix caching.

Prefix caching: once a *full* block's keys/values are computed, it is registered
under ``hash((parent block's hash, its token ids))``, so the hash names the whole
prefix up to and including that block. A new sequence whose leading full blocks
hash the same (token ids compared too, so a hash collision cannot alias) shares
those blocks (``ref_count`` > 1) and skips their prefill. A block whose last owner
finishes stays registered on the free list; free blocks are reused oldest-first
(LRU), and reuse drops the registration. Blocks are registered only after the
step that wrote them ran (``register_computed``), so no sequence ever reads a
block whose KV is not there yet.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from onecard.engine.sequence import Sequence

ROOT_HASH = 0x6F6E6563617264  # the parent hash of a sequence's first block


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1
    token_ids: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first: allocation evicts from the front.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.used_block_ids: set[int] = set()
        self.hash_to_block: dict[int, int] = {}
        self.num_queried_tokens = 0  # prompt tokens looked up at admission
        self.num_hit_tokens = 0      # of those, found in the cache
        self.num_evictions = 0       # cached free blocks reused for something else

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def _take(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"block {block_id} on the free list is still referenced"
        if block.hash != -1:
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
                self.num_evictions += 1
            block.hash, block.token_ids = -1, []
        block.ref_count = 1
        self.used_block_ids.add(block_id)
        return block_id

    def _share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
            self.used_block_ids.add(block_id)
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.used_block_ids.remove(block_id)
            self.free_block_ids[block_id] = None

    def _match_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks (ids, hashes) holding the sequence's leading full blocks. The block with the last token
        is never matched: its logits must be computed to sample the next token. Nor is any block of a prompt
        whose logprobs are still to be computed (``prompt_logprobs``): every position's logits are needed."""
        scoring = seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens
        if not self.enable_prefix_caching or scoring:
            return [], []
        ids, hashes, parent, bs = [], [], ROOT_HASH, self.block_size
        for i in range((len(seq) - 1) // bs):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            h = hash((parent, tuple(tokens)))
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    def can_allocate(self, seq: Sequence) -> bool:
        hits, _ = self._match_prefix(seq)
        in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return self.num_free_blocks >= seq.num_blocks(self.block_size) - in_use

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its current tokens: cached prefix blocks shared, the rest new."""
        assert not seq.block_table, "sequence already holds blocks"
        hits, hashes = self._match_prefix(seq)
        for block_id in hits:
            self._share(block_id)
        seq.block_table = hits + [self._take() for _ in range(seq.num_blocks(self.block_size) - len(hits))]
        seq.block_hashes = hashes
        seq.num_cached_tokens = len(hits) * self.block_size
        self.num_queried_tokens += len(seq)
        self.num_hit_tokens += seq.num_cached_tokens

    def register_computed(self, seq: Sequence, num_computed: int) -> None:
        """Make the sequence's full blocks among its first ``num_computed`` tokens (KV written) findable."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), min(num_computed, len(seq)) // bs):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            h = hash((seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH, tuple(tokens)))
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)
            seq.block_hashes.append(h)

    def deallocate(self, seq: Sequence) -> None:
        # Released last-first, so a prefix's head blocks are the last of them to be evicted.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Can the sequence's next decode step (which writes KV for its last token) be given a slot?"""
        return len(seq.block_table) >= seq.num_blocks(self.block_size) or self.num_free_blocks >= 1

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give the sequence slots for ``num_tokens`` tokens (speculative drafts) if enough blocks are free.
        Slots past what verification accepts keep rejected KV until the sequence overwrites or frees them."""
        need = (num_tokens + self.block_size - 1) // self.block_size - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._take())
