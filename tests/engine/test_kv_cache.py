"""KVCacheManager on its own: block allocation, prefix matching by chained hashes, cache salts,
reference counts of shared blocks, and LRU reuse of freed blocks that still hold a prefix."""

from __future__ import annotations

from girandole import SamplingParams
from girandole.engine.kv_cache import FreeBlockQueue, KVCacheManager
from girandole.engine.sequence import Sequence

BS = 4  # tokens per block


def seq(rid: str, tokens: list[int], salt: str | None = None) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def compute_prompt(kv: KVCacheManager, s: Sequence) -> None:
    """What the engine does for a prompt: match a prefix, allocate the rest, compute, register."""
    kv.match_prefix(s)
    assert kv.allocate(s, s.num_uncomputed_tokens)
    s.num_computed_tokens = len(s)
    kv.register_full_blocks(s)


def test_allocation_takes_whole_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    s = seq("a", list(range(6)))
    assert kv.allocate(s, 6)
    assert len(s.block_table) == 2 and kv.num_used_blocks == 2
    assert kv.allocate(s, 2)  # 8 tokens still fit in the two blocks
    assert len(s.block_table) == 2
    s.num_computed_tokens = 8
    assert kv.allocate(s, 1) and len(s.block_table) == 3
    assert len(set(s.block_table)) == 3
    kv.free(s)
    assert kv.num_used_blocks == 0 and s.block_table == [] and s.num_computed_tokens == 0


def test_allocation_fails_whole_when_too_few_blocks_are_free():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a, b = seq("a", list(range(8))), seq("b", list(range(8)))
    assert kv.allocate(a, 8)
    assert not kv.can_allocate(b, 8)
    assert not kv.allocate(b, 8)
    assert b.block_table == [] and kv.num_free_blocks == 1  # nothing taken on failure
    assert kv.allocate(b, 4)


