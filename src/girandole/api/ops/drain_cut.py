"""Requests not yet answered when a stopping server's drain period ends: a 503, not a bare 500.

At the end of `--drain-seconds` uvicorn cancels the requests still running; one whose response
had not begun (a non-streamed completion, an embedding, a synchronous Response) reached the
client as uvicorn's plain-text `500 Internal Server Error`, with a CancelledError traceback
in the log. Streams already end with an error event a second before that deadline
(`ServerOps._cut_streams`); at the same moment these requests are cancelled here and answered
503 UNAVAILABLE (retry elsewhere or later), in the route's error shape, and tracked as such.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from girandole.api.http.errors import error_response, unavailable


@dataclass(eq=False)
class Unanswered:
    """A request whose response has not started: its task, and whether the drain cut it."""

    task: asyncio.Task[Any]
    message: str | None = field(default=None)  # set when cut: what the 503 says


class DrainCut:
    """ASGI middleware: registers each HTTP request with `ops.unanswered` until its response
    starts; `ServerOps.cut_unanswered` cancels those left and they are answered 503 here."""

    def __init__(self, app: ASGIApp, ops: Any) -> None:
        self.app = app
        self.ops = ops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        entry = Unanswered(task)
        unanswered: set[Unanswered] = self.ops.unanswered
        unanswered.add(entry)
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":  # under way: a stream's cut ends it
                started = True
                unanswered.discard(entry)
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except asyncio.CancelledError:
            if entry.message is None:  # not the drain's cancel: uvicorn's own at its deadline
                raise
            # The drain's cancel, perhaps with another after it: after a second Ctrl-C,
            # asyncio.run cancels every task left once uvicorn returns, and a request cut a
            # moment before then re-raised and got uvicorn's bare 500 (a loaded host's
            # test_a_second_ctrl_c_ends_what_runs_with_an_error_not_a_cut). It is answered 503
            # all the same, and ends.
            while task.uncancel() > 0:
                pass
        else:
            if entry.message is None:
                return
            task.uncancel()  # the app took the cancel itself
        finally:
            unanswered.discard(entry)
        if not started:
            response = error_response(Request(scope, receive), unavailable(entry.message))
            await response(scope, receive, send)
