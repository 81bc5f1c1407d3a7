"""The admission queue: at most `max_active` inference requests at the engine; up to
`max_queued` more wait (first come, first served) for at most `timeout` seconds. A request that
finds the queue full gets 429 at once; one that waits too long gets 503. Memory stays bounded
however many clients come."""

from __future__ import annotations

import asyncio
import collections
import time

from girandole.api.http.errors import APIError, too_many_requests


class Admission:
    """Slots counted in choices (engine sequences): a request of P prompts with n choices takes
    P x n of them (at most `max_active`, so a big request can still run alone)."""

    def __init__(self, max_active: int, max_queued: int, timeout: float) -> None:
        self.max_active = max(1, max_active)
        self.max_queued = max(0, max_queued)
        self.timeout = timeout
        self.num_active = 0  # choices holding slots
        self.num_rejected = 0
        self.num_timed_out = 0
        self._waiters: collections.deque[tuple[asyncio.Future, int]] = collections.deque()

    @property
    def num_queued(self) -> int:
        return sum(1 for f, _ in self._waiters if not f.done())

    def weight(self, num_choices: int) -> int:
        return min(max(1, num_choices), self.max_active)

    async def acquire(self, num_choices: int = 1) -> float:
        """Take slots for `num_choices` (seconds waited). Pair each success with one
        `release(num_choices)`."""
        weight = self.weight(num_choices)
        if self.num_active + weight <= self.max_active and not self.num_queued:
            self.num_active += weight
            return 0.0
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
        self._waiters.append((future, weight))
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
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
                self.release(num_choices)  # granted, but the caller went away
            else:
                future.cancel()
                self._grant()
            raise
        return time.monotonic() - start

    def release(self, num_choices: int = 1) -> None:
        """Free a request's slots, handing them to the waiters in order while they fit."""
        self.num_active -= self.weight(num_choices)
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            future, weight = self._waiters[0]
            if future.done():  # cancelled or timed out
                self._waiters.popleft()
                continue
            if self.num_active + weight > self.max_active:
                return  # first come, first served: the head waits for room
            self._waiters.popleft()
            self.num_active += weight
            future.set_result(None)
