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
    def __init__(self, max_active: int, max_queued: int, timeout: float) -> None:
        self.max_active = max(1, max_active)
        self.max_queued = max(0, max_queued)
        self.timeout = timeout
        self.num_active = 0
        self.num_rejected = 0
        self.num_timed_out = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def num_queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> float:
        """Take a slot (seconds waited). Pair every successful call with one `release()`."""
        if self.num_active < self.max_active and not self.num_queued:
            self.num_active += 1
            return 0.0
        if self.num_queued >= self.max_queued:
            self.num_rejected += 1
            error = too_many_requests(
                f"The server is at capacity: {self.num_active} requests running and"
                f" {self.num_queued} queued (the most it queues is {self.max_queued});"
                " retry later"
            )
            error.headers["Retry-After"] = "1"
            raise error
        start = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            if future.done() and not future.cancelled():
                return time.monotonic() - start  # granted as the timeout struck
            future.cancel()
            self.num_timed_out += 1
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
                self.release()  # granted, but the caller went away
            else:
                future.cancel()
            raise
        return time.monotonic() - start

    def release(self) -> None:
        """Free a slot, handing it to the longest waiter if any."""
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.num_active -= 1