def test_prefix_match_reuses_full_blocks_and_leaves_a_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = seq("a", list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    compute_prompt(kv, a)
    b = seq("b", list(range(10)) + [99])
    kv.match_prefix(b)
    assert b.block_table == a.block_table[:2]  # the partial block is never shared
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert kv.blocks[a.block_table[0]].ref_count == 2
    # An identical prompt: its last full block is not reused, a token must be left to compute.
    c = seq("c", list(range(8)))
    kv.match_prefix(c)
    assert c.num_computed_tokens == 4 and c.block_table == a.block_table[:1]
    assert kv.num_prefix_queries == 10 + 11 + 8 and kv.num_prefix_hits == 0 + 8 + 4


def test_prefix_match_stops_at_the_first_difference_and_respects_the_cap():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    compute_prompt(kv, seq("a", list(range(12))))
    differs = seq("b", [0, 1, 2, 3, 4, 5, 6, 77, 8, 9, 10, 11, 12])
    kv.match_prefix(differs)
    assert differs.num_computed_tokens == 4  # block 2 differs, so block 3 cannot match either
    capped = seq("c", list(range(13)))
    kv.match_prefix(capped, max_cached_tokens=5)
    assert capped.num_computed_tokens == 4
    off = seq("d", list(range(13)))
    kv.match_prefix(off, max_cached_tokens=0)
    assert off.num_computed_tokens == 0 and off.block_table == []


def test_cache_salt_isolates_prefixes():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    compute_prompt(kv, seq("a", list(range(9)), salt="tenant-1"))
    other = seq("b", list(range(9)), salt="tenant-2")
    kv.match_prefix(other)
    assert other.num_computed_tokens == 0
    same = seq("c", list(range(9)), salt="tenant-1")
    kv.match_prefix(same)
    assert same.num_computed_tokens == 8


def test_shared_blocks_stay_until_the_last_user_frees_them():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = seq("a", list(range(9)))
    compute_prompt(kv, a)
    b = seq("b", list(range(9)))
    compute_prompt(kv, b)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    kv.free(a)
    assert all(kv.blocks[i].ref_count == 1 for i in shared)
    assert all(i not in kv.free_queue for i in shared)
    kv.free(b)
    assert kv.num_used_blocks == 0


def test_freed_prefix_blocks_are_reused_last_and_revived_by_a_match():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = seq("a", list(range(9)))  # two hashed blocks and a partial one
    compute_prompt(kv, a)
    hashed, partial = a.block_table[:2], a.block_table[2]
    kv.free(a)
    # Unhashed blocks go to the front of the free queue, hashed ones to the back (LRU).
    assert kv.free_queue[0] == partial
    assert list(kv.free_queue)[-2:] == list(reversed(hashed))
    # A matching prompt revives the freed blocks with their contents.
    b = seq("b", list(range(9)))
    kv.match_prefix(b)
    assert b.block_table == hashed and b.num_computed_tokens == 8
    assert all(i not in kv.free_queue for i in hashed)
    kv.free(b)


def test_the_free_queue_keeps_eviction_order_and_takes_out_any_block():
    """A prefix hit revives freed blocks from anywhere in the queue: the queue removes any block
    at once (a deque's remove() scanned it: 212 ms for a 4096-token hit in the default 1 GiB
    cache), and keeps the order that eviction takes."""
    q = FreeBlockQueue(range(1, 6))
    q.appendleft(9)  # an unhashed block: reused first
    q.append(7)  # a hashed one: reused last
    q.remove(3)  # revived by a prefix hit
    assert list(q) == [9, 1, 2, 4, 5, 7] and len(q) == 6
    assert (q[0], q[2], q[-1], q[-2]) == (9, 2, 7, 5) and 4 in q and 3 not in q
    assert [q.popleft(), q.popleft()] == [9, 1]
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert isinstance(kv.free_queue, FreeBlockQueue) and list(kv.free_queue) == list(range(8))


def test_allocation_evicts_the_least_recently_freed_prefix_first():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    old, new = seq("old", list(range(100, 105))), seq("new", list(range(200, 205)))
    compute_prompt(kv, old)  # one hashed block, one partial
    kv.free(old)
    compute_prompt(kv, new)
    kv.free(new)
    # Blocks holding no prefix are reused first, then the prefix block freed longest ago.
    filler = seq("filler", list(range(12)))
    assert kv.allocate(filler, 12)
    again_old, again_new = seq("o2", list(range(100, 105))), seq("n2", list(range(200, 205)))
    kv.match_prefix(again_old)
    kv.match_prefix(again_new)
    assert again_old.num_computed_tokens == 0  # evicted
    assert again_new.num_computed_tokens == 4  # still cached


def test_equal_content_in_two_blocks_keeps_one_in_the_cache():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a, b = seq("a", list(range(5))), seq("b", list(range(5)))
    for s in (a, b):  # both computed before either registered: no sharing
        assert kv.allocate(s, 5)
        s.num_computed_tokens = 5
    kv.register_full_blocks(a)
    kv.register_full_blocks(b)
    assert a.block_table[0] != b.block_table[0]
    assert kv.blocks[a.block_table[0]].hash is not None
    assert kv.blocks[b.block_table[0]].hash is None  # private copy
    cached = a.block_table[0]
    kv.free(a)
    kv.free(b)
    c = seq("c", list(range(5)))
    kv.match_prefix(c)
    assert c.block_table == [cached]


def test_block_keys_are_sha256_chains_over_salt_and_every_prefix_token():
    """The prefix cache's keys are SHA-256 chains, not Python's hash(): when every KV group
    slides, a matched prefix's early blocks may be gone and only the chain vouches for them, and
    hash() of ints is deterministic and cheap to collide on purpose (vLLM's CVE-2025-25183)."""
    import hashlib
    import json
    from array import array

    kv = KVCacheManager(num_blocks=12, block_size=BS)
    a = seq("a", list(range(9)), salt="tenant-1")
    compute_prompt(kv, a)
    expected = hashlib.sha256(b"\x00" + json.dumps(["tenant-1", None]).encode())
    expected.update(array("q", range(4)).tobytes())
    first = expected.digest()
    second = hashlib.sha256(b"\x01" + first)
    second.update(array("q", range(4, 8)).tobytes())
    assert kv.blocks[a.block_table[0]].hash == (0, first)
    assert kv.blocks[a.block_table[1]].hash == (0, second.digest())
    assert a.last_block_hash == second.digest()
    # Neither the salt nor an earlier block can be swapped without changing every later key.
    b = seq("b", [0, 1, 2, 5] + list(range(4, 9)), salt="tenant-1")
    c = seq("c", list(range(9)), salt="tenant-2")
    for other in (b, c):
        compute_prompt(kv, other)
        assert kv.blocks[other.block_table[1]].hash != kv.blocks[a.block_table[1]].hash
