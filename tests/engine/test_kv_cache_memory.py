"""A CPU KV cache larger than the machine is refused at start, naming the setting: its pages
are mapped lazily, so it failed in the allocator with a message about alloc_cpu.cpp (or, below
what the allocator refuses, started and was killed for memory once it filled)."""

from __future__ import annotations

import os

import pytest

from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.engine.kv_groups import check_host_memory

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads /proc/meminfo")


def _total_gib() -> float:
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return kib / (1 << 20)


def test_a_kv_cache_larger_than_the_machine_is_refused_naming_the_setting(tiny_llama_dir):
    too_big = 2 * _total_gib() + 1
    config = EngineConfig(
        model=str(tiny_llama_dir), mode="reference", device="cpu", kv_cache_gb=too_big
    )
    with pytest.raises(ValueError, match=r"GiB \(--kv-cache-gb\), more than this machine's"):
        LLMEngine(config)


def test_a_cache_that_fits_passes_and_a_gpu_is_not_checked():
    check_host_memory(1 << 20, "cpu")
    check_host_memory(1 << 60, "meta")  # not host memory: a device allocates and says so
    with pytest.raises(ValueError, match="lower --kv-cache-gb"):
        check_host_memory(1 << 60, "cpu")


def _resident_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def test_a_cpu_cache_costs_memory_as_it_is_used_not_at_start(tiny_llama_dir):
    from girandole import LLM
    from girandole.sampling.params import SamplingParams

    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    small = LLM(model=str(tiny_llama_dir), mode="fast", device="cpu", kv_cache_gb=0.02)
    expected = small.generate("the cache", greedy)[0].token_ids
    del small

    before = _resident_mib()
    llm = LLM(model=str(tiny_llama_dir), mode="fast", device="cpu", kv_cache_gb=1.0)
    # torch.zeros wrote every page: the whole GiB was resident before any request
    assert _resident_mib() - before < 256
    # the untouched pages read as zeros: the same tokens as with a small cache
    assert llm.generate("the cache", greedy)[0].token_ids == expected
    layer_caches = [
        t
        for g in llm.engine.runner.kv_groups
        for layer in g.layers
        for t in (layer.k_cache, layer.v_cache)
    ]
    assert any(bool(t.abs().sum() > 0) for t in layer_caches)  # written through the mapping
    assert _resident_mib() - before < 256
