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
