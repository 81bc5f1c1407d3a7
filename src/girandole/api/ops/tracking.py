"""What one HTTP request did, from arrival to the last byte: who sent it, which engine requests
it ran and what they produced. The ASGI middleware here opens a `RequestRecord` for every
request; the serving pipeline hands it its choices when it admits the request
(`ServerOps.admit`), and the fan-out shows it each engine output as it arrives (the record is
the fan-out's observer); when the response ends, however it ends (finished, error, client gone,
server stopping), `ServerOps.finish` turns it into metrics, a usage row and a log line, and
frees its admission slot. The record is also the context variable `CURRENT`, which the logs read
for the request id.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from girandole.api.ops.request_context import CURRENT
from girandole.api.serving.choice import Choice
from girandole.api.serving.usage import Usage, count_usage, sum_usage
from girandole.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from girandole.api.ops.server_ops import ServerOps

_RECORD_KEY = "girandole_record"
_MAX_CLIENT_ID = 128


@dataclass
class Principal:
    """Who sent a request: the key's account, id and role (None on an open server)."""

    account: str | None
    key_id: str | None
    rpm: int | None = None
    tpm: int | None = None
    role: str | None = None  # registry/roles.py
    user_id: str | None = None  # the account's user its key belongs to (None: a user-less key)

    @property
    def limit_key(self) -> str:
        return self.key_id or "-"


@dataclass
class RequestRecord:
    method: str
    path: str
    client_request_id: str | None
    start: float = field(default_factory=time.monotonic)
    wall_start: float = field(default_factory=time.time)
    principal: Principal | None = None
    model: str | None = None  # the resolved model name
    deployment: str | None = None  # the deployment that runs it, once named (account metrics)
    status: int | None = None
    stream: bool = False
    admitted: bool = False
    prepaid_tokens: int = 0  # prompt tokens charged to the key's token bucket at admission
    queue_s: float | None = None
    metadata: dict[str, str] | None = None  # the request's `metadata`, kept with its usage row
    first_token_time: float | None = None
    choices: list[Choice] = field(default_factory=list)  # set when admitted
    ends: list[RequestOutput] = field(default_factory=list)  # each engine request's last output
    slots: int = 0  # admission slots held while admitted
    # the choices of its later engine rounds (a Responses MCP tool loop), under one admission
    rounds: list[list[Choice]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # added to the response
    fallback_id: str = field(default_factory=lambda: "req-" + uuid.uuid4().hex)
    response_id: str | None = None
    ops: ServerOps | None = None  # the ServerOps that will account for it
    # its work runs on under a record of its own (a background response): no usage row here
    handed_off: bool = False

    @property
    def request_id(self) -> str:
        return self.response_id or self.client_request_id or self.fallback_id

    # -- the fan-out's observer ------------------------------------------------------------

    def observe(self, choice: Choice, out: RequestOutput) -> None:
        """Time to first token and inter-token latency, as each engine output arrives."""
        metrics = self.ops.metrics if self.ops is not None else None
        now = time.monotonic()
        new = len(out.new_token_ids or ())
        if new:
            if self.first_token_time is None:
                self.first_token_time = now
                if metrics is not None:
                    metrics.ttft.observe(now - self.start)
            if choice.last_token_time is not None and metrics is not None:
                gap = (now - choice.last_token_time) / new
                for _ in range(new):
                    metrics.itl.observe(gap)
            choice.last_token_time = now
        if out.finished:
            self.ends.append(out)

    def usage(self) -> Usage:
        """What the engine did for this request (all its rounds), counted as responses count
        usage."""
        return sum_usage(count_usage(r, "generated") for r in [self.choices, *self.rounds])

    @property
    def aborted(self) -> bool:
        every = [c for r in [self.choices, *self.rounds] for c in r]
        return self.status == 499 or any(not c.generated.finished for c in every)


def record_of(scope_or_request: Any) -> RequestRecord | None:
    scope = getattr(scope_or_request, "scope", scope_or_request)
    return (scope.get("state") or {}).get(_RECORD_KEY)


def principal_of(request: Any) -> Principal | None:
    """Who sent `request`: its record's key (in-process requests: batch lines, background
    work), else what authorization set; None before authorization (an open route)."""
    http = record_of(request)
    principal = http.principal if http is not None else None
    return principal or getattr(request.state, "principal", None)


def attach_record(scope: dict[str, Any], record: RequestRecord) -> None:
    """Hang `record` on an ASGI scope as the middleware does (a request made in-process)."""
    scope.setdefault("state", {})[_RECORD_KEY] = record


def _client_id(headers: Headers) -> str | None:
    value = headers.get("x-request-id")
    if not value:
        return None
    value = value.strip()[:_MAX_CLIENT_ID]
    return value if value.isprintable() else None


class RequestTracker:
    """ASGI middleware: a record per HTTP request, `x-request-id` on every response (the
    client's, else the response id), and `ops.finish(record)` when the response is over."""

    def __init__(self, app: ASGIApp, ops: ServerOps) -> None:
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
