"""Torch work off the engine thread, on a thread that ends with it.

libgomp (the OpenMP runtime torch and the native kernels share) gives every thread that starts a
parallel region a team of worker threads, kept until that thread ends. While more OpenMP threads
exist than CPUs, libgomp stops spinning between parallel regions, and each of a decode step's
hundreds of kernels then waits on a futex wake: measured, one LoRA adapter read on a pool thread
(asyncio.to_thread) made every later decode step 1.7x slower. So work that may run torch ops
outside the engine thread runs here: its team ends when the call returns.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def run_in_passing_thread(fn: Callable[..., T], *args: Any, name: str = "girandole-io") -> T:
    """`fn(*args)` on a new thread that exits when it returns (or raises)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future
