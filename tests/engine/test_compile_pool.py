"""The grammar compile pool: a deadline answered at once, jobs of callers that left skipped,
threads that never keep the process alive."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from girandole.sampling.compile_pool import CompilePool, CompileTimeout
from girandole.sampling.grammar import GrammarError


def test_result_and_errors_reach_the_caller():
    pool = CompilePool(timeout=5)

    def bad():
        raise GrammarError("nope")

    async def main():
        assert await pool.run(lambda: 41 + 1) == 42
        with pytest.raises(GrammarError, match="nope"):
            await pool.run(bad)

    asyncio.run(main())
    pool.close()


def test_a_slow_compile_times_out_at_the_deadline_and_later_jobs_of_gone_callers_are_skipped():
    pool = CompilePool(num_threads=1, timeout=0.3)
    release = threading.Event()
    ran: list[str] = []

    def slow():
        release.wait(5)
        ran.append("slow")

    async def main():
        start = time.monotonic()
        with pytest.raises(CompileTimeout, match="longer than 0.3 s"):
            await pool.run(slow, "JSON schema")
        assert time.monotonic() - start < 2
        # queued behind the slow one; its caller gives up before it starts
        waiter = asyncio.create_task(pool.run(lambda: ran.append("skipped")))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set()
        assert await pool.run(lambda: "next") == "next"

    asyncio.run(main())
    assert ran == ["slow"] and pool.num_skipped == 1 and pool.num_timed_out == 1
    pool.close()


def test_pool_threads_are_daemons():
    pool = CompilePool(num_threads=2)
    assert all(t.daemon for t in pool._threads)
    pool.close()
