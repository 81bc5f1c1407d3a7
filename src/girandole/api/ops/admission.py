"""The admission queue: at most `max_active` inference requests at the engine; up to
`max_queued` more wait (first come, first served within a tier) for at most `timeout` seconds. A
request that finds the queue full gets 429 at once; one that waits too long gets 503. Memory
stays bounded however many clients come.

`service_tier: "priority"` requests wait in a queue of their own that is served first; while
both tiers wait, one grant in every `PRIORITY_SHARE + 1` goes to the default tier (the engine's
Scheduler orders its waiting sequences the same way), so the default tier is never starved.
Batch-job lines (tier `BATCH_TIER`) wait in a third queue, granted only while no interactive
request waits.

Within a tier, the next grant goes to the waiter whose owner holds the fewest slots now: its
account first, then its key; arrival order among equals (`Owner`). One key's burst (an eval
harness's 256 requests) then delays another key's request by a slot's turn, not by the whole
burst: first come, first served made it wait for every request queued before it, and fail with
503 at the queue timeout. A server with one key (or none) orders its queue as before."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from girandole.api.http.errors import APIError, too_many_requests
from girandole.engine.scheduler import PRIORITY_SHARE

# Who holds slots: (account, key id); (None, None) on an open server
Owner = tuple[str | None, str | None]
NOBODY: Owner = (None, None)
Waiters = collections.deque[tuple[asyncio.Future, int, Owner]]


class _Refused(Exception):
    """Set on a waiter's future when the queue is closed (the server stops): its error."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class Admission:
    """Slots counted in choices (engine sequences): a request of P prompts with n choices takes
    P x n of them (at most `max_active`, so a big request can still run alone)."""

    def __init__(self, max_active: int, max_queued: int, timeout: float) -> None:
        self.max_active = max(1, max_active)
        self.max_queued = max(0, max_queued)
        self.timeout = timeout
        self.num_active = 0  # choices holding slots
        self.num_prefill = 0  # slots of prefill-only requests running or queued (their windows)
        self.num_rejected = 0
        self.num_timed_out = 0
        self._waiters: Waiters = collections.deque()  # the default tier
        self._priority_waiters: Waiters = collections.deque()
        self._batch_waiters: Waiters = collections.deque()  # batch-job lines
        self._priority_streak = 0  # priority grants since the default tier's last one
        # slots held per account and per key: the fair order within a tier
        self._held_by_account: collections.Counter[str | None] = collections.Counter()
        self._held_by_key: collections.Counter[str | None] = collections.Counter()
        self._closed: Callable[[], APIError] | None = None  # every wait's error once closed

    @property
    def num_queued(self) -> int:
        waiting = (*self._waiters, *self._priority_waiters, *self._batch_waiters)
        return sum(1 for f, _, _ in waiting if not f.done())

    def weight(self, num_choices: int) -> int:
        return min(max(1, num_choices), self.max_active)

    def prefill_window(self, num_inputs: int) -> int:
        """Slots for a prefill-only request (embeddings, rerank) of `num_inputs`: at most half of
        them, shared by the prefill requests running (`num_prefill`), at least one; its inputs
        run that many at a time. Taking every slot for as long as hundreds of inputs took made
        every other request wait, and fail with 503 at the queue timeout (two such requests
        of half the slots each did the same)."""
        return min(max(1, num_inputs), max(1, self.max_active // 2 - self.num_prefill))

    async def acquire(self, num_choices: int = 1, tier: int = 0, owner: Owner = NOBODY) -> float:
        """Take slots for `num_choices` (seconds waited); `tier`: 1 for service_tier
        "priority", 0 the default, below 0 a batch-job line (`Sequence.priority`'s tiers);
        `owner`: the request's (account, key id). Pair each success with one
        `release(num_choices, owner)`."""
        weight = self.weight(num_choices)
        if self.num_active + weight <= self.max_active and not self.num_queued:
            self._hold(weight, owner)
            return 0.0
        if self._closed is not None:  # stopping: nothing that must wait will run
            raise self._closed()
        if self.num_queued >= self.max_queued:
            self.num_rejected += 1
            error = too_many_requests(
                f"The server is at capacity: {self.num_active} choices running and"
                f" {self.num_queued} requests queued (the most it queues is {self.max_queued});"
                " retry later"
            )
            error.headers["Retry-After"] = "1"
            raise error
        start = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        self._queue_of(tier).append((future, weight, owner))
        self._grant()  # a request of a higher tier may pass waiters that do not fit
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except _Refused as refused:
            raise refused.error from None
        except TimeoutError:
            if future.done() and not future.cancelled():
                return time.monotonic() - start  # granted as the timeout struck
            future.cancel()
            self.num_timed_out += 1
            self._grant()  # a large request leaving the head may let smaller ones in
            raise APIError(
                503,
                f"The server is saturated: no slot freed within {self.timeout:g} s of"
                " queueing; retry later",
                type="service_unavailable",
                code="UNAVAILABLE",
                headers={"Retry-After": "1"},
            ) from None
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(num_choices, owner)  # granted, but the caller went away
            else:
                future.cancel()
                self._grant()
            raise
        return time.monotonic() - start

    def close(self, error: Callable[[], APIError]) -> None:
        """The server stops: every request waiting now, and every one that would have to wait
        from now on, fails with `error()` at once (those that fit still run). A queued request
        waited for the whole drain period (a running one held its slots) only to get the
        drain's 503 at its end: it can be retried elsewhere now."""
        self._closed = error
        for queue in (self._priority_waiters, self._waiters, self._batch_waiters):
            while queue:
                future, _, _ = queue.popleft()
                if not future.done():
                    future.set_exception(_Refused(error()))

    def release(self, num_choices: int = 1, owner: Owner = NOBODY) -> None:
        """Free a request's slots, handing them to the waiters in order while they fit."""
        weight = self.weight(num_choices)
        self.num_active -= weight
        account, key = owner
        for held, name in ((self._held_by_account, account), (self._held_by_key, key)):
            held[name] -= weight
            if held[name] <= 0:
                del held[name]  # not one entry for every key that ever asked
        self._grant()

    def held(self, owner: Owner) -> tuple[int, int]:
        """Slots held now by `owner`'s account and by its key."""
        account, key = owner
        return self._held_by_account[account], self._held_by_key[key]

    def _hold(self, weight: int, owner: Owner) -> None:
        self.num_active += weight
        account, key = owner
        self._held_by_account[account] += weight
        self._held_by_key[key] += weight

    def _queue_of(self, tier: int) -> Waiters:
        if tier > 0:
            return self._priority_waiters
        return self._batch_waiters if tier < 0 else self._waiters

    def _next_queue(self) -> Waiters | None:
        """The queue whose head is granted next (cancelled heads dropped): the priority tier,
        unless the default tier waits and its turn has come; batch lines when neither waits."""
        for queue in (self._priority_waiters, self._waiters, self._batch_waiters):
            while queue and queue[0][0].done():  # cancelled or timed out
                queue.popleft()
        if self._priority_waiters and not (
            self._waiters and self._priority_streak >= PRIORITY_SHARE
        ):
            return self._priority_waiters
        return self._waiters or self._batch_waiters or None

    def _fairest(self, queue: Waiters) -> int:
        """The index of `queue`'s next waiter: the live one whose account, then key, holds the
        fewest slots; the earliest among equals."""
        best, best_rank = 0, None
        for i, (future, _, owner) in enumerate(queue):
            if future.done():
                continue
            rank = self.held(owner)
            if best_rank is None or rank < best_rank:
                best, best_rank = i, rank
                if rank == (0, 0):
                    break  # nobody holds fewer: the earliest such waiter
        return best

    def _grant(self) -> None:
        while (queue := self._next_queue()) is not None:
            index = self._fairest(queue)
            future, weight, owner = queue[index]
            if self.num_active + weight > self.max_active:
                return  # the tier's next waiter waits for room: nobody passes it
            del queue[index]
            if queue is self._priority_waiters and self._waiters:
                self._priority_streak += 1
            elif queue is not self._batch_waiters:
                self._priority_streak = 0
            self._hold(weight, owner)
            future.set_result(None)
