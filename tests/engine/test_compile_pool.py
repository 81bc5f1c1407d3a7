"""The grammar compile pool: a deadline on the compile's own CPU time answered at once (a 400),
a wait for the server's reasons answered as such (CompileBusy, a 503), jobs of callers that left
skipped, threads that never keep the process alive; cached grammars looked up without
queueing."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from girandole.sampling.compile_pool import CompileBusy, CompilePool, CompileTimeout
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

    def slow():  # a compile that works (CPU) until told to stop
        deadline = time.monotonic() + 5
        while not release.is_set() and time.monotonic() < deadline:
            pass
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


def test_a_compile_starved_of_cpu_is_not_the_grammars_fault():
    """The deadline counts the compile's own CPU time: on a loaded host an ordinary compile (the
    first json_object, ~1 s) took more than 10 s of wall time and its client got a 400 telling
    it to simplify a fine grammar. A compile that runs long in wall time only (here: it waits)
    finishes; one still waiting past `wait_limit`, in the queue or starved, is CompileBusy (the
    server's state: a 503), not a CompileTimeout (a GrammarError: a 400)."""
    pool = CompilePool(num_threads=1, timeout=0.3, wait_limit=3)

    async def main():
        assert await pool.run(lambda: time.sleep(1.0) or "done") == "done"
        release = threading.Event()
        blocker = asyncio.create_task(pool.run(lambda: release.wait(10)))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(CompileBusy, match="busy compiling grammars"):
            await pool.run(lambda: "queued behind it")  # waits in the queue past wait_limit
        assert 2.5 < time.monotonic() - start < 6
        with pytest.raises(CompileBusy):  # its own wait, starved (asleep) past the limit
            await blocker
        release.set()
        assert not issubclass(CompileBusy, GrammarError)

    asyncio.run(main())
    assert pool.num_busy == 2 and pool.num_timed_out == 0
    pool.close()


def test_a_cached_grammar_is_found_without_compiling_or_waiting():
    """GrammarCache.cached: a hit without a compile thread (the engines' compile_grammar looks
    there first, so a grammar compiled before is not queued behind another's long compile); no
    hit before its compile, and none while another thread holds the cache's lock."""
    from girandole.sampling.grammar import GrammarCache, GrammarSpec
    from girandole.tokenizer.loader import load_tokenizer

    tokenizer = load_tokenizer()
    cache = GrammarCache(tokenizer, tokenizer.vocab_size)
    spec = GrammarSpec("regex", "[ab]{3}")
    assert cache.cached(spec) is None
    compiled = cache.compile(spec)
    assert cache.cached(spec) is compiled
    with cache._lock:
        assert cache.cached(spec) is None  # never blocks the event loop


def test_an_engines_grammar_waits_behind_another_compile_as_a_503_and_a_cached_one_does_not(
    tiny_llama_dir,
):
    """On a real AsyncEngine: while its compile thread is held by another grammar, a grammar
    compiled before comes from the cache at once, and a new one that waits past the limit is
    a 503 naming the wait (request_grammar), not a 400 blaming the grammar."""
    from girandole.api.http.errors import APIError
    from girandole.api.http.schema import ResponseFormat
    from girandole.api.serving.structured import request_grammar
    from girandole.engine.async_engine import AsyncEngine, EngineConfig
    from girandole.sampling.grammar import GrammarSpec

    engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), kv_cache_gb=0.01))
    engine.grammar_pool = CompilePool(num_threads=1, timeout=5, wait_limit=1)
    known = ResponseFormat.model_validate({"type": "grammar", "grammar": 'root ::= "ab"'})
    fresh = ResponseFormat.model_validate({"type": "grammar", "grammar": 'root ::= "cd"'})

    async def main():
        await request_grammar(engine, known)  # compiled: cached
        release = threading.Event()
        blocker = asyncio.create_task(engine.grammar_pool.run(lambda: release.wait(10)))
        await asyncio.sleep(0.05)
        assert await request_grammar(engine, known) == GrammarSpec("gbnf", 'root ::= "ab"')
        with pytest.raises(APIError) as caught:
            await request_grammar(engine, fresh)
        release.set()
        with pytest.raises(CompileBusy):
            await blocker
        return caught.value

    try:
        error = asyncio.run(main())
    finally:
        engine.shutdown()
    assert error.status_code == 503 and "busy compiling grammars" in error.message
