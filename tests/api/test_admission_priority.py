"""The admission queue's tiers on their own: a priority request is granted before default ones
that queued earlier, the default tier gets one grant in every PRIORITY_SHARE + 1 while both
wait, and a priority request passes a default head that does not fit. Batch-job lines (tier
BATCH_TIER) are granted only while no interactive request waits. Within a tier, the waiter
whose account, then key, holds the fewest slots goes next (FIFO when all are one owner's)."""

from __future__ import annotations

import asyncio

import pytest

from girandole.api.ops.admission import Admission, Owner
from girandole.engine.scheduler import BATCH_TIER, PRIORITY_SHARE


async def _grant_order(requests: list[tuple[str, int]]) -> list[str]:
    """Queue `requests` (name, tier) behind one held slot, then free slots one at a time."""
    admission = Admission(max_active=1, max_queued=100, timeout=30)
    await admission.acquire()
    order: list[str] = []

    async def one(name: str, tier: int) -> None:
        await admission.acquire(1, tier)
        order.append(name)

    tasks = []
    for name, tier in requests:
        tasks.append(asyncio.create_task(one(name, tier)))
        await asyncio.sleep(0)  # queued in this order
    for _ in range(len(requests) + 1):
        admission.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return order


def test_priority_requests_are_granted_first():
    order = asyncio.run(_grant_order([("d1", False), ("d2", False), ("p1", True), ("p2", True)]))
    assert order == ["p1", "p2", "d1", "d2"]


def test_the_default_tier_keeps_a_share():
    requests = [("d1", False), ("d2", False)] + [(f"p{i}", True) for i in range(2 * PRIORITY_SHARE)]
    order = asyncio.run(_grant_order(requests))
    assert order.index("d1") == PRIORITY_SHARE
    assert order.index("d2") == 2 * PRIORITY_SHARE + 1


@pytest.mark.parametrize(
    "head_tier, passer_tier",
    [(0, 1), (BATCH_TIER, 0)],
    ids=["priority-passes-default", "default-passes-batch"],
)
def test_a_request_of_a_higher_tier_passes_a_lower_head_that_does_not_fit(head_tier, passer_tier):
    async def scenario() -> list[str]:
        admission = Admission(max_active=4, max_queued=10, timeout=30)
        await admission.acquire(2)
        order: list[str] = []

        async def one(name: str, weight: int, tier: int) -> None:
            await admission.acquire(weight, tier)
            order.append(name)

        big = asyncio.create_task(one("big", 4, head_tier))  # waits for all 4 slots
        await asyncio.sleep(0)
        small = asyncio.create_task(one("small", 1, passer_tier))  # fits beside the holder
        await asyncio.sleep(0)
        await small
        assert order == ["small"] and admission.num_queued == 1
        admission.release(2)
        admission.release(1)
        await big
        return order

    assert asyncio.run(scenario()) == ["small", "big"]


def test_batch_lines_are_granted_after_interactive_requests_that_queued_later():
    requests = [("b1", BATCH_TIER), ("b2", BATCH_TIER), ("d", 0), ("p", 1), ("b3", BATCH_TIER)]
    assert asyncio.run(_grant_order(requests)) == ["p", "d", "b1", "b2", "b3"]


def test_batch_lines_leave_the_priority_share_alone():
    requests = [("b", BATCH_TIER), ("d1", 0), ("d2", 0)]
    requests += [(f"p{i}", 1) for i in range(2 * PRIORITY_SHARE)]
    order = asyncio.run(_grant_order(requests))
    assert order.index("d1") == PRIORITY_SHARE
    assert order.index("d2") == 2 * PRIORITY_SHARE + 1
    assert order[-1] == "b"


@pytest.mark.parametrize(
    ("max_active", "num_inputs", "window"), [(64, 500, 32), (64, 10, 10), (4, 300, 2), (1, 5, 1)]
)
def test_a_prefill_request_takes_at_most_half_the_slots(max_active, num_inputs, window):
    # before: min(inputs, max_active), so hundreds of embeddings inputs held every slot
    admission = Admission(max_active=max_active, max_queued=0, timeout=1)
    assert admission.prefill_window(num_inputs) == window


A1, A2, B1 = ("acme", "key-a1"), ("acme", "key-a2"), ("bobco", "key-b1")


class _Queue:
    """An Admission whose slots are held by `holders`, and requests queued behind them."""

    def __init__(self, holders: list[Owner]) -> None:
        self.admission = Admission(max_active=len(holders), max_queued=100, timeout=30)
        self.holders = holders
        self.order: list[str] = []
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for owner in self.holders:
            await self.admission.acquire(1, 0, owner)

    async def queue(self, name: str, owner: Owner) -> None:
        async def one() -> None:
            await self.admission.acquire(1, 0, owner)
            self.order.append(name)

        self.tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(0)  # queued in call order

    async def release(self, owner: Owner) -> None:
        self.admission.release(1, owner)
        for _ in range(5):  # the granted waiter's shield and wait_for hand the result on
            await asyncio.sleep(0)

    async def finish(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def test_a_keys_burst_does_not_hold_back_another_keys_request():
    """Before: first come, first served; b waited for a1, a2 and a3 (an eval harness's burst
    of 256 made another key's request wait for all of it, then 503)."""

    async def scenario() -> list[str]:
        q = _Queue([A1, A1])
        await q.start()
        for name in ("a1", "a2", "a3"):
            await q.queue(name, A1)
        await q.queue("b", B1)
        await q.release(A1)  # acme holds 1, bobco 0: b
        await q.release(A1)  # acme 0, bobco 1: a1
        await q.release(B1)  # b done: only acme waits
        await q.release(A1)
        assert q.admission.held(A1) == (2, 2) and q.admission.held(B1) == (0, 0)
        await q.finish()
        return q.order

    assert asyncio.run(scenario()) == ["b", "a1", "a2", "a3"]


def test_accounts_are_fair_first_then_their_keys():
    async def scenario() -> list[str]:
        q = _Queue([A1, A1, B1])
        await q.start()
        await q.queue("x", A2)  # its key holds nothing, its account 2 slots
        await q.queue("y", B1)  # its key and account hold 1
        await q.release(B1)  # acme 2, bobco 0: y, though x came first
        assert q.order == ["y"]
        await q.release(A1)  # acme 1 and bobco 1 (y): only x waits
        assert q.order == ["y", "x"]
        await q.queue("z1", A1)  # key-a1 holds 1 slot, key-a2 1 (x)
        await q.queue("z2", A1)
        await q.queue("w", A2)
        await q.release(A2)  # x done: acme 1, key-a1 1, key-a2 0: w, though z1 came first
        assert q.order == ["y", "x", "w"]
        await q.release(A1)
        await q.release(A2)
        await q.finish()
        return q.order

    assert asyncio.run(scenario()) == ["y", "x", "w", "z1", "z2"]


def test_one_owner_is_served_in_arrival_order_and_its_slots_counted_back_to_none():
    async def scenario() -> list[str]:
        q = _Queue([B1])
        await q.start()
        for name in ("1", "2", "3"):
            await q.queue(name, A1)
        for owner in (B1, A1, A1, A1):
            await q.release(owner)
        assert q.admission.num_active == 0 and q.admission.held(A1) == (0, 0)
        assert not q.admission._held_by_key  # no entry kept for a key holding nothing
        await q.finish()
        return q.order

    assert asyncio.run(scenario()) == ["1", "2", "3"]
