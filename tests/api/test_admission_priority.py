"""The admission queue's tiers on their own: a priority request is granted before default ones
that queued earlier, the default tier gets one grant in every PRIORITY_SHARE + 1 while both
wait, and a priority request passes a default head that does not fit. Batch-job lines (tier
BATCH_TIER) are granted only while no interactive request waits."""

from __future__ import annotations

import asyncio

import pytest

from girandole.api.ops.admission import Admission
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
