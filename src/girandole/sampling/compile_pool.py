"""Grammar compilation off the event loop, in threads of its own, with a deadline.

Compiling a grammar is native code that cannot be interrupted. So the pool:
- runs compiles on its own daemon threads, never in the default executor that also tokenizes
  prompts, and never keeping the process alive after SIGTERM;
- skips a job whose caller has gone (client hung up, deadline passed) before it started;
- answers a caller whose compile runs past `timeout` with CompileTimeout at once; the thread
  finishes in the background and its result is dropped (the size limits keep that bounded).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

from girandole.sampling.grammar import GrammarError


class CompileTimeout(GrammarError):
    """Compiling took longer than the server allows."""


class _Job:
    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()


class CompilePool:
    def __init__(self, num_threads: int = 1, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.num_timed_out = 0
        self.num_skipped = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"girandole-grammar-{i}", daemon=True)
            for i in range(max(1, num_threads))
        ]
        for t in self._threads:
            t.start()

    async def run(self, fn: Callable[[], Any], what: str = "grammar") -> Any:
        """fn() on a pool thread; CompileTimeout past the deadline; cancellation skips it."""
        job = _Job(fn, asyncio.get_running_loop())
        self._jobs.put(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except TimeoutError:
            self.num_timed_out += 1
            raise CompileTimeout(
                f"compiling the {what} took longer than {self.timeout:g} s, the most this server"
                " allows: simplify it"
            ) from None
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
            try:
                result, error = job.fn(), None
            except BaseException as exc:  # noqa: BLE001  handed to the caller
                result, error = None, exc
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
