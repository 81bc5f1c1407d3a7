"""Torch work of an AsyncEngine stays on threads whose OpenMP teams cannot outlive it: the model
loads on the engine thread, and LoRA adapters are read on a thread that ends with the read
(engine/passing_thread.py says why: a lingering team made decode steps 1.7x slower)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from girandole.engine import async_engine
from girandole.engine.async_engine import AsyncEngine, EngineConfig
from girandole.engine.passing_thread import run_in_passing_thread


def native_threads() -> set[int]:
    """This process's threads that Python does not know: OpenMP workers among them."""
    known = {t.native_id for t in threading.enumerate()}
    return {int(tid) for tid in os.listdir("/proc/self/task")} - known


def parallel_work() -> float:
    """A torch op large enough to run as an OpenMP parallel region (its thread's team)."""
    return float(torch.ones(1 << 22).mul_(2.0).sum())


def settled(before: set[int], timeout: float = 5.0) -> set[int]:
    """Native threads that appeared since `before` and are still there after `timeout` (threads
    of a team whose thread ended go away within it)."""
    deadline = time.monotonic() + timeout
    while True:
        new = native_threads() - before
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.05)


@pytest.fixture
def two_threads():
    """A team of two, whatever count an engine of an earlier test left (new threads take the
    count last set in the process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_pool_thread_keeps_its_team_a_passing_thread_does_not(two_threads):
    before = native_threads()
    with ThreadPoolExecutor(1) as pool:  # what asyncio.to_thread uses
        assert pool.submit(parallel_work).result() == 2.0 * (1 << 22)
        assert settled(before, timeout=0.5)  # the pool thread lives on, and its team with it
    settled(before)

    before = native_threads()
    assert asyncio.run(run_in_passing_thread(parallel_work)) == 2.0 * (1 << 22)
    assert not settled(before)


def test_passing_thread_raises_the_error():
    async def run():
        with pytest.raises(ZeroDivisionError):
            await run_in_passing_thread(lambda: 1 / 0)

    asyncio.run(run())


def test_the_model_loads_on_the_engine_thread_and_adapters_on_a_passing_thread(
    tiny_llama_dir, tmp_path, monkeypatch
):
    import transformers as tf

    import tests.lora.lora_helpers as helpers

    threads: dict[str, threading.Thread] = {}
    real_engine = async_engine.LLMEngine

    def engine_on(config):
        threads["load"] = threading.current_thread()
        return real_engine(config)

    monkeypatch.setattr(async_engine, "LLMEngine", engine_on)
    eng = AsyncEngine(
        EngineConfig(model=str(tiny_llama_dir), mode="reference", device="cpu", kv_cache_gb=0.01)
    )
    try:
        assert threads["load"] is eng._thread
        hf = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        helpers.write_peft_adapter(hf, tmp_path / "a")
        real_read = eng.engine.loras.read

        def read_on(*args):
            threads["read"] = threading.current_thread()
            return real_read(*args)

        monkeypatch.setattr(eng.engine.loras, "read", read_on)
        asyncio.run(eng.load_lora("a", str(tmp_path / "a")))
        assert eng.engine.loras.names() == ["a"]
        threads["read"].join(5)
        assert threads["read"] is not eng._thread and not threads["read"].is_alive()
    finally:
        eng.shutdown()


def test_a_model_that_fails_to_load_raises_from_the_constructor(tmp_path):
    def engine_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "girandole-engine"}

    before = engine_threads()
    with pytest.raises(Exception) as err:
        AsyncEngine(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))
    assert "missing" in str(err.value)
    deadline = time.monotonic() + 10  # its thread ends (a busy machine may take its time)
    while not engine_threads() <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_threads() <= before  # its thread ended


def test_two_engines_in_one_process_step_at_once(tiny_llama_dir):
    """The server's own model and its deployments are engines of one process, each stepping on
    its own thread. The forward context (model/context.py) was one global: one engine's step
    read the other's, wrote its keys and values into the other's cache slots (an assertion in
    the native paged attention, the requests aborted, then a segfault). Each thread has its own
    now: both engines' greedy outputs under concurrent load equal what each gives alone."""
    from girandole import SamplingParams

    def engine() -> AsyncEngine:
        return AsyncEngine(EngineConfig(model=str(tiny_llama_dir), mode="fast", device="cpu",
                                        block_size=4, kv_cache_gb=0.02))  # fmt: skip

    engines = [engine(), engine()]
    try:
        tok = engines[0].tokenizer
        prompts = [tok.encode(f"Story number {i} begins") for i in range(6)]
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

        async def generate(eng: AsyncEngine, prompt: list[int], rid: str) -> list[int]:
            ids: list[int] = []
            async for out in eng.generate(prompt, params, rid):
                ids += out.new_token_ids
            return ids

        async def alone() -> list[list[int]]:
            return [await generate(engines[0], p, f"solo-{i}") for i, p in enumerate(prompts)]

        async def together() -> list[list[list[int]]]:
            runs = [[generate(eng, p, f"e{e}-{r}-{i}") for i, p in enumerate(prompts)]
                    for e, eng in enumerate(engines) for r in range(3)]  # fmt: skip
            return await asyncio.gather(*(asyncio.gather(*run) for run in runs))

        expected = asyncio.run(alone())
        for outputs in asyncio.run(together()):
            assert outputs == expected
    finally:
        for eng in engines:
            eng.shutdown()
