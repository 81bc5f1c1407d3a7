"""The Scheduler's batch tier on its own (a real KVCacheManager, no model): batch-job lines
(`BATCH_TIER`) are admitted after every interactive sequence, sit out the steps that carry an
interactive prefill (keeping their blocks), are the first to be preempted, give up their blocks
and sequence slots to interactive newcomers, and run like any other work when nothing
interactive is there."""

from __future__ import annotations

from scheduler_helpers import make, scheduled, step

from girandole import SamplingParams
from girandole.engine.scheduler import BATCH_TIER
from girandole.engine.sequence import Sequence, SequenceStatus


def seq(rid: str, n: int = 4, tier: int = 0) -> Sequence:
    first = 1000 * (sum(map(ord, rid)) % 50)  # distinct prompts: no prefix-cache sharing
    return Sequence(
        rid, list(range(first, first + n)), SamplingParams(max_tokens=100), priority=tier
    )


def batch_line(rid: str, n: int = 4) -> Sequence:
    return seq(rid, n, BATCH_TIER)


def test_interactive_sequences_are_admitted_before_earlier_batch_lines():
    sched = make(max_seqs=2)
    for rid in ("b1", "b2", "b3"):
        sched.add(batch_line(rid))
    sched.add(seq("d"))
    sched.add(seq("p", tier=1))
    assert scheduled(step(sched)) == [("p", 4), ("d", 4)]
    assert [s.request_id for s in sched.batch_waiting] == ["b1", "b2", "b3"]
    assert sched.num_waiting == 3


def test_batch_rows_sit_out_a_step_with_an_interactive_prefill_and_keep_their_blocks():
    sched = make()
    lines = [batch_line(f"b{i}") for i in range(3)]
    for line in lines:
        sched.add(line)
    assert scheduled(step(sched)) == [("b0", 4), ("b1", 4), ("b2", 4)]
    assert scheduled(step(sched)) == [("b0", 1), ("b1", 1), ("b2", 1)]
    used = sched.kv_cache.num_used_blocks
    sched.add(seq("i", 6))
    # the newcomer's prefill runs alone: no batch decode beside it
    assert scheduled(step(sched)) == [("i", 6)]
    assert all(s.status is SequenceStatus.RUNNING for s in lines)
    assert sched.num_preemptions == 0 and sched.num_batch_yields == 1
    assert sched.kv_cache.num_used_blocks > used  # theirs kept, the newcomer's added
    # then everyone decodes together
    assert scheduled(step(sched)) == [("i", 1), ("b0", 1), ("b1", 1), ("b2", 1)]


def test_a_chunked_interactive_prompt_holds_batch_rows_back_until_its_last_chunk():
    sched = make(budget=8)
    sched.add(batch_line("b", 3))
    step(sched)
    sched.add(seq("long", 20))
    chunks = [scheduled(step(sched)) for _ in range(4)]
    assert chunks == [[("long", 8)], [("long", 8)], [("long", 4)], [("long", 1), ("b", 1)]]


def test_a_batch_prefill_waits_while_an_interactive_prefill_runs():
    sched = make(budget=8)
    b = batch_line("b", 20)
    sched.add(b)
    assert scheduled(step(sched)) == [("b", 8)]
    sched.add(seq("i", 5))
    assert scheduled(step(sched)) == [("i", 5)]
    assert b.num_computed_tokens == 8
    assert scheduled(step(sched)) == [("i", 1), ("b", 7)]


def test_interactive_decodes_run_beside_batch_rows():
    sched = make()
    sched.add(seq("i"))
    step(sched)
    sched.add(batch_line("b"))
    assert scheduled(step(sched)) == [("i", 1), ("b", 4)]
    assert scheduled(step(sched)) == [("i", 1), ("b", 1)]
    assert sched.num_batch_yields == 0


def test_without_interactive_work_batch_lines_schedule_like_the_default_tier():
    def trace(tier: int) -> list[list[tuple[str, int]]]:
        sched = make(num_blocks=12, budget=10, max_seqs=3)
        for i in range(5):
            sched.add(seq(f"s{i}", 3 + 2 * i, tier))
        out = []
        for _ in range(12):
            batch = step(sched)
            out.append(scheduled(batch))
            for s in list(batch.seqs):
                if s.num_output_tokens >= 3:
                    sched.remove(s)
        return out

    batch_trace = trace(BATCH_TIER)
    assert batch_trace == trace(0)
    assert sum(n for row in batch_trace for _, n in row) > 0


