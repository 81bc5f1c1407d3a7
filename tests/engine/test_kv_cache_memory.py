"""A CPU KV cache larger than the machine is refused at start, naming the setting: its pages
are mapped lazily, so it failed in the allocator with a message about alloc_cpu.cpp (or, below
what the allocator refuses, started and was killed for memory once it filled)."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.engine.kv_groups import cache_zeros, check_host_memory
from girandole.model.loader import page_cache
from girandole.model.loader.page_cache import HUGE_PAGE

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
    if page_cache.thp_mode() in ("always", "madvise"):  # in 2 MiB pages, still grown as used
        assert all(t.data_ptr() % HUGE_PAGE == 0 for t in layer_caches)
        assert all(_mapping_fields(t.data_ptr())["THPeligible"] == "1" for t in layer_caches)


def _mapping_fields(address: int) -> dict[str, str]:
    """smaps' fields of the mapping that holds `address`."""
    held = [fields for lo, hi, _, fields in page_cache.smaps() if lo <= address < hi]
    assert held, f"no mapping holds {address:#x}"
    return held[0]


@pytest.mark.skipif(
    not hasattr(mmap, "MADV_HUGEPAGE") or page_cache.thp_mode() not in ("always", "madvise"),
    reason="Linux transparent huge pages off",
)
def test_a_cpu_cache_is_mapped_for_2_mib_pages():
    """A decode step reads each sequence's pages of every layer, scattered through the pool; in
    4 KiB pages the TLB and the prefetchers stopped at every page (decode attention from memory
    1.07-1.36x slower, benchmarks/bench_decode_attention.py). The cache starts at a 2 MiB
    boundary in a mapping advised MADV_HUGEPAGE, its zeros still given lazily."""
    shape = (4096, 8, 128)  # 8 MiB of float16
    cache = cache_zeros(shape, torch.float16, "cpu")
    assert cache.data_ptr() % HUGE_PAGE == 0
    assert _mapping_fields(cache.data_ptr())["THPeligible"] == "1"
    assert not bool(cache.any())
    cache[4095].fill_(1.5)  # the last slot is in the mapping, and writable
    assert float(cache.float().sum()) == 1.5 * 8 * 128
    small_pages = cache_zeros(shape, torch.float16, "cpu", huge_pages=False)
    if page_cache.thp_mode() == "madvise":  # "always" makes every large mapping eligible
        assert _mapping_fields(small_pages.data_ptr())["THPeligible"] == "0"
    tiny = cache_zeros((16, 1, 64), torch.float32, "cpu")  # under 2 MiB: no padding
    assert tiny.untyped_storage().nbytes() == 16 * 64 * 4


def test_a_kernel_that_refuses_the_advice_still_gives_a_cache(monkeypatch):
    """A kernel built without transparent huge pages answers madvise(MADV_HUGEPAGE) with EINVAL
    (here: an advice no kernel knows): the cache is made all the same, in 4 KiB pages."""
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 0x7FFF, raising=False)
    cache = cache_zeros((4096, 8, 128), torch.float16, "cpu")
    cache[-1].fill_(2.0)
    assert float(cache.float().sum()) == 2.0 * 8 * 128


def test_kv_huge_pages_switch(monkeypatch):
    """GIRANDOLE_KV_HUGE_PAGES=off: the cache in 4 KiB pages (a comparison, or a host where
    2 MiB faults stall); a word that is no switch is refused, naming the variable."""
    monkeypatch.setenv("GIRANDOLE_KV_HUGE_PAGES", "off")
    cache = cache_zeros((4096, 8, 128), torch.float16, "cpu")
    assert cache.untyped_storage().nbytes() == 4096 * 8 * 128 * 2  # no padding to align
    if page_cache.thp_mode() == "madvise":
        assert _mapping_fields(cache.data_ptr())["THPeligible"] == "0"
    monkeypatch.setenv("GIRANDOLE_KV_HUGE_PAGES", "maybe")
    with pytest.raises(ValueError, match="GIRANDOLE_KV_HUGE_PAGES must be one of"):
        cache_zeros((4096, 8, 128), torch.float16, "cpu")
