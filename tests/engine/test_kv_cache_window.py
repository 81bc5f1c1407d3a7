"""KVCacheManager with a sliding-window group beside a full-attention one: blocks the window has
passed go back to the free queue (keeping their hash), tables hold NULL_BLOCK in their place,
and a prefix matches only where every group holds what the next query reads."""

from __future__ import annotations

from girandole import SamplingParams
from girandole.engine.kv_cache import NULL_BLOCK, KVCacheManager
from girandole.engine.sequence import Sequence

BS = 4
WINDOW = 8  # a query at position p reads positions p-7 .. p


def seq(rid: str, tokens: list[int], salt: str | None = None) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def step(kv: KVCacheManager, s: Sequence, n: int) -> None:
    """What the engine does for n new tokens: allocate, compute, register."""
    assert kv.allocate(s, n)
    s.num_computed_tokens += n
    kv.register_full_blocks(s)


def test_blocks_behind_the_window_return_to_the_free_queue():
    kv = KVCacheManager(num_blocks=40, block_size=BS, windows=[None, WINDOW])
    assert kv.num_usable_blocks == 39 and NULL_BLOCK not in kv.free_queue
    s = seq("a", list(range(30)))
    step(kv, s, 20)  # one chunk: every block it wrote is held while it runs
    full, sliding = s.block_tables
    assert len(full) == len(sliding) == 5 and NULL_BLOCK not in sliding
    first_five = list(sliding)
    step(kv, s, 1)  # the query at position 20 reads 13..20: blocks 3, 4, 5
    assert sliding[:3] == [NULL_BLOCK] * 3 and full == s.block_tables[0]
    assert len(sliding) == 6 and NULL_BLOCK not in full
    # Released in position order, at the back of the queue, their hashes kept (LRU reuse).
    assert list(kv.free_queue)[-3:] == first_five[:3]
    assert all(kv.blocks[b].ref_count == 0 and kv.blocks[b].hash for b in first_five[:3])
    assert kv.num_used_blocks == 6 + 3
    for _ in range(9):
        step(kv, s, 1)  # up to position 29: reads 22..29, blocks 5..7
    assert sliding[:5] == [NULL_BLOCK] * 5 and len(sliding) == 8
    assert kv.num_used_blocks == 8 + 3
    kv.free(s)
    assert kv.num_used_blocks == 0 and s.block_tables == [[], []]


def test_a_long_chunk_holds_its_blocks_until_the_next_step():
    kv = KVCacheManager(num_blocks=40, block_size=BS, windows=[None, WINDOW])
    s = seq("a", list(range(40)))
    step(kv, s, 16)
    assert kv.can_allocate(s, 24)
    assert kv.allocate(s, 24)  # queries 16..39 read from 9 on: blocks 0 and 1 go
    assert s.block_tables[1][:3] == [NULL_BLOCK, NULL_BLOCK, s.block_tables[1][2]]
    assert len(s.block_tables[1]) == 10 and NULL_BLOCK not in s.block_tables[1][2:]


def test_the_budget_counts_every_group_and_the_blocks_a_step_releases():
    kv = KVCacheManager(num_blocks=11, block_size=BS, windows=[None, WINDOW])
    s = seq("a", list(range(40)))
    step(kv, s, 16)  # 4 + 4 blocks of 10
    assert kv.num_free_blocks == 2
    # The query at 16 reads 9..16: blocks 0 and 1 of the sliding group go back first.
    assert kv.can_allocate(s, 5)  # 2 blocks per group: 2 free and 2 released
    assert not kv.can_allocate(s, 9)  # 3 per group
    assert not kv.allocate(s, 9) and kv.num_free_blocks == 4  # released all the same
    step(kv, s, 4)
    assert kv.num_free_blocks == 2
    # A sequence holds 3 sliding blocks at most (8 keys and a new token): 10 + 3 for 40 tokens.
    assert kv.resident_blocks(40, 1) == 10 + 3 and kv.max_tokens(1) == 28