def test_an_interactive_newcomer_preempts_batch_rows_for_blocks():
    sched = make(num_blocks=4)
    b1, b2 = batch_line("b1", 8), batch_line("b2", 8)
    sched.add(b1)
    sched.add(b2)
    step(sched)
    assert sched.kv_cache.num_free_blocks == 0
    sched.add(seq("i", 4))
    # b2 (admitted last) gives its two blocks; b1 keeps its own and runs on next step
    assert scheduled(step(sched)) == [("i", 4)]
    assert b2.status is SequenceStatus.WAITING and b2.block_table == []
    assert sched.batch_waiting[0] is b2 and b2.num_preemptions == 1
    assert b1.status is SequenceStatus.RUNNING and len(b1.block_table) == 2


def test_an_interactive_newcomer_takes_a_batch_rows_sequence_slot():
    sched = make(max_seqs=2)
    for rid in ("b1", "b2"):
        sched.add(batch_line(rid))
    step(sched)
    sched.add(seq("i"))
    assert scheduled(step(sched)) == [("i", 4)]
    assert [s.request_id for s in sched.running] == ["b1", "i"]
    assert sched.batch_waiting[0].request_id == "b2"


def test_a_batch_newcomer_preempts_nothing():
    sched = make(num_blocks=2, max_seqs=1)
    i = seq("i", 8)
    sched.add(i)
    step(sched)
    sched.add(batch_line("b"))
    for _ in range(2):
        batch = step(sched)
        assert [s.request_id for s in batch.seqs + batch.out_of_blocks] == ["i"]
    assert sched.num_preemptions == 0 and sched.batch_waiting[0].request_id == "b"


def test_running_batch_rows_are_preempted_before_later_interactive_ones():
    sched = make(num_blocks=6, budget=32)
    b = batch_line("b", 8)  # admitted first
    sched.add(b)
    step(sched)
    i1, i2 = seq("i1", 8), seq("i2", 8)
    sched.add(i1)
    sched.add(i2)
    step(sched)
    assert sched.kv_cache.num_free_blocks == 0
    # position 8 needs a third block each: the batch row goes first, though admitted first
    batch = step(sched)
    assert b.status is SequenceStatus.WAITING and sched.batch_waiting[0] is b
    assert scheduled(batch) == [("i1", 1), ("i2", 1)]
    assert i1.num_preemptions == i2.num_preemptions == 0


def test_the_prefill_cap_of_a_yielding_step_counts_only_interactive_decodes():
    sched = make(budget=64)
    for rid in ("b0", "b1", "b2"):
        sched.add(batch_line(rid))
    step(sched)
    rows_seen = []

    def cap(decode_rows: int) -> int | None:
        rows_seen.append(decode_rows)
        return None if decode_rows == 0 else 2

    sched.add(seq("i", 10))
    assert scheduled(step(sched, cap)) == [("i", 10)]  # no decode beside it: no cap
    assert rows_seen == [0]


def test_removed_batch_lines_are_skipped_and_compacted():
    sched = make(max_seqs=1)
    lines = [batch_line(f"b{i}") for i in range(200)]
    for line in lines:
        sched.add(line)
    for line in lines[:150]:
        sched.remove(line)
    assert sched.num_waiting == 50 and len(sched.batch_waiting) < 200
    sched.add(seq("i"))
    assert scheduled(sched.schedule()) == [("i", 4)]


def test_no_batch_line_is_admitted_while_an_interactive_sequence_waits():
    sched = make(num_blocks=4)
    sched.add(seq("a", 12))  # three of the four blocks
    step(sched)
    sched.add(seq("i", 8))  # needs two: waits, and no batch row holds any to give
    sched.add(batch_line("b", 4))  # one would fit, but i came first in tier order
    assert scheduled(step(sched)) == [("a", 1)]
    assert sched.waiting[0].request_id == "i" and sched.batch_waiting[0].request_id == "b"
    sched.remove(sched.running[0])
    assert scheduled(step(sched)) == [("i", 8)]  # its prefill alone
    assert scheduled(step(sched)) == [("i", 1), ("b", 4)]
