"""AsyncEngine: the engine loop on its own thread, with an asyncio interface for the server.

The loop thread owns the LLMEngine. Requests and aborts reach it through a command queue; its
outputs go back to each request's asyncio.Queue on the caller's event loop. Torch releases the
GIL inside its kernels, so the event loop keeps serving HTTP while a step runs.

Backpressure (engine/backpressure.py): once `unread_limit` outputs wait for a caller that does
not take them (a stream whose client stopped reading), the loop pauses the request (the
scheduler no longer steps it, and its KV blocks go to whoever needs them: engine/scheduler.py);
when the caller has read down to half of that, it asks the loop to resume it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from girandole.engine.backpressure import unread_limit
from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.engine.outputs import RequestOutput
from girandole.engine.passing_thread import run_in_passing_thread
from girandole.sampling.compile_pool import CompilePool
from girandole.sampling.grammar import GrammarSpec
from girandole.sampling.grammar_limits import check_grammar_size
from girandole.sampling.params import SamplingParams

__all__ = ["AsyncEngine", "EngineConfig"]

logger = logging.getLogger(__name__)
_ids = itertools.count()
STOPPED_MESSAGE = (
    "the model's engine was stopped before the request finished (its deployment was deleted, "
    "scaled down or restarted, or the server is shutting down); send the request again"
)


@dataclass(eq=False)
class _Stream:
    """One request's way back to its caller, and how far the caller has read it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    limit: int  # unread outputs that pause the request
    delivered: int = 0  # outputs handed to the caller's loop: written by the engine thread
    read: int = 0  # outputs the caller took: written by the caller's loop
    paused: bool = False
    resume_asked: bool = False  # the caller sent "resume" for this pause
    # Held to read `unread` and change `paused` / `resume_asked` as one step: without it, a
    # caller could read everything between the loop's count and its pause, and never resume.
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def unread(self) -> int:
        return self.delivered - self.read


class EngineDeadError(RuntimeError):
    pass


class EngineStoppedError(EngineDeadError):
    """The engine was shut down (its deployment deleted, scaled down or restarted) while the
    request waited or ran."""


