"""Adapters in the engine: a step mixes base rows and rows of several adapters and each request
gets what it gets alone; --max-loras resident with LRU eviction; the prefix cache never shares
blocks across adapters; loading and unloading while requests run loses none."""

from __future__ import annotations

import asyncio
import time

import pytest

from girandole.engine.async_engine import AsyncEngine
from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.sampling.params import SamplingParams

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return",
    "It kept its keys and values in pages",
]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)


def make_engine(path, adapters: dict, **kw) -> LLMEngine:
    kw = {"mode": "reference", "device": "cpu", "block_size": 4, "kv_cache_gb": 0.01, **kw}
    engine = LLMEngine(EngineConfig(model=str(path), **kw))
    for name, folder in adapters.items():
        engine.loras.register(engine.loras.read(name, folder))
    return engine


def run(engine: LLMEngine, requests: list[tuple[str, str | None]], params=GREEDY) -> dict:
    """Run (prompt, adapter) requests together; returns request id -> (tokens, logprobs)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, (prompt, adapter) in enumerate(requests):
        engine.add_request(f"r{i}", engine.tokenizer.encode(prompt), params, adapter=adapter)
        out[f"r{i}"] = ([], [])
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(r.logprob for r in o.logprobs or [])
    return out


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, llama_adapters):
    return make_engine(tiny_llama_dir, llama_adapters)


def test_mixed_batch_equals_each_request_alone(engine):
    requests = [(p, a) for p in PROMPTS[:2] for a in (None, "a1", "a2", "a3", "a4")]
    mixed = run(engine, requests)
    outputs = set()
    for i, req in enumerate(requests):
        engine.kv_cache.reset_prefix_cache()
        alone = run(engine, [req])["r0"]
        tokens, logprobs = mixed[f"r{i}"]
        assert tokens == alone[0], req
        assert logprobs == pytest.approx(alone[1], abs=1e-4), req
        outputs.add(tuple(tokens))
    # The adapters matter: a prompt's five continuations are not all the same.
    assert len(outputs) > 2


def test_unknown_adapter_is_refused(engine):
    from girandole.api.serving.response import engine_error
    from girandole.engine.protocol import AdapterNotLoadedError

    with pytest.raises(AdapterNotLoadedError, match="'nope' is not loaded") as info:
        engine.add_request("x", [1, 2, 3], GREEDY, adapter="nope")
    # the API's 404 for a model it does not serve (an adapter unloaded while a request that
    # named it was on its way), not a 400 blaming the request
    error = engine_error(info.value)
    assert error.status_code == 404 and error.body()["error"]["code"] == "NOT_FOUND"


def test_prefix_cache_is_not_shared_across_adapters(engine):
    engine.kv_cache.reset_prefix_cache()
    prompt = engine.tokenizer.encode(PROMPTS[3] + " " + PROMPTS[1])
    params = SamplingParams(temperature=0, max_tokens=1)

    def cached(adapter: str | None) -> int:
        engine.add_request("p", prompt, params, adapter=adapter)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    hits = o.num_cached_tokens
        return hits

    assert cached(None) == 0
    assert cached("a1") == 0  # the base's blocks hold other keys and values
    assert cached("a1") > 0  # its own are reused
    assert cached("a2") == 0
    assert cached(None) > 0


def test_lru_eviction_keeps_max_loras_resident(tiny_llama_dir, llama_adapters):
    small = make_engine(tiny_llama_dir, llama_adapters, max_loras=2)
    reference = run(small, [(PROMPTS[0], a) for a in ("a1", "a2", "a3", "a4")])
    assert len(small.loras.resident) <= 2
    assert small.loras.num_loads >= 4
    # At most two adapters run at once: the others wait for a slot, and get the same tokens.
    requests = [(PROMPTS[0], a) for a in ("a1", "a2", "a3", "a4", None)] * 2
    together = run(small, requests)
    for i, (_, a) in enumerate(requests):
        if a is not None:
            expect = reference[f"r{'a1 a2 a3 a4'.split().index(a)}"][0]
            assert together[f"r{i}"][0] == expect


def test_load_and_unload_under_load_loses_no_request(tiny_llama_dir, llama_adapters):
    async def main() -> None:
        engine = AsyncEngine(
            EngineConfig(model=str(tiny_llama_dir), mode="reference", device="cpu", max_loras=2)
        )
        try:
            await engine.load_lora("a1", str(llama_adapters["a1"]))
            await engine.load_lora("a2", str(llama_adapters["a2"]))
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

            async def one(i: int, adapter: str | None) -> int:
                prompt = engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)])
                n = 0
                async for out in engine.generate(prompt, params, adapter=adapter):
                    n += len(out.new_token_ids)
                return n

            tasks = [asyncio.create_task(one(i, (None, "a1", "a2")[i % 3])) for i in range(12)]
            # every request accepted by the engine (a loaded machine is slow: up to 30 s; past
            # this loop, a1's unload below would refuse an a1 request not yet accepted)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stats = engine.stats()
                if stats["num_running"] + stats["num_waiting"] + sum(t.done() for t in tasks) >= 12:
                    break
                await asyncio.sleep(0.01)
            await engine.load_lora("a3", str(llama_adapters["a3"]))  # while they run
            tasks += [asyncio.create_task(one(i, "a3")) for i in range(4)]
            assert engine.unload_lora("a1")  # its accepted requests still finish
            assert engine.lora_names() == ["a2", "a3"]
            counts = await asyncio.gather(*tasks)
            assert counts == [24] * len(tasks)
            with pytest.raises(ValueError, match="not loaded"):
                async for _ in engine.generate([1, 2], params, adapter="a1"):
                    pass
            assert not engine.unload_lora("a1")
        finally:
            engine.shutdown()

    asyncio.run(main())
