"""Run one engine request per choice and merge their outputs into one stream of events.

`start()` waits until every choice has produced its first output (or failed), so a request
the engine rejects (`ValueError` before its first output) becomes a 400 before any response
bytes are sent. `close()` is synchronous so that it also works from a cancelled task: it
cancels the consumers (which closes the engine's generators) and aborts unfinished requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from girandole.api import tracking
from girandole.engine.outputs import RequestOutput
from girandole.sampling.params import SamplingParams

logger = logging.getLogger("girandole.api")

_DONE = object()


@dataclass
class ChoiceRequest:
    index: int  # the choice's index in the response: prompt_index * n + k
    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str
    # AsyncEngine.generate keyword arguments: cache_salt, prefix_cache_max_len
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


class ChoiceFanout:
    def __init__(
        self,
        engine: Any,
        choices: list[ChoiceRequest],
        on_abort: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_abort = on_abort  # told how many requests close() aborted
        self.choices = choices
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._first: list[asyncio.Future] = []
        self._unfinished: set[str] = set()
        self._closed = False

    async def start(self) -> None:
        """Start every choice; raise the first choice's error if any fails before its first output."""
        await tracking.before_engine(self.choices)  # prompt limit, admission queue (429/503)
        loop = asyncio.get_running_loop()
        for choice in self.choices:
            first = loop.create_future()
            self._first.append(first)
            self._tasks.append(asyncio.create_task(self._pump(choice, first)))
        try:
            results = await asyncio.gather(*self._first)
        except BaseException:
            self.close()
            raise
        for result in results:
            if isinstance(result, BaseException):
                self.close()
                raise result

    async def _pump(self, choice: ChoiceRequest, first: asyncio.Future) -> None:
        self._unfinished.add(choice.request_id)
        gen = None
        try:
            gen = self.engine.generate(
                choice.prompt_token_ids, choice.params, choice.request_id, **choice.engine_kwargs
            )
            async for out in gen:
                if out.finished:
                    self._unfinished.discard(choice.request_id)
                if not first.done():
                    first.set_result(None)
                tracking.on_output(choice.request_id, out)  # usage, TTFT, inter-token latency
                self._queue.put_nowait((choice.index, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            if not first.done():
                first.set_result(exc)
            else:
                self._queue.put_nowait((choice.index, exc))
        finally:
            if gen is not None:
                with contextlib.suppress(BaseException):
                    await gen.aclose()
            if not first.done():
                first.set_result(None)
            self._queue.put_nowait((choice.index, _DONE))

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) in the order the engine produced them; raises a choice's error."""
        remaining = len(self.choices)
        while remaining:
            index, item = await self._queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    def close(self) -> None:
        """Cancel whatever still runs and abort its engine requests. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            if not task.done():
                task.cancel()
        if self._unfinished and self.on_abort is not None:
            self.on_abort(len(self._unfinished))
        for request_id in list(self._unfinished):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001
                logger.exception("abort of %s failed", request_id)
        self._unfinished.clear()
