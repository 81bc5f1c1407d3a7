"""Aborting many queued requests is linear: a client that hangs up on a huge fan-out must not
block the engine (before, each abort scanned the waiting queue: 40,000 took ~17 s)."""

from __future__ import annotations

import time

from girandole import SamplingParams
from girandole.engine.engine import EngineConfig, LLMEngine


def test_aborting_tens_of_thousands_of_waiting_requests_is_fast(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), mode="reference", device="cpu"))
    n = 40_000
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"r{i}", [1, 2, 3], params)
    engine.step()  # some run, the rest wait
    assert engine.stats()["num_waiting"] > n - 100
    start = time.perf_counter()
    aborted = [engine.abort(f"r{i}") for i in reversed(range(n))]
    elapsed = time.perf_counter() - start
    assert all(out is not None and out.finish_reason == "abort" for out in aborted)
    assert not engine.has_unfinished_requests()
    assert engine.stats()["num_waiting"] == 0 and engine.stats()["num_running"] == 0
    # linear: ~0.2 s here; the quadratic scan took ~17 s. A bound that only a scan can break.
    assert elapsed < 4.0, elapsed


def test_requests_behind_aborted_ones_still_run(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), mode="reference", device="cpu"))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for i in range(300):
        engine.add_request(f"a{i}", [1, 2, 3], params)
    engine.add_request("keep", [1, 4, 5], params)
    for i in range(300):
        engine.abort(f"a{i}")
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "keep":
                tokens += out.new_token_ids
                finish = out.finish_reason
    assert len(tokens) == 3 and finish == "length"
