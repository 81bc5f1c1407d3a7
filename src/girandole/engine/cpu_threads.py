"""CpuThreads: the engine's thread count on a CPU, following the cores other processes leave it.

A decode step is hundreds of OpenMP parallel regions (torch's and the native kernels'), and each
region ends only when every thread of its team has done its share. While other processes hold a
core, the scheduler runs the team's threads by turns, so every region waits for a descheduled
thread's next time slice: measured on 2 cores with other work beside the server (load ~5), 32
greedy tokens took 1-26 s on 2 threads and 1.3-1.5 s on one. So, unless a count is fixed
(`--threads N`, GIRANDOLE_THREADS), the engine measures every half second of stepping how much CPU
the rest of the machine used (/proc/stat, less this process) and runs on the cores that leaves:
fewer threads as soon as other work takes a core, more again after a second without it.

A request's tokens do not depend on this: every native kernel computes each output element on
one thread, in a fixed order (no split reductions), so any thread count gives the same numbers; and
recorded decode graphs are kept per thread count (engine/cpu_graphs.py). torch's float matmuls
make no such promise: MKL's float32 GEMM splits a call's rows among the threads and rounds a row
by its split (rows of calls of 5-7 and 9-11 rows, 1 thread against 2, on this project's hosts).
An engine whose model runs one (reference mode's float32 linears; GIRANDOLE_NATIVE_KERNELS=0;
bf16 tensors a checkpoint keeps; attention with soft-capped scores, on torch's SDPA or matmuls)
therefore keeps its count (`hold`, `thread_invariant`): before,
a reference-mode request's logprobs changed in the last bits with the machine's load.

Several engines in one process (a server's deployments, several models) each run their own
team, and /proc/stat cannot tell their work apart: to each, the others' threads are its own. So
the cores that other processes leave are shared equally among the process's engines that are
stepping (`_stepping`): two busy engines on 2 cores run a thread each, not two each on one
core's worth of time slices.
"""

from __future__ import annotations

import logging
import os
import time
import weakref

import torch

logger = logging.getLogger(__name__)

INTERVAL_S = 0.5  # how often, while the engine steps, the machine is looked at
UP_WINDOWS = 2  # windows in a row that must leave a core free before a thread is added
# A thread per core others leave at least half free (bench_contention.py, 2 cores: beside a
# process busy half the time 2 threads still gave 42 tok/s to one's 31; beside one busy all the
# time, which 2 threads see using ~0.7 of a core, 13 to one's 32)
FREE_MARGIN = 0.5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_invariant(model: torch.nn.Module) -> bool:
    """Whether the model's numbers are the same at any thread count: none of its modules says
    otherwise (a module whose `thread_invariant` is False runs one of torch's matmuls, as does an
    nn.Linear: a vision tower's)."""
    return all(
        getattr(m, "thread_invariant", True) and not isinstance(m, torch.nn.Linear)
        for m in model.modules()
    )


