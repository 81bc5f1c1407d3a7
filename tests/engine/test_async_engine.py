"""The asyncio interface: concurrent streams, aborts that free KV blocks, errors per request."""

from __future__ import annotations

import asyncio

import pytest

from girandole import SamplingParams
from girandole.engine.async_engine import AsyncEngine, EngineConfig


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = AsyncEngine(
        EngineConfig(
            model=str(tiny_llama_dir),
            mode="reference",
            device="cpu",
            block_size=4,
            kv_cache_gb=0.01,
        )
    )
    yield eng
    eng.shutdown()


def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, rid: str):
    async def run():
        outs = []
        async for out in engine.generate(prompt, params, rid):
            outs.append(out)
        return outs

    return run()


def test_concurrent_streams_and_abort(engine):
    prompt = engine.tokenizer.encode("Once upon a time")

    async def main():
        full = asyncio.create_task(
            collect(
                engine,
                prompt,
                SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                "full",
            )
        )
        seen = 0
        async for out in engine.generate(
            prompt, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), "dropped"
        ):
            seen += len(out.new_token_ids)
            if seen >= 3:
                break  # a client that goes away: closing the stream aborts the request
        outs = await full
        for _ in range(100):
            if engine.stats()["kv_blocks_used"] == 0 and not engine.engine.seqs:
                break
            await asyncio.sleep(0.05)
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in outs) == 20
    assert outs[-1].num_output_tokens == 20
    assert engine.stats()["kv_blocks_used"] == 0
    assert "dropped" not in engine.engine.seqs


def test_bad_request_raises_before_streaming(engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate([], SamplingParams(), "empty"):
                pass
        # Others are unaffected.
        return await collect(
            engine,
            engine.tokenizer.encode("Hi"),
            SamplingParams(temperature=0, max_tokens=3),
            "after",
        )

    outs = asyncio.run(main())
    assert outs[-1].finished


def test_explicit_abort(engine):
    prompt = engine.tokenizer.encode("Once upon a time")

    async def main():
        outs = []
        async for out in engine.generate(
            prompt, SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True), "victim"
        ):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("victim")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"


def test_a_stuck_loop_fails_the_health_checks_and_recovers(engine):
    """A step that does not end (a stuck kernel, a deadlock) is what /health reports as stalled
    and what fails a Ray replica's health check, so Ray Serve replaces the replica; before, the
    replica's check failed only when its loop had died."""
    import threading

    from girandole.deploy.ray_replica import GirandoleReplica
    from girandole.engine.protocol import stall_error

    release = threading.Event()
    real_step = engine.engine.step

    def stuck_step():  # fault injection: the loop's next step blocks until released
        release.wait(30)
        return real_step()

    replica = object.__new__(GirandoleReplica)  # its check alone, on this engine
    replica.engine, replica.stall_s = engine, 0.3
    engine.engine.step = stuck_step
    try:

        async def run():
            params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
            task = asyncio.ensure_future(collect(engine, [1, 2, 3], params, "stuck"))
            await asyncio.sleep(0.8)
            error = stall_error(engine, 0.3)
            assert error is not None and "has not finished a step for" in error
            assert stall_error(engine, 30.0) is None
            with pytest.raises(RuntimeError, match="has not finished a step"):
                replica.check_health()
            release.set()
            outs = await task
            assert outs[-1].finished
            replica.check_health()  # moving again: healthy

        asyncio.run(run())
    finally:
        release.set()
        del engine.engine.step