class AsyncEngine:
    def __init__(
        self, config: EngineConfig | None = None, grammar_compile_timeout: float = 10.0
    ) -> None:
        self.engine: LLMEngine
        self.grammar_pool = CompilePool(num_threads=1, timeout=grammar_compile_timeout)
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self.num_backpressure_pauses = 0  # requests paused for a caller behind on reading
        self._stopped = False
        self._error: BaseException | None = None
        self._last_progress = time.monotonic()  # last finished step, or last idle wait
        # The engine thread loads the model too, so that it is the only thread whose torch work
        # starts an OpenMP team. A second team (the loading thread's, whose workers live as
        # long as it does) puts more OpenMP threads than CPUs on libgomp's books, and libgomp
        # then stops spinning between parallel regions: each of a step's hundreds of kernels
        # waits on a futex wake. In a Ray replica (whose __init__ thread outlives the load)
        # that made decode steps 1.7x slower.
        loaded = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(config, loaded, failure), name="girandole-engine", daemon=True
        )
        self._thread.start()
        loaded.wait()
        if failure:
            self.grammar_pool.close()
            raise failure[0]

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> dict[str, float]:
        return {**self.engine.stats(), "num_backpressure_pauses": self.num_backpressure_pauses}

    def seconds_stalled(self) -> float:
        """How long the loop has had work without finishing a step (0 when idle or moving)."""
        if not self._thread.is_alive():
            return float("inf")
        return max(0.0, time.monotonic() - self._last_progress)

    # -- public API ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Raises ValueError before the first output for bad input.

        Closing or cancelling the iterator (a client that went away) aborts the request.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")
        if self._stopped:
            raise EngineStoppedError(STOPPED_MESSAGE)
        self.engine.check_request(prompt_token_ids, params)
        self.engine.check_images(prompt_token_ids, kwargs.get("images"))
        if kwargs.get("adapter") is not None:
            self.engine.loras.get(kwargs["adapter"])  # ValueError: not loaded here
        if params.grammar is not None and "compiled_grammar" not in kwargs:
            kwargs["compiled_grammar"] = await self.compile_grammar(params.grammar)
        request_id = request_id or f"req-{next(_ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id already in use: {request_id}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), unread_limit(params))
        self._streams[request_id] = stream
        self._send("add", (request_id, list(prompt_token_ids), params, kwargs))
        finished = False
        try:
            # shutdown() sets _stopped, then fails the streams it finds: a stream registered
            # after that sees _stopped here.
            if self._stopped:
                raise EngineStoppedError(STOPPED_MESSAGE)
            while True:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    raise out
                with stream.lock:
                    stream.read += 1
                    resume = (
                        stream.paused
                        and not stream.resume_asked
                        and stream.unread <= stream.limit // 2
                    )
                    if resume:
                        stream.resume_asked = True
                if resume:
                    self._send("resume", request_id)
                finished = out.finished
                yield out
                if finished:
                    break
        finally:
            if not finished:
                self._send("abort", request_id)
            self._streams.pop(request_id, None)

    async def compile_grammar(self, spec: GrammarSpec) -> Any:
        """Compile (or find cached) a grammar off the event loop and the engine loop, in the
        grammar pool. GrammarError for a bad or oversized grammar, CompileTimeout past the
        deadline; a caller that goes away cancels a compile that has not started."""
        check_grammar_size(spec)
        if (
            hit := self.engine.grammars.cached(spec)
        ) is not None:  # not queued behind other compiles
            return hit
        return await self.grammar_pool.run(
            lambda: self.engine.grammars.compile(spec), spec.kind.replace("_", " ")
        )

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    # -- LoRA adapters (engine/lora_manager.py) ----------------------------------------------

    async def load_lora(self, name: str, path: str) -> None:
        """Read, check and register a PEFT LoRA adapter under `name`, off the event loop;
        AdapterError (a ValueError) when it does not fit this model. Requests may name it as
        soon as this returns; running requests are not disturbed."""
        adapter = await run_in_passing_thread(self.engine.loras.read, name, path)
        self.engine.loras.register(adapter)

    def unload_lora(self, name: str) -> bool:
        """New requests can no longer name `name`; those accepted finish. False: not loaded."""
        return self.engine.loras.unregister(name)

    def lora_names(self) -> list[str]:
        return self.engine.loras.names()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop; every request still waiting or running ends with EngineStoppedError
        (a 503 to its client) instead of waiting for outputs that will never come."""
        self.grammar_pool.close()
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        for request_id in list(self._streams):
            self._deliver(request_id, EngineStoppedError(STOPPED_MESSAGE))

    # -- the loop --------------------------------------------------------------------------

    def _send(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, RequestOutput):
            stream.delivered += 1
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            self._streams.pop(request_id, None)

    def _pause_unread(self, outputs: list[RequestOutput]) -> None:
        """Pause the requests just stepped whose callers have `limit` outputs unread."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None or out.finished or stream.paused:
                continue
            with stream.lock:
                if stream.unread < stream.limit:
                    continue
                stream.paused = True
            self.num_backpressure_pauses += 1
            self.engine.pause(out.request_id)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, prompt, params, kwargs = payload
                try:
                    self.engine.add_request(request_id, prompt, params, **kwargs)
                except Exception as exc:
                    self._deliver(request_id, exc)
            elif kind == "abort":
                out = self.engine.abort(payload)
                if out is not None:
                    self._deliver(payload, out)
            elif kind == "resume":
                stream = self._streams.get(payload)
                if stream is not None:
                    with stream.lock:
                        stream.paused = stream.resume_asked = False
                self.engine.resume(payload)

    def _run(
        self, config: EngineConfig | None, loaded: threading.Event, failure: list[BaseException]
    ) -> None:
        try:
            self.engine = LLMEngine(config)
        except BaseException as exc:  # noqa: BLE001 - raised by the constructor
            failure.append(exc)
            return
        finally:
            loaded.set()
        try:
            self._loop()
        finally:
            if self.engine.cpu_threads is not None:
                self.engine.cpu_threads.close()

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._last_progress = time.monotonic()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    self._last_progress = time.monotonic()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    self._fail_all(exc)
                    continue
                self._last_progress = time.monotonic()
                for out in outputs:
                    self._deliver(out.request_id, out)
                self._pause_unread(outputs)

    def _fail_all(self, exc: BaseException) -> None:
        """A step failed outside any one request: end every request in flight with the error."""
        logger.exception("engine step failed; aborting the requests in flight")
        for request_id in list(self.engine.seqs):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"engine step failed: {exc}"))
