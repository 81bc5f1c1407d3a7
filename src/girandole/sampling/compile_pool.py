"""Grammar compilation off the event loop, in threads of its own, with a deadline.

Compiling a grammar is native code that cannot be interrupted. So the pool:
- runs compiles on its own daemon threads, never in the default executor that also tokenizes
  prompts, and never keeping the process alive after SIGTERM;
- skips a job whose caller has gone (client hung up, deadline passed) before it started;
- answers a caller whose compile has used `timeout` seconds of its thread's CPU time with
  CompileTimeout at once (the grammar's fault: a 400); the thread finishes in the background
  and its result is dropped (the size limits keep that bounded). CPU time, not wall time: on a
  loaded host an ordinary compile (the first `json_object`, ~1 s) took more than 10 s of wall
  time and its request got a 400 that told the client to simplify a grammar that was fine;
- answers a caller still waiting after `wait_limit` seconds, in the queue or on a thread that
  the host starves, with CompileBusy (the server's state, not the grammar: a 503).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from girandole.sampling.grammar import GrammarError


class CompileTimeout(GrammarError):
    """Compiling took longer than the server allows."""


class CompileBusy(RuntimeError):
    """The compile did not finish in time for reasons of the server's (other compiles ahead of
    it, a loaded host), not of the grammar's."""


POLL_S = 0.1  # how often a waiting caller looks at its compile's CPU time


def _thread_clock() -> int | None:
    """The calling thread's CPU-time clock, for other threads to read; None where the platform
    has none (the deadline then counts the compile's wall time)."""
    try:
        return time.pthread_getcpuclockid(threading.get_ident())
    except (AttributeError, OSError):
        return None


class _Job:
    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.clock: int | None = None  # set by the thread that runs it
        self.started: float | None = None  # on `clock` (or the wall clock), once running
        self.used: float | None = None  # seconds of it, once finished

    def seconds_used(self) -> float:
        """CPU seconds (wall seconds without a thread clock) the compile has run so far."""
        if self.used is not None:
            return self.used
        if self.started is None:
            return 0.0
        now = time.clock_gettime(self.clock) if self.clock is not None else time.monotonic()
        return now - self.started


class CompilePool:
    def __init__(
        self, num_threads: int = 1, timeout: float = 10.0, wait_limit: float | None = None
    ) -> None:
        self.timeout = timeout
        # long enough for a compile of `timeout` CPU seconds on a host at a few times its cores
        self.wait_limit = wait_limit if wait_limit is not None else max(30.0, 3 * timeout)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.num_timed_out = 0
        self.num_busy = 0
        self.num_skipped = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"girandole-grammar-{i}", daemon=True)
            for i in range(max(1, num_threads))
        ]
        for t in self._threads:
            t.start()

    async def run(self, fn: Callable[[], Any], what: str = "grammar") -> Any:
        """fn() on a pool thread; CompileTimeout past the deadline; cancellation skips it."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop)
        self._jobs.put(job)
        give_up = loop.time() + self.wait_limit
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(job.future), POLL_S)
                except TimeoutError:
                    pass
                if job.seconds_used() >= self.timeout:
                    self.num_timed_out += 1
                    raise CompileTimeout(
                        f"compiling the {what} took longer than {self.timeout:g} s, the most"
                        " this server allows: simplify it"
                    )
                if loop.time() >= give_up:
                    self.num_busy += 1
                    raise CompileBusy(
                        f"the server is busy compiling grammars: the {what} waited"
                        f" {self.wait_limit:g} s; retry"
                    )
        finally:
            if not job.future.done():
                job.future.cancel()  # not started yet: skipped; running: its result is dropped

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.future.cancelled():
                self.num_skipped += 1
                continue
            job.clock = _thread_clock()
            read = (
                (lambda: time.clock_gettime(job.clock)) if job.clock is not None else time.monotonic
            )
            job.started = read()
            try:
                result, error = job.fn(), None
            except BaseException as exc:  # noqa: BLE001  handed to the caller
                result, error = None, exc
            job.used = read() - job.started
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # the caller's loop is closed
                pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
