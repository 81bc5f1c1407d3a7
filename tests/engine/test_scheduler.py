"""Scheduler on its own (with a real KVCacheManager and no model): the shared token budget,
chunked prefill, the sequence cap, decode-first order, preemption and re-admission, and the
sequence that cannot grow even alone."""

from __future__ import annotations

from scheduler_helpers import SAMPLED, make, scheduled, step

from girandole import SamplingParams
from girandole.engine.scheduler import ScheduledBatch
from girandole.engine.sequence import Sequence, SequenceStatus


def seq(rid: str, n: int, first: int = 0) -> Sequence:
    return Sequence(rid, list(range(first, first + n)), SamplingParams(max_tokens=100))


def test_a_long_prompt_is_chunked_by_the_token_budget():
    sched = make(budget=8)
    a = seq("a", 20)
    sched.add(a)
    assert [scheduled(step(sched)) for _ in range(5)] == [
        [("a", 8)],
        [("a", 8)],
        [("a", 4)],  # the prompt's last chunk: then a token is sampled
        [("a", 1)],
        [("a", 1)],
    ]
    assert a.num_output_tokens == 3 and a.status is SequenceStatus.RUNNING


def test_decode_tokens_and_prefill_chunks_share_one_budget():
    sched = make(budget=10)
    for rid in "abc":
        sched.add(seq(rid, 4, first=10 * ord(rid)))
    assert scheduled(step(sched)) == [("a", 4), ("b", 4), ("c", 2)]
    # a and b decode; c's remaining prompt; d is admitted with what is left of the budget.
    sched.add(seq("d", 6))
    assert scheduled(step(sched)) == [("a", 1), ("b", 1), ("c", 2), ("d", 6)]
    assert scheduled(step(sched)) == [("a", 1), ("b", 1), ("c", 1), ("d", 1)]


def test_the_sequence_cap_holds_back_waiting_requests():
    sched = make(max_seqs=2)
    for rid in "abc":
        sched.add(seq(rid, 3, first=10 * ord(rid)))
    assert scheduled(step(sched)) == [("a", 3), ("b", 3)]
    assert scheduled(step(sched)) == [("a", 1), ("b", 1)]
    sched.remove(sched.running[0])
    assert scheduled(step(sched)) == [("b", 1), ("c", 3)]


def test_the_batch_puts_decode_tokens_first():
    decoding = seq("decoding", 4)
    decoding.token_ids.append(SAMPLED)
    decoding.num_computed_tokens = 4  # its prompt is computed: its sampled token is next
    prefilling = seq("prefilling", 8)
    prefilling.num_computed_tokens = 4
    batch = ScheduledBatch([prefilling, decoding], [4, 1])
    batch.order_decode_first()
    assert scheduled(batch) == [("decoding", 1), ("prefilling", 4)]


def test_a_waiting_request_that_does_not_fit_keeps_waiting():
    sched = make(num_blocks=2)
    a, b = seq("a", 8), seq("b", 4, first=100)
    sched.add(a)
    sched.add(b)
    assert scheduled(step(sched)) == [("a", 8)]
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert sched.kv_cache.num_free_blocks == 0
    sched.remove(a)
    assert scheduled(step(sched)) == [("b", 4)]


def test_preemption_frees_the_last_admitted_and_recomputes_it_later():
    sched = make(num_blocks=4, budget=16)
    a, b, c = seq("a", 4), seq("b", 4, first=100), seq("c", 2, first=200)
    sched.add(a)
    sched.add(b)
    for _ in range(5):  # prefill, then decode positions 4..7: two blocks each, all in use
        step(sched)
    assert sched.kv_cache.num_free_blocks == 0 and len(a) == len(b) == 9
    sched.add(c)
    # Position 8 needs a third block each: b, admitted last, gives its blocks to a; nothing
    # new is admitted in a step that had to preempt.
    assert scheduled(step(sched)) == [("a", 1)]
    assert sched.num_preemptions == 1 and b.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and sched.waiting[0] is b
    assert b.block_table == [] and len(b) == 9  # its tokens are kept, its cache is not
    assert c.status is SequenceStatus.WAITING
    sched.remove(a)
    assert sched.kv_cache.num_used_blocks == 0
    batch = step(sched)
    # b comes back first and recomputes whatever the prefix cache no longer holds.
    assert batch.seqs[0] is b and b.status is SequenceStatus.RUNNING
    assert b.num_computed_tokens == 9 and batch.num_new_tokens[0] < 9
    assert b.num_cached_tokens == 0  # usage reports the first admission's cache hits only


def test_a_sequence_that_cannot_grow_alone_is_out_of_blocks():
    sched = make(num_blocks=2)
    a = seq("a", 8)
    sched.add(a)
    step(sched)  # prefill: both blocks; its next token needs a third
    batch = sched.schedule()
    assert batch.seqs == [] and batch.out_of_blocks == [a]
    sched.remove(a)
    assert not sched.has_work() and sched.kv_cache.num_used_blocks == 0


def test_remove_frees_blocks_of_running_and_waiting_sequences():
    sched = make(budget=4)
    a, b = seq("a", 4), seq("b", 4, first=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    sched.remove(b)
    sched.remove(a)
    assert sched.kv_cache.num_used_blocks == 0
    assert not sched.has_work()


# -- the prefill cap while decodes run (engine/step_budget.py gives it) ---------------------


def test_decodes_run_beside_a_capped_prefill():
    sched = make(budget=32)
    for rid in "ab":
        sched.add(seq(rid, 4, first=10 * ord(rid)))
    step(sched, None)  # a and b prefilled: they decode from now on
    sched.add(seq("long", 40, first=500))
    cap = lambda rows: 6 if rows else None  # noqa: E731
    assert scheduled(step(sched, cap)) == [("a", 1), ("b", 1), ("long", 6)]
    assert scheduled(step(sched, cap)) == [("a", 1), ("b", 1), ("long", 6)]
    # without decodes the whole budget goes to the prompt
    solo = make(budget=32)
    solo.add(seq("long", 40))
    assert scheduled(step(solo, cap)) == [("long", 32)]


def test_a_cap_of_zero_skips_prefill_but_not_decodes():
    sched = make(budget=32)
    sched.add(seq("a", 4))
    step(sched, None)
    sched.add(seq("b", 10, first=100))
    assert scheduled(step(sched, lambda rows: 0)) == [("a", 1)]
    assert scheduled(step(sched, None)) == [("a", 1), ("b", 10)]