def test_prefix_match_takes_the_window_blocks_and_nulls_before_them():
    kv = KVCacheManager(num_blocks=60, block_size=BS, windows=[None, WINDOW])
    a = seq("a", list(range(30)))
    step(kv, a, 30)
    step(kv, a, 0)  # a later step releases what the window left behind
    kv.free(a)
    b = seq("b", list(range(30)) + [99])
    kv.match_prefix(b)
    full, sliding = b.block_tables
    assert b.num_computed_tokens == 28 and len(full) == len(sliding) == 7
    # The next query (position 28) reads 21..28: sliding blocks 5 and 6 only.
    assert sliding[:5] == [NULL_BLOCK] * 5 and NULL_BLOCK not in sliding[5:] + full
    assert all(kv.blocks[i].ref_count == 1 for i in full + sliding[5:])
    kv.free(b)
    assert kv.num_used_blocks == 0


def test_prefix_match_falls_back_when_window_blocks_were_evicted():
    kv = KVCacheManager(num_blocks=30, block_size=BS, windows=[None, WINDOW])
    a = seq("a", list(range(24)))
    step(kv, a, 24)
    window_blocks = a.block_tables[1][4:]  # blocks 4 and 5: what a query at 24 reads
    kv.free(a)
    # Evict exactly the sliding group's block 5 (everything freed sits in the queue).
    filler = seq("f", list(range(100, 200)))
    queue = list(kv.free_queue)
    take = queue.index(window_blocks[1]) + 1
    assert kv.allocate(filler, -(-take // 2) * BS)
    assert window_blocks[1] in filler.block_tables[0] + filler.block_tables[1]
    b = seq("b", list(range(24)) + [7])
    kv.match_prefix(b)
    # Block 5 is gone from the sliding group: the longest match with whole windows is 4 blocks
    # (a query at 16 reads 9..16: blocks 2..3), if those are still there, else fewer.
    assert b.num_computed_tokens < 24
    k = b.num_computed_tokens // BS
    first = max(0, k * BS - WINDOW + 1) // BS
    assert NULL_BLOCK not in b.block_tables[1][first:] and len(b.block_tables[1]) == k


def test_adapter_salts_and_trims_apply_to_every_group():
    kv = KVCacheManager(num_blocks=40, block_size=BS, windows=[None, WINDOW])
    a = seq("a", list(range(17)), salt="one")
    step(kv, a, 17)
    other = seq("b", list(range(17)), salt="two")
    kv.match_prefix(other)
    assert other.num_computed_tokens == 0
    kv.free(other)
    # Speculation's trim gives back rejected positions in both groups.
    assert kv.allocate(a, 6)
    assert [len(t) for t in a.block_tables] == [6, 6]
    kv.trim(a, 18)
    assert [len(t) for t in a.block_tables] == [5, 5]
    kv.free(a)
    assert kv.num_used_blocks == 0


def test_one_full_group_reserves_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    assert kv.num_usable_blocks == 4 and kv.max_tokens(512) == 16
    s = seq("a", list(range(16)))
    assert kv.allocate(s, 16) and s.block_table == s.block_tables[0] and len(s.block_table) == 4


def test_every_group_sliding_matches_only_the_same_whole_prefix():
    """With no full-attention group, the blocks before the window are gone and only the hash
    chain says the prefix before them was the same: a prompt that differs there gets no hit."""
    kv = KVCacheManager(num_blocks=40, block_size=BS, windows=[WINDOW])
    a = seq("a", list(range(30)))
    step(kv, a, 30)
    step(kv, a, 0)
    kv.free(a)
    same = seq("same", list(range(30)) + [99])
    kv.match_prefix(same)
    assert same.num_computed_tokens == 28
    kv.free(same)
    other = seq("other", [7] + list(range(1, 30)) + [99])  # differs in the evicted first block
    kv.match_prefix(other)
    assert other.num_computed_tokens == 0


def test_a_freed_sequence_loses_its_last_positions_first_in_every_group():
    """Eviction after a free (a preemption) takes the last positions of every group first: a
    prefix matches only where the full-attention group holds all of it, so evicting that
    group's whole table first (freeing group by group) lost the prefix in every group, and a
    preempted sequence recomputed it all."""
    kv = KVCacheManager(num_blocks=11, block_size=BS, windows=[None, WINDOW])
    tokens = list(range(17))
    a = seq("a", tokens)
    step(kv, a, 16)  # 4 full blocks in each group: 8 of 10 free blocks
    kv.free(a)  # preempted
    other = seq("other", [99] * 8)
    step(kv, other, 4)  # takes a block in each group: the 2 never used, then a's last ones
    step(kv, other, 4)
    back = seq("a", tokens)
    back.num_preemptions = 1
    kv.match_prefix(back)
    assert back.num_computed_tokens == 12  # a's last block is gone in both groups, not more
