"""The Scheduler's service tiers on their own: priority sequences are admitted first, the default
tier still gets one admission in every PRIORITY_SHARE + 1 while both wait, preempted sequences
return to the head of their own tier, and removal from either waiting queue stays lazy."""

from __future__ import annotations

from girandole import SamplingParams
from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.scheduler import PRIORITY_SHARE, Scheduler, SchedulerConfig
from girandole.engine.sequence import Sequence, SequenceStatus


def make(max_seqs: int = 1, budget: int = 64, num_blocks: int = 256) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    return Scheduler(config, KVCacheManager(num_blocks, 4))


def seq(rid: str, priority: int = 0, n: int = 4) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(max_tokens=4), priority=priority)


def admission_order(sched: Scheduler) -> list[str]:
    """Admit one sequence a step (max_num_seqs=1) and finish it at once, until none waits."""
    order = []
    while sched.num_waiting:
        batch = sched.schedule()
        assert len(batch.seqs) == 1
        order.append(batch.seqs[0].request_id)
        sched.remove(batch.seqs[0])
    return order


def test_priority_sequences_are_admitted_before_earlier_default_ones():
    sched = make()
    for rid in ("d1", "d2"):
        sched.add(seq(rid))
    for rid in ("p1", "p2"):
        sched.add(seq(rid, priority=1))
    assert admission_order(sched) == ["p1", "p2", "d1", "d2"]


def test_the_default_tier_is_never_starved():
    sched = make()
    sched.add(seq("d1"))
    sched.add(seq("d2"))
    for i in range(3 * PRIORITY_SHARE):
        sched.add(seq(f"p{i}", priority=1))
    order = admission_order(sched)
    # one default admission after every PRIORITY_SHARE priority ones, while both tiers wait
    assert order.index("d1") == PRIORITY_SHARE
    assert order.index("d2") == 2 * PRIORITY_SHARE + 1
    assert [r for r in order if r.startswith("p")] == [f"p{i}" for i in range(3 * PRIORITY_SHARE)]


def test_a_lone_priority_stream_does_not_bank_turns_against_later_default_work():
    sched = make()
    for i in range(10):
        sched.add(seq(f"p{i}", priority=1))
    assert admission_order(sched) == [f"p{i}" for i in range(10)]
    for i in range(PRIORITY_SHARE + 1):
        sched.add(seq(f"q{i}", priority=1))
    sched.add(seq("d"))
    # the streak counts only while the default tier waits: d comes after PRIORITY_SHARE
    assert admission_order(sched).index("d") == PRIORITY_SHARE


def test_removed_waiting_sequences_of_either_tier_are_skipped():
    sched = make()
    a, b, c, d = seq("a"), seq("b", 1), seq("c"), seq("d", 1)
    for s in (a, b, c, d):
        sched.add(s)
    sched.remove(b)
    sched.remove(a)
    assert sched.num_waiting == 2
    assert admission_order(sched) == ["d", "c"]
    assert sched.num_waiting == 0 and not sched.has_work()


def test_many_removals_compact_both_queues():
    sched = make()
    seqs = [seq(f"s{i}", priority=i % 2) for i in range(200)]
    for s in seqs:
        sched.add(s)
    for s in seqs[:150]:
        sched.remove(s)
    assert sched.num_waiting == 50
    assert len(sched.waiting) + len(sched.priority_waiting) < 200  # compacted at least once
    order = admission_order(sched)
    assert sorted(order) == sorted(s.request_id for s in seqs[150:])


def test_a_preempted_priority_sequence_returns_to_the_head_of_its_tier():
    sched = make(max_seqs=4, budget=64, num_blocks=4)  # 16 tokens of KV cache
    p = seq("p", priority=1, n=8)
    d = seq("d", n=7)
    sched.add(p)
    sched.add(d)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["p", "d"]
    sched.mark_computed(batch)
    for s in batch.seqs:
        s.token_ids.append(1)
    # both decode: p needs its 3rd block, d its 2nd; only 4 blocks: d (admitted last) goes
    batch = sched.schedule()
    sched.add(seq("p2", priority=1))
    assert d.status is SequenceStatus.WAITING and sched.waiting[0] is d
    assert [s.request_id for s in batch.seqs] == ["p"]
    assert list(sched.priority_waiting)[-1].request_id == "p2"
