"""KVCacheManager: paged KV blocks with prefix caching by chained block hashes, for one or more
KV cache groups (the hybrid layout of engine/kv_groups.py).

A block holds `block_size` consecutive tokens of one sequence for the layers of one group. A full
block's hash chains the previous block's hash with its own token ids (and the sequence's cache
salt for the first block, and its LoRA adapter), so equal hashes mean equal whole prefixes; the
cache is keyed by (group, hash). Freed blocks keep their hash and go to the back of the free
queue: they stay reusable until allocation reaches them (LRU eviction).

Every group draws from the one pool of blocks, and a sequence has one block table per group.
A full-attention group keeps a block for every position. A sliding-window group's queries read
only the last `window` keys, so a block that lies wholly before the window of the sequence's next
query is released at once (it keeps its hash for prefix reuse) and its table entry becomes
NULL_BLOCK, a reserved block that is never written: its slots may be gathered, never attended.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from girandole.engine.images import block_key
from girandole.engine.sequence import Sequence

NULL_BLOCK = 0  # with a sliding-window group: the table entry of a released block
UNBOUNDED = 1 << 40  # max_tokens of a cache whose every group slides


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: tuple[int, bytes] | None = None  # (group, chained hash) while it holds a cached prefix
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(
    salt: bytes | None, prev: bytes | None, tokens: tuple[int, ...], extra: bytes = b""
) -> bytes:
    """A block's prefix-cache key: SHA-256 of the previous block's key (the salt for the first
    block) and the block's token ids. A collision-resistant hash because a matched prefix is not
    always checked token by token (when every group slides, blocks before the window may be gone)
    and Python's hash() of ints is deterministic and cheap to collide on purpose (vLLM's
    CVE-2025-25183): a crafted prompt could otherwise be served another prompt's K/V.
    `extra`: what else the block's K/V depend on (the digests of the images it holds)."""
    h = hashlib.sha256(b"\x01" + prev if prev is not None else b"\x00" + (salt or b""))
    h.update(array("q", tokens).tobytes())
    if extra:
        h.update(b"\x02" + extra)
    return h.digest()