def threads_for(free_cores: float, most: int) -> int:
    """The team size for `free_cores` cores left by other work, from 1 to `most`."""
    return max(1, min(most, int(free_cores + FREE_MARGIN)))


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (steal included: a hypervisor that takes a
    core stalls a team as another process does), or None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    ticks = [int(x) for x in fields[1:9]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
    return busy / _CLOCK_TICKS


# torch's thread count is the process's: (the count an engine set, the count it stood in for),
# so that an engine started later (tests start many in one process) still knows the full count
_ours: tuple[int, int] | None = None


def _most_threads() -> int:
    """torch's count before any engine changed it: its default (the physical cores) or what
    the process set itself (a Ray replica: its CPUs)."""
    now = torch.get_num_threads()
    return _ours[1] if _ours is not None and now == _ours[0] else now


def _set_threads(threads: int, most: int) -> None:
    global _ours
    torch.set_num_threads(threads)
    _ours = (threads, most)


# The process's engines; each notes when it last began a step while it has work
_engines: weakref.WeakSet[CpuThreads] = weakref.WeakSet()
# An engine whose last step began longer ago than this is not counted: one that died or was
# dropped mid-request never marks itself idle (steps are ~0.01-3 s: a long prefill chunk)
STEPPING_STALE_S = 5.0
_NEVER = float("-inf")


def _stepping() -> int:
    """How many of the process's engines are stepping now (at least the one that asks)."""
    now = time.monotonic()
    busy = sum(1 for e in list(_engines) if now - e.stepped_at < STEPPING_STALE_S)
    return max(1, busy)


class CpuThreads:
    """The torch thread count of an engine on the CPU. `update()` runs on the engine thread
    before each step; with `fixed` it never changes from that count."""

    def __init__(self, fixed: int | None, cores: int | None = None) -> None:
        self.most = self.before = _most_threads()
        if fixed is not None:
            _set_threads(fixed, self.most)
            self.most = fixed
        self.threads = self.most
        if torch.get_num_threads() != self.threads:  # an earlier engine's count
            _set_threads(self.threads, self.most)
        self.cores = cores or len(os.sched_getaffinity(0))
        self.adaptive = fixed is None and self.most > 1 and _machine_busy_seconds() is not None
        self.num_changes = 0
        self.others = 0.0  # cores the rest of the machine used in the last window
        self.sharing = 1  # the process's engines stepping at the last window's end
        # A window is INTERVAL_S of stepping: segments of work, the idle time between them left
        # out (what other processes did while the engine waited says little of now, and a
        # stream of short requests with pauses between them must still fill windows).
        self._last: tuple[float, float, float] | None = None  # the segment's start; None: idle
        self._window = [0.0, 0.0, 0.0]  # seconds, machine busy seconds, own CPU seconds
        self._more_windows = 0
        self.stepped_at = _NEVER  # a step began (counted by the other engines)
        _engines.add(self)

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        return time.monotonic(), _machine_busy_seconds() or 0.0, time.process_time()

    def hold(self) -> None:
        """Keep the present count from now on: the model's numbers depend on it
        (`thread_invariant`)."""
        if self.adaptive:
            logger.info("CPU threads held at %d: the model runs torch's matmuls", self.threads)
        self.adaptive = False

    def idle(self) -> None:
        """The engine has no work left: the segment of work in progress joins the window and
        the next starts with the next work. Before, a window reached back over the idle time,
        and what other processes did then (measured: another engine's decode during a 1-3 s
        pause) took a thread from a request on a quiet machine."""
        self.stepped_at = _NEVER
        if self.adaptive and self._last is not None:
            self._add_segment(self._sample())
            self._last = None

    def update(self) -> None:
        self.stepped_at = time.monotonic()
        if torch.get_num_threads() != self.threads:  # set since by another engine (one thread)
            _set_threads(self.threads, self.most)
        if not self.adaptive:
            return
        if self._last is None:  # work again: a segment starts
            self._last = self._sample()
            return
        if self._window[0] + time.monotonic() - self._last[0] < INTERVAL_S:
            return
        sample = self._sample()
        if sample[0] - self._last[0] > 10 * INTERVAL_S:  # one step that long says little
            self._window = [0.0, 0.0, 0.0]
            self._last = sample
            return
        self._add_segment(sample)
        self._last = sample
        elapsed, machine, own = self._window
        self._window = [0.0, 0.0, 0.0]
        self.others = max(0.0, (machine - own) / elapsed)
        self.sharing = _stepping()
        wanted = threads_for((self.cores - self.others) / self.sharing, self.most)
        if wanted < self.threads:
            self._set(wanted)
        elif wanted > self.threads:
            self._more_windows += 1
            if self._more_windows >= UP_WINDOWS:
                self._set(wanted)
        else:
            self._more_windows = 0

    def _add_segment(self, sample: tuple[float, float, float]) -> None:
        last = self._last
        assert last is not None
        for i in range(3):
            self._window[i] += sample[i] - last[i]

    def close(self) -> None:
        """The engine stops: torch's count back to what it was before the engine, if the count
        last set in the process is still this engine's. Before, the process kept the engine's
        last count (threads started later took it: one thread, after a busy minute)."""
        global _ours
        self.stepped_at = _NEVER
        _engines.discard(self)
        if _ours is not None and _ours[0] == self.threads and self.threads != self.before:
            torch.set_num_threads(self.before)
            _ours = None

    def stats(self) -> dict[str, float]:
        return {"threads": self.threads, "num_thread_changes": self.num_changes}

    def _set(self, threads: int) -> None:
        logger.debug(
            "threads %d -> %d (other processes used %.2f of %d cores, shared by %d engines)",
            self.threads, threads, self.others, self.cores, self.sharing,
        )  # fmt: skip
        _set_threads(threads, self.most)
        self.threads = threads
        self.num_changes += 1
        self._more_windows = 0
