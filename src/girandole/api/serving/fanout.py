"""Run one engine request per choice and merge their outputs into one stream of events.

The engine's outputs advance each choice's `generated` progress and are shown to the request's
observer (its ops record) as they arrive, before the response reads them.

`start()` waits until every choice has produced its first output (or failed), so a request
the engine rejects (`ValueError` before its first output) becomes a 400 before any response
bytes are sent. `close()` is synchronous so that it also works from a cancelled task: it
cancels the consumers (which closes the engine's generators) and aborts unfinished requests.

`max_in_flight` caps the choices at the engine at once: the others start as earlier ones end
(a prefill request of hundreds of inputs holds only its admission slots' worth of sequences, so
the engine interleaves other requests with it). `start()` then waits for every choice's first
output, so it suits only requests whose first output is their last (prefill-only ones).

A choice's pump stops taking its engine outputs once `MAX_QUEUED_OUTPUTS` of them wait for the
response to take them (a stream whose client does not read), until the response has taken half:
the engine then pauses the request (engine/backpressure.py) instead of the server holding
everything it would generate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from girandole.api.serving.choice import Choice
from girandole.engine.backpressure import MAX_QUEUED_OUTPUTS
from girandole.engine.outputs import RequestOutput
from girandole.engine.protocol import EngineClient

logger = logging.getLogger("girandole.api")

_DONE = object()


class Observer(Protocol):
    """Told of every engine output as it arrives (the request's ops record: metrics)."""

    def observe(self, choice: Choice, out: RequestOutput) -> None: ...


class ChoiceFanout:
    def __init__(
        self,
        engine: EngineClient,
        choices: list[Choice],
        observer: Observer | None = None,
        on_abort: Callable[[int], None] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.engine = engine
        self.observer = observer
        self.on_abort = on_abort  # told how many requests close() aborted
        self.choices = choices
        self._queue: asyncio.Queue[tuple[Choice, object]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._first: list[asyncio.Future] = []
        self._unfinished: set[str] = set()
        self._closed = False
        self._limit = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._queued: dict[str, int] = {}  # a choice's outputs in _queue, by request id
        self._room: dict[str, asyncio.Event] = {}  # a waiting pump's, set at half

    async def start(self) -> None:
        """Start every choice; raise the first choice's error if any fails before its first output."""
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

    async def _pump(self, choice: Choice, first: asyncio.Future) -> None:
        try:
            async with self._limit or contextlib.nullcontext():
                await self._generate(choice, first)
        finally:
            if not first.done():
                first.set_result(None)
            self._queue.put_nowait((choice, _DONE))

    async def _generate(self, choice: Choice, first: asyncio.Future) -> None:
        self._unfinished.add(choice.request_id)
        choice.generated.started = True  # its prompt is billed from here on
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
                choice.generated.advance(out)
                if self.observer is not None:  # TTFT, inter-token latency
                    self.observer.observe(choice, out)
                self._queue.put_nowait((choice, out))
                await self._wait_for_reader(choice.request_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            if not first.done():
                first.set_result(exc)
            else:
                self._queue.put_nowait((choice, exc))
        finally:
            if gen is not None:
                with contextlib.suppress(BaseException):
                    await gen.aclose()

    async def _wait_for_reader(self, request_id: str) -> None:
        queued = self._queued[request_id] = self._queued.get(request_id, 0) + 1
        if queued >= MAX_QUEUED_OUTPUTS:
            # one wake per half of the bound, not one per output taken
            room = self._room[request_id] = asyncio.Event()
            try:
                await room.wait()
            finally:
                del self._room[request_id]

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """(choice, output) in the order the engine produced them; raises a choice's error."""
        remaining = len(self.choices)
        while remaining:
            choice, item = await self._queue.get()
            if isinstance(item, RequestOutput):
                queued = self._queued[choice.request_id] = self._queued[choice.request_id] - 1
                if queued <= MAX_QUEUED_OUTPUTS // 2 and choice.request_id in self._room:
                    self._room[choice.request_id].set()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, RequestOutput)
                yield choice, item

    def cut(self, error: Exception) -> None:
        """End the consumer's events with `error` now (the server's drain deadline)."""
        self._queue.put_nowait((None, error))  # type: ignore[arg-type]

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
