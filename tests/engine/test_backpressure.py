"""Backpressure: a request whose caller does not read its outputs is paused, gives its blocks
and its seat to whoever needs them, and goes on where it stopped once the caller reads again
(engine/scheduler.py `pause`, engine/async_engine.py)."""

from __future__ import annotations

import asyncio

import pytest
from scheduler_helpers import make, scheduled, step

from girandole import SamplingParams
from girandole.engine.async_engine import AsyncEngine, EngineConfig
from girandole.engine.backpressure import MAX_UNREAD_OUTPUTS
from girandole.engine.sequence import Sequence, SequenceStatus


def seq(rid: str, n: int, first: int = 0) -> Sequence:
    return Sequence(rid, list(range(first, first + n)), SamplingParams(max_tokens=100))


# -- the scheduler -----------------------------------------------------------------------------


def test_a_paused_sequence_is_not_scheduled_until_resumed():
    sched = make()
    a, b = seq("a", 4), seq("b", 4, first=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.pause(a)
    assert scheduled(step(sched)) == [("b", 1)]
    assert a.status is SequenceStatus.RUNNING and a.block_table  # it keeps its blocks
    sched.remove(b)
    assert not sched.has_work() and sched.num_paused == 1  # nothing to step: the loop idles
    sched.resume(a)
    assert scheduled(step(sched)) == [("a", 1)]
    assert sched.num_paused == 0


def test_a_paused_sequence_is_the_first_to_give_its_blocks_and_returns_first():
    sched = make(num_blocks=4, budget=16)
    a, b = seq("a", 4), seq("b", 4, first=100)
    sched.add(a)
    sched.add(b)
    for _ in range(5):  # prefill, then positions 4..7: two blocks each, all in use
        step(sched)
    sched.pause(a)  # admitted first, so without the pause b would be the victim
    assert scheduled(step(sched)) == [("b", 1)]  # b's position 8 takes a's blocks
    assert a.status is SequenceStatus.PARKED and a.block_table == [] and len(a) == 9
    assert not sched.waiting and sched.num_paused == 1
    sched.remove(b)
    sched.resume(a)
    assert sched.waiting[0] is a
    batch = step(sched)
    assert batch.seqs == [a] and a.num_computed_tokens == 9  # recomputed from its tokens


def test_a_newcomer_takes_the_seat_of_a_paused_sequence():
    sched = make(max_seqs=2)
    a, b, c = seq("a", 3), seq("b", 3, first=100), seq("c", 3, first=200)
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    sched.pause(b)
    assert scheduled(step(sched)) == [("a", 1), ("c", 3)]
    assert b.status is SequenceStatus.PARKED
    sched.remove(a)
    sched.remove(c)
    sched.resume(b)
    assert scheduled(step(sched)) == [("b", 4)]


def test_pausing_a_preempted_sequence_parks_it_and_removing_a_parked_one_frees_it():
    sched = make(num_blocks=4, budget=16)
    a, b = seq("a", 4), seq("b", 4, first=100)
    sched.add(a)
    sched.add(b)
    for _ in range(6):  # b is preempted for a's position 8
        step(sched)
    assert b.status is SequenceStatus.WAITING
    sched.pause(b)
    assert b.status is SequenceStatus.PARKED and not sched.waiting
    sched.remove(b)
    assert b.is_finished and sched.num_paused == 0
    sched.remove(a)
    assert sched.kv_cache.num_used_blocks == 0 and not sched.has_work()


# -- the async engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    # a KV cache of 31 blocks of 4 tokens: two 91-token sequences do not fit beside each other
    eng = AsyncEngine(
        EngineConfig(
            model=str(tiny_llama_dir),
            mode="reference",
            device="cpu",
            block_size=4,
            kv_cache_gb=0.00006,
            max_model_len=96,
        )
    )
    yield eng
    eng.shutdown()


GREEDY = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)


async def tokens_of(stream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]


async def wait_until(condition, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_a_caller_that_stops_reading_pauses_its_request(engine):
    prompt = engine.tokenizer.encode("Once upon a time")

    async def main():
        expected = await tokens_of(engine.generate(prompt, GREEDY, "reference"))
        pauses = engine.num_backpressure_pauses
        stream = engine.generate(prompt, GREEDY, "unread")
        first = await anext(stream)  # then nothing is read for a while
        await wait_until(lambda: engine.stats()["num_paused"] == 1)
        made = engine.engine.seqs["unread"].num_output_tokens
        await asyncio.sleep(0.3)
        assert engine.engine.seqs["unread"].num_output_tokens == made  # stopped
        assert made <= MAX_UNREAD_OUTPUTS + 3 < GREEDY.max_tokens
        rest = await tokens_of(stream)  # reading resumes it
        assert first.new_token_ids + rest == expected
        assert engine.num_backpressure_pauses == pauses + 1
        assert engine.stats()["num_paused"] == 0

    asyncio.run(main())


def test_a_paused_request_gives_its_blocks_to_a_reader_and_ends_right(engine):
    prompt = engine.tokenizer.encode("Once upon a time")
    other = engine.tokenizer.encode("The weather today")

    async def main():
        expected = await tokens_of(engine.generate(prompt, GREEDY, "ref-a"))
        expected_b = await tokens_of(engine.generate(other, GREEDY, "ref-b"))
        preempted = engine.stats()["num_preemptions"]
        stream = engine.generate(prompt, GREEDY, "slow")
        first = await anext(stream)
        await wait_until(lambda: engine.stats()["num_paused"] == 1)
        # the reader needs blocks the paused request holds: it finishes while `slow` waits
        assert await tokens_of(engine.generate(other, GREEDY, "reader")) == expected_b
        assert engine.engine.seqs["slow"].status is SequenceStatus.PARKED
        assert engine.stats()["num_preemptions"] > preempted
        rest = await tokens_of(stream)
        assert first.new_token_ids + rest == expected
        assert engine.stats()["kv_blocks_used"] == 0 or not engine.engine.scheduler.running

    asyncio.run(main())
