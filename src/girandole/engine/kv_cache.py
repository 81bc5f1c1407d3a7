"""KVCacheManager: paged KV blocks with prefix caching by chained block hashes.

A block holds `block_size` consecutive tokens of one sequence. A full block's hash chains the
previous block's hash with its own token ids (and the sequence's cache salt for the first
block, and its LoRA adapter), so equal hashes mean equal whole prefixes. Freed blocks keep their hash and go to the
back of the free queue: they stay reusable until allocation reaches them (LRU eviction).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from girandole.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, tokens found

    # -- accounting -----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------------------

    def _chain_hash(self, seq: Sequence, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev if prev is not None else seq.prefix_salt, tokens))

    def match_prefix(self, seq: Sequence, max_cached_tokens: int | None = None) -> None:
        """Attach cached blocks for the longest matching prefix of a sequence with no blocks yet.

        At least one token is always left to compute, because the last prompt position's logits
        are needed to sample from.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        limit = len(seq) - 1
        if max_cached_tokens is not None:
            limit = min(limit, max_cached_tokens)
        prev: int | None = None
        bs = self.block_size
        for i in range(limit // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._chain_hash(seq, prev, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_queue.remove(block_id)  # revive a freed block still holding its data
            block.ref_count += 1
            seq.block_table.append(block_id)
            prev = h
        num_hit = len(seq.block_table) * bs
        seq.num_computed_tokens = num_hit
        seq.num_hashed_blocks = len(seq.block_table)
        seq.last_block_hash = prev
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_hit
            self.num_prefix_queries += seq.num_prompt_tokens
            self.num_prefix_hits += num_hit

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed, so later requests can reuse them.
        Pooling requests' blocks stay private (girandole.engine.pooling)."""
        if seq.pooling is not None:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        prev = seq.last_block_hash
        for i in range(seq.num_hashed_blocks, num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._chain_hash(seq, prev, tokens)
            block = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block:
                block.hash = h
                block.token_ids = tokens
                self.hash_to_block[h] = block.block_id
            elif block.hash is None:
                # Same content already cached in another block: keep this one private.
                block.token_ids = tokens
            prev = h
        if num_full > seq.num_hashed_blocks:
            seq.num_hashed_blocks = num_full
            seq.last_block_hash = prev

    # -- allocation -----------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= len(self.free_queue)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` enough blocks for `num_new_tokens` more tokens; False if too few are free."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > len(self.free_queue):
            return False
        for _ in range(needed):
            block_id = self.free_queue.popleft()
            block = self.blocks[block_id]
            if block.hash is not None:  # evict the cached prefix this block held
                if self.hash_to_block.get(block.hash) == block_id:
                    del self.hash_to_block[block.hash]
                block.hash = None
            block.token_ids = ()
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks of `seq` past its first `num_tokens` tokens (positions that held
        rejected proposals: never hashed, so they go to the front of the free queue)."""
        keep = self.blocks_needed(num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free_queue.appendleft(block_id)
                else:
                    self.free_queue.append(block_id)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        # Free in reverse so a sequence's last blocks are evicted before its first ones,
        # which are the ones most likely shared as a prefix.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free_queue.appendleft(block_id)  # nothing worth keeping: reuse first
                else:
                    self.free_queue.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash = None
                block.token_ids = ()
        self.hash_to_block = {
            h: b for h, b in self.hash_to_block.items() if self.blocks[b].ref_count > 0
        }
