"""What one HTTP request did, from arrival to the last byte: who sent it, which engine requests
it ran and what they produced. The ASGI middleware here opens a `RequestRecord` for every
request; the fan-out reports each engine output into it (through a context variable, so the
routes need not pass it around); when the response ends, however it ends (finished, error,
client gone, server stopping), `ServerOps.finish` turns it into metrics, a usage row and a log
line, and frees its admission slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "girandole_request", default=None
)
_RECORD_KEY = "girandole_record"
_MAX_CLIENT_ID = 128


@dataclass
class Principal:
    """Who sent a request: the key's account and id (None, None on an open server)."""

    account: str | None
    key_id: str | None
    rpm: int | None = None
    tpm: int | None = None

    @property
    def limit_key(self) -> str:
        return self.key_id or "-"


@dataclass
class ChoiceTrack:
    prompt_index: int
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    finished: bool = False
    last_token_time: float | None = None


@dataclass
class RequestRecord:
    method: str
    path: str
    client_request_id: str | None
    start: float = field(default_factory=time.monotonic)
    wall_start: float = field(default_factory=time.time)
    principal: Principal | None = None
    model: str | None = None  # the resolved model name
    status: int | None = None
    stream: bool = False
    admitted: bool = False
    queue_s: float | None = None
    first_token_time: float | None = None
    choices: dict[str, ChoiceTrack] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # added to the response
    fallback_id: str = field(default_factory=lambda: "req-" + uuid.uuid4().hex)
    response_id: str | None = None
    ops: Any = None  # the ServerOps that will account for it

    @property
    def request_id(self) -> str:
        return self.response_id or self.client_request_id or self.fallback_id

    # -- fed by the fan-out ----------------------------------------------------------------

    def start_choice(self, request_id: str, prompt_index: int, num_prompt_tokens: int) -> None:
        self.choices[request_id] = ChoiceTrack(prompt_index, num_prompt_tokens)

    def observe(self, request_id: str, out: Any, metrics: Any = None) -> None:
        track = self.choices.get(request_id)
        if track is None:
            return
        now = time.monotonic()
        new = len(out.new_token_ids or ())
        if new:
            if self.first_token_time is None:
                self.first_token_time = now
                if metrics is not None:
                    metrics.ttft.observe(now - self.start)
            if track.last_token_time is not None and metrics is not None:
                gap = (now - track.last_token_time) / new
                for _ in range(new):
                    metrics.itl.observe(gap)
            track.last_token_time = now
        track.num_output_tokens = max(track.num_output_tokens, out.num_output_tokens)
        track.num_cached_tokens = max(track.num_cached_tokens, out.num_cached_tokens)
        if out.num_prompt_tokens:
            track.num_prompt_tokens = out.num_prompt_tokens
        if out.finished:
            track.finished = True

    # -- totals ----------------------------------------------------------------------------

    def usage(self) -> tuple[int, int, int]:
        """(prompt, cached, completion) tokens, counted as the API's usage counts them."""
        prompts: dict[int, int] = {}
        cached: dict[int, int] = {}
        completion = 0
        for track in self.choices.values():
            p = track.prompt_index
            prompts[p] = track.num_prompt_tokens
            cached[p] = min(cached.get(p, track.num_cached_tokens), track.num_cached_tokens)
            completion += track.num_output_tokens
        return sum(prompts.values()), sum(cached.values()), completion

    @property
    def aborted(self) -> bool:
        return self.status == 499 or any(not t.finished for t in self.choices.values())


async def before_engine(choices: list[Any]) -> None:
    """Called by the fan-out before it starts a request's engine requests."""
    record = CURRENT.get()
    if record is not None and record.ops is not None:
        await record.ops.before_engine(choices)


def on_output(request_id: str, out: Any) -> None:
    """Called by the fan-out with every engine output."""
    record = CURRENT.get()
    if record is not None and record.ops is not None:
        record.ops.on_output(record, request_id, out)


def record_of(scope_or_request: Any) -> RequestRecord | None:
    scope = getattr(scope_or_request, "scope", scope_or_request)
    return (scope.get("state") or {}).get(_RECORD_KEY)


def _client_id(headers: Headers) -> str | None:
    value = headers.get("x-request-id")
    if not value:
        return None
    value = value.strip()[:_MAX_CLIENT_ID]
    return value if value.isprintable() else None


class RequestTracker:
    """ASGI middleware: a record per HTTP request, `x-request-id` on every response (the
    client's, else the response id), and `ops.finish(record)` when the response is over."""

    def __init__(self, app: ASGIApp, ops: Any) -> None:
        self.app = app
        self.ops = ops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(
            method=scope["method"],
            path=scope["path"],
            client_request_id=_client_id(Headers(scope=scope)),
            ops=self.ops,
        )
        state = scope.setdefault("state", {})
        state[_RECORD_KEY] = record
        token = CURRENT.set(record)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                record.response_id = state.get("request_id")
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers["x-request-id"] = record.client_request_id or record.request_id
                for name, value in record.headers.items():
                    if name not in headers:
                        headers[name] = value
                record.stream = headers.get("content-type", "").startswith("text/event-stream")
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            if record.status is None:
                record.status = 499
            raise
        except BaseException:
            if record.status is None:
                record.status = 500
            raise
        finally:
            CURRENT.reset(token)
            record.response_id = record.response_id or state.get("request_id")
            self.ops.finish(record)
