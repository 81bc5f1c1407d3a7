"""The engine's thread count on a CPU (girandole/engine/cpu_threads.py): fewer threads while
other processes hold a core, all of them again once they leave it; a fixed count never moves.
The tokens do not depend on the count (tests/engine/test_cpu_graphs.py checks the default
model's kernels at 1 and 2 threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.engine import cpu_threads
from girandole.engine.cpu_threads import INTERVAL_S, threads_for
from girandole.env_switches import threads_setting

PARAMS = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
# They measure how busy the cores are: make test runs them alone, after the parallel part.
pytestmark = pytest.mark.serial

DEFAULT_THREADS = torch.get_num_threads()  # at collection, before any test's engine


@pytest.fixture(autouse=True)
def _torch_default_threads():
    """Each test starts from torch's default count, as its skip condition (read at collection)
    assumes: an engine of an earlier test that was never closed keeps the count it lowered to
    while the machine was busy (a full-suite run beside other work: 1 thread, and these tests'
    engines then had one thread to adapt, `adaptive` False)."""
    cpu_threads._ours = None
    torch.set_num_threads(DEFAULT_THREADS)


def test_threads_setting_reads_a_count_or_auto():
    assert threads_setting(None) is None and threads_setting(" Auto ") is None
    assert threads_setting("") is None and threads_setting("3") == 3 and threads_setting(2) == 2
    with pytest.raises(ValueError, match="threads must be a whole number >= 1 or auto, not 0"):
        threads_setting(0)  # LLM(threads=0): named, not torch's own error
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(
            ValueError, match="GIRANDOLE_THREADS must be a whole number >= 1 or auto"
        ):
            threads_setting(bad)


def test_threads_follow_the_cores_others_leave():
    assert threads_for(2.0, 2) == 2 and threads_for(1.5, 2) == 2  # half a core taken: kept
    assert threads_for(1.4, 2) == 1 and threads_for(1.0, 2) == 1  # a busy loop beside it: one
    assert threads_for(0.0, 2) == 1 and threads_for(-3.0, 8) == 1
    assert threads_for(14.9, 8) == 8 and threads_for(6.4, 8) == 6


def _run_until(llm: LLM, done, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not done() and time.monotonic() < deadline:
        llm.generate([[2, 9, 27, 81]], PARAMS)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or torch.get_num_threads() < 2,
                    reason="needs 2 cores")  # fmt: skip
def test_a_busy_neighbour_takes_a_thread_away_and_its_end_gives_it_back(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), mode="fast", device="cpu", kv_cache_gb=0.02)
    threads = llm.engine.cpu_threads
    most = threads.most
    assert threads.adaptive and threads.threads == most == torch.get_num_threads()
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(threads.cores)
    ]  # a busy loop per core: others take at least one core whatever the scheduler shares
    try:
        _run_until(llm, lambda: threads.threads < most, 30)
        assert threads.threads < most and torch.get_num_threads() == threads.threads, threads.others
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    _run_until(llm, lambda: threads.threads == most, 30)
    if threads.threads < most and threads_for(threads.cores - threads.others, most) < most:
        # what gives the thread back is the machine's being quiet: others' work is not ours
        pytest.skip(f"other processes keep {threads.others:.2f} cores busy here")
    assert threads.threads == most == torch.get_num_threads(), threads.others
    assert llm.engine.stats()["num_thread_changes"] >= 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or torch.get_num_threads() < 2,
                    reason="needs 2 cores")  # fmt: skip
def test_what_others_did_while_the_engine_idled_takes_no_thread(tiny_llama_dir):
    """Before: the first window of new work reached back over the idle time before it, so a
    busy minute elsewhere that had ended took a thread from the next request (measured in
    bench_contention: 52-74 tok/s on a quiet machine against 84-93 at a fixed 2 threads)."""
    llm = LLM(model=str(tiny_llama_dir), mode="fast", device="cpu", kv_cache_gb=0.02)
    threads = llm.engine.cpu_threads
    llm.generate([[2, 9, 27, 81]], PARAMS)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    time.sleep(2)  # idle (under the 5 s after which a window was never judged) beside them
    for hog in hogs:
        hog.kill()
        hog.wait()
    before = threads.num_changes
    deadline = time.monotonic() + 1.2  # the windows a request of ~1 s opens
    while time.monotonic() < deadline:
        llm.generate([[2, 9, 27, 81]], PARAMS)
    moved = threads.num_changes != before or threads.threads != threads.most
    if moved and threads.others > 0.5:  # a thread taken now, or in the first request's windows
        pytest.skip(f"other processes keep {threads.others:.2f} cores busy here")
    assert threads.num_changes == before and threads.threads == threads.most, threads.others


def test_a_fixed_count_is_kept_and_a_later_engine_gets_the_full_count(tiny_llama_dir):
    def llm(**kwargs) -> LLM:
        return LLM(model=str(tiny_llama_dir), mode="fast", device="cpu", kv_cache_gb=0.02, **kwargs)

    most = llm().engine.cpu_threads.most  # torch's default, whatever earlier engines left
    fixed = llm(threads=1)
    assert not fixed.engine.cpu_threads.adaptive and torch.get_num_threads() == 1
    fixed.generate([[2, 9, 27, 81]], PARAMS)
    assert fixed.engine.stats()["threads"] == 1
    later = llm()
    assert later.engine.cpu_threads.most == most == later.engine.cpu_threads.threads
    assert torch.get_num_threads() == most


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread: nothing to adapt")
def test_an_engine_whose_numbers_follow_the_count_keeps_it(tiny_llama_dir):
    """MKL's float32 GEMM rounds a row by how the threads split a call's rows (rows of 5-7 and
    9-11-row calls, 1 thread against 2, on AMD Zen 4), so reference mode's numbers depend on the
    count: a CI run under load gave test_logprobs_are_batch_independent's request other
    logprobs (last bits) when its engine had dropped a thread. Such an engine keeps its count;
    the fast one, on the native kernels, still follows the machine."""
    from girandole.engine.cpu_threads import thread_invariant
    from girandole.model import kernels

    def llm(mode: str) -> LLM:
        return LLM(model=str(tiny_llama_dir), mode=mode, device="cpu", kv_cache_gb=0.02)

    ref = llm("reference")
    assert not thread_invariant(ref.engine.model) and not ref.engine.cpu_threads.adaptive
    threads = ref.engine.cpu_threads
    threads._window = [INTERVAL_S, 2.0 * INTERVAL_S * threads.cores, 0.0]  # a fully busy window
    threads._last = threads._sample()
    threads.update()
    assert threads.threads == threads.most == DEFAULT_THREADS and threads.num_changes == 0
    fast = llm("fast")
    assert thread_invariant(fast.engine.model) == kernels.available()
    assert fast.engine.cpu_threads.adaptive == kernels.available()
    # another engine of the thread that dropped a thread does not drop the held engine's
    fast.engine.cpu_threads._set(1)
    ref.generate([[2, 9, 27, 81]], SamplingParams(max_tokens=2))
    assert torch.get_num_threads() == DEFAULT_THREADS


def test_attention_that_runs_torch_says_its_numbers_follow_the_count():
    """Soft-capped scores (Gemma 2's) or a head size the native kernel does not take run torch's
    SDPA or matmuls: such a model's engine keeps its count too."""
    from girandole.engine.cpu_threads import thread_invariant
    from girandole.model import kernels
    from girandole.model.attention import Attention

    native = Attention(4, 2, 64, 0.125)
    assert native.thread_invariant == kernels.available()
    for torch_path in (Attention(4, 2, 64, 0.125, logit_softcap=50.0), Attention(4, 2, 24, 0.2)):
        assert not torch_path.thread_invariant
        assert not thread_invariant(torch.nn.ModuleList([native, torch_path]))


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread: nothing to give back")
def test_a_stopped_engine_gives_the_process_its_count_back(tiny_llama_dir):
    """Before: the process kept the count an AsyncEngine last set (threads started after it,
    e.g. asyncio.to_thread's, ran on one thread after a busy minute had lowered it)."""
    from concurrent.futures import ThreadPoolExecutor

    from girandole.engine.async_engine import AsyncEngine, EngineConfig

    most = torch.get_num_threads()
    config = EngineConfig(model=str(tiny_llama_dir), device="cpu", kv_cache_gb=0.02, threads=1)
    engine = AsyncEngine(config)
    try:
        with ThreadPoolExecutor(1) as pool:  # a thread started while the engine runs on one
            assert pool.submit(torch.get_num_threads).result() == 1
    finally:
        engine.shutdown()
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(torch.get_num_threads).result() == most


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread: nothing to share")
def test_engines_of_one_process_share_the_cores_while_both_step():
    """Before: two engines of one process (a server's deployments) each counted the other's
    threads as its own work, so both kept every core's thread: 4 threads on 2 cores."""
    from girandole.engine.cpu_threads import STEPPING_STALE_S, CpuThreads, _stepping

    most = torch.get_num_threads()
    a, b = CpuThreads(None, cores=most), CpuThreads(None, cores=most)
    try:
        assert a.adaptive and b.adaptive and a.threads == b.threads == most
        deadline = time.monotonic() + 1.2  # two windows of stepping, side by side
        while time.monotonic() < deadline:
            a.update()
            b.update()
            time.sleep(0.01)
        half = threads_for(most / 2, most)
        assert a.sharing == b.sharing == 2 and a.threads <= half and b.threads <= half
        b.idle()  # b's work ended
        assert _stepping() == 1
        b.update()  # b steps again, then is dropped mid-request: it never says it is idle
        assert _stepping() == 2
        b.stepped_at -= STEPPING_STALE_S
        # a has the cores again, unless other processes hold them
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline and a.threads < most:
            a.update()
            time.sleep(0.01)
        if a.threads < most and threads_for(a.cores - a.others, most) < most:
            pytest.skip(f"other processes keep {a.others:.2f} cores busy here")
        assert a.sharing == 1 and a.threads == most, a.others
    finally:
        b.close()
        a.close()
    assert torch.get_num_threads() == most