class FreeBlockQueue:
    """The free blocks in eviction order (the front is taken first), with O(1) removal of any
    block: a prefix-cache hit revives freed blocks from anywhere in the queue (vLLM keeps a
    doubly linked list for the same reason). A deque's remove() scans it: a 4096-token hit
    revived ~450 blocks of Gemma 3 270M's default 21,845 in 212 ms."""

    def __init__(self, block_ids: Iterable[int]) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict.fromkeys(block_ids)

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[int]:
        return iter(self._blocks)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def __getitem__(self, index: int) -> int:
        """The block at `index` from the front (negative: from the back); O(index)."""
        order = reversed(self._blocks) if index < 0 else iter(self._blocks)
        found = next(islice(order, -index - 1 if index < 0 else index, None), None)
        if found is None:
            raise IndexError(index)
        return found

    def append(self, block_id: int) -> None:
        self._blocks[block_id] = None

    def appendleft(self, block_id: int) -> None:
        self._blocks[block_id] = None
        self._blocks.move_to_end(block_id, last=False)

    def popleft(self) -> int:
        return self._blocks.popitem(last=False)[0]

    def remove(self, block_id: int) -> None:
        del self._blocks[block_id]


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, windows: list[int | None] | None = None
    ) -> None:
        """`windows`: per KV cache group, its layers' sliding window (None: full attention);
        default one full-attention group."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.windows = list(windows) if windows else [None]
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.num_reserved = 1 if any(w is not None for w in self.windows) else 0
        self.free_queue = FreeBlockQueue(range(self.num_reserved, num_blocks))
        self.hash_to_block: dict[tuple[int, bytes], int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, tokens found

    # -- accounting -----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - self.num_reserved

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _first_needed(self, window: int | None, position: int) -> int:
        """The first block a query at `position` (and every later one) reads."""
        return 0 if window is None else max(0, position - window + 1) // self.block_size

    def resident_blocks(self, num_tokens: int, chunk: int) -> int:
        """The most blocks a sequence of `num_tokens` tokens holds, computed in steps of at most
        `chunk` tokens: every group's blocks for a step's keys, its new tokens included."""
        total = 0
        for w in self.windows:
            blocks = self.blocks_needed(num_tokens)
            if w is not None:  # the window of a step's first query, and the step's new tokens
                blocks = min(blocks, self.blocks_needed(w - 1 + chunk) + 1)
            total += blocks
        return total

    def max_tokens(self, chunk: int) -> int:
        """The longest sequence that fits in the cache alone (see resident_blocks); when every
        group slides, any length that fits at all (UNBOUNDED)."""
        usable = self.num_usable_blocks
        if None not in self.windows:
            return UNBOUNDED if self.resident_blocks(UNBOUNDED, chunk) <= usable else 0
        lo, hi = 0, usable * self.block_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.resident_blocks(mid, chunk) <= usable:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _tables(self, seq: Sequence) -> list[list[int]]:
        if len(seq.block_tables) != len(self.windows):
            assert not any(seq.block_tables), "a sequence belongs to one cache layout"
            seq.block_tables = [[] for _ in self.windows]
        return seq.block_tables

    # -- prefix cache ---------------------------------------------------------------------

    def _chain_hash(
        self, seq: Sequence, prev: bytes | None, tokens: tuple[int, ...], index: int
    ) -> bytes:
        """Block `index` of `seq` (holding `tokens`): keyed by its images too, if any."""
        extra = block_key(seq, index, self.block_size) if seq.images else b""
        return chain_hash(seq.prefix_salt if prev is None else None, prev, tokens, extra)

    def _cached(self, group: int, h: int, tokens: tuple[int, ...]) -> int | None:
        block_id = self.hash_to_block.get((group, h))
        if block_id is None or self.blocks[block_id].token_ids != tokens:
            return None
        return block_id

    def match_prefix(self, seq: Sequence, max_cached_tokens: int | None = None) -> None:
        """Attach cached blocks for the longest matching prefix of a sequence with no blocks yet.

        A prefix of k blocks matches when every full-attention group holds all k blocks and
        every sliding-window group the blocks that the next query's window reads. At least one
        token is always left to compute, because the last prompt position's logits are needed
        to sample from.
        """
        tables = self._tables(seq)
        assert not any(tables) and seq.num_computed_tokens == 0
        limit = len(seq) - 1
        if max_cached_tokens is not None:
            limit = min(limit, max_cached_tokens)
        bs = self.block_size
        hashes: list[bytes] = []
        # found[g][i]: group g's cached block for block i, or None
        found: list[list[int | None]] = [[] for _ in self.windows]
        prev: bytes | None = None
        for i in range(limit // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._chain_hash(seq, prev, tokens, i)
            hits = [self._cached(g, h, tokens) for g in range(len(self.windows))]
            if any(b is None for g, b in enumerate(hits) if self.windows[g] is None):
                break
            if all(b is None for b in hits):
                break
            hashes.append(h)
            for g, b in enumerate(hits):
                found[g].append(b)
            prev = h
        k = len(hashes)
        while k > 0 and not self._window_cached(found, k):
            k -= 1
        for g, table in enumerate(tables):
            first = self._first_needed(self.windows[g], k * bs)
            table.extend([NULL_BLOCK] * first)
            for block_id in found[g][first:k]:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    self.free_queue.remove(block_id)  # revive a freed block still holding data
                block.ref_count += 1
                table.append(block_id)
        num_hit = k * bs
        seq.num_computed_tokens = num_hit
        seq.num_hashed_blocks = k
        seq.last_block_hash = hashes[k - 1] if k else None
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_hit
            self.num_prefix_queries += seq.num_prompt_tokens
            self.num_prefix_hits += num_hit

    def _window_cached(self, found: list[list[int | None]], k: int) -> bool:
        """Whether every group holds the blocks that a query after k blocks reads."""
        for g, w in enumerate(self.windows):
            first = self._first_needed(w, k * self.block_size)
            if any(b is None for b in found[g][first:k]):
                return False
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed, so later requests can reuse them.
        Pooling requests' blocks stay private (girandole.engine.pooling)."""
        if seq.pooling is not None:
            return
        bs = self.block_size
        tables = self._tables(seq)
        num_full = min(seq.num_computed_tokens // bs, len(tables[0]))
        prev = seq.last_block_hash
        for i in range(seq.num_hashed_blocks, num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._chain_hash(seq, prev, tokens, i)
            for g, table in enumerate(tables):
                if table[i] == NULL_BLOCK and self.num_reserved:
                    continue  # released before it was registered
                block = self.blocks[table[i]]
                if (g, h) not in self.hash_to_block:
                    block.hash = (g, h)
                    block.token_ids = tokens
                    self.hash_to_block[(g, h)] = block.block_id
                elif block.hash is None:
                    # Same content already cached in another block: keep this one private.
                    block.token_ids = tokens
            prev = h
        if num_full > seq.num_hashed_blocks:
            seq.num_hashed_blocks = num_full
            seq.last_block_hash = prev

    # -- allocation -----------------------------------------------------------------------

    def _outside_window(self, seq: Sequence) -> list[tuple[list[int], int]]:
        """(table, index) of the blocks no query of `seq` from its next position on reads."""
        out = []
        for w, table in zip(self.windows, self._tables(seq)):
            if w is None:
                continue
            # released blocks form a prefix of the table: walk back to it
            i = min(self._first_needed(w, seq.num_computed_tokens), len(table)) - 1
            while i >= 0 and table[i] != NULL_BLOCK:
                out.append((table, i))
                i -= 1
        return out

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return sum(max(0, needed - len(table)) for table in self._tables(seq))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        free = len(self.free_queue) + len(self._outside_window(seq))
        return self._num_new_blocks(seq, num_new_tokens) <= free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` enough blocks for `num_new_tokens` more tokens in every group (after
        releasing its sliding-window blocks that no query reads again); False if too few are
        free."""
        for table, i in reversed(self._outside_window(seq)):  # oldest positions evicted first
            self._release(table[i])
            table[i] = NULL_BLOCK
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        if self._num_new_blocks(seq, num_new_tokens) > len(self.free_queue):
            return False
        for table in seq.block_tables:
            for _ in range(needed - len(table)):
                block_id = self.free_queue.popleft()
                block = self.blocks[block_id]
                if block.hash is not None:  # evict the cached prefix this block held
                    if self.hash_to_block.get(block.hash) == block_id:
                        del self.hash_to_block[block.hash]
                    block.hash = None
                block.token_ids = ()
                block.ref_count = 1
                table.append(block_id)
        return True

    def _release(self, block_id: int) -> None:
        if block_id == NULL_BLOCK and self.num_reserved:
            return
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is None:
                self.free_queue.appendleft(block_id)  # nothing worth keeping: reuse first
            else:
                self.free_queue.append(block_id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks of `seq` past its first `num_tokens` tokens (positions that held
        rejected proposals: never hashed, so they go to the front of the free queue)."""
        keep = self.blocks_needed(num_tokens)
        for table in self._tables(seq):
            for block_id in reversed(table[keep:]):
                self._release(block_id)
            del table[keep:]

    def free(self, seq: Sequence) -> None:
        # Free the last positions first, every group's block of a position together, so a
        # sequence's last blocks are evicted before its first ones, which are the ones most
        # likely shared as a prefix (and what a preempted sequence matches when it returns).
        # Group by group instead, eviction would take the first group's (full attention) whole
        # table before any other group's blocks: the prefix is gone with it, since a prefix
        # matches only where every full-attention group holds all of it.
        tables = seq.block_tables
        for i in reversed(range(max(map(len, tables), default=0))):
            for table in tables:
                if i < len(table):
                    self._release(table[i])
        seq.block_tables = [[] for _ in self.windows]
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
