"""Notice a client that hangs up while its request runs, and stop the work for it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

from starlette.requests import Request
from starlette.responses import Response

T = TypeVar("T")
P = ParamSpec("P")


class ClientDisconnected(Exception):
    pass


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone. Call only after the request body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


CLIENT_CLOSED = 499  # nginx's code: nobody reads it, but logs show what happened


def with_cancellation(
    handler: Callable[Concatenate[Request, P], Awaitable[Response]],
) -> Callable[Concatenate[Request, P], Awaitable[Response]]:
    """Decorate a handler (its first argument the request, its body already read) so that a
    client that hangs up before it returns cancels it and is answered 499 (vLLM's
    `@with_cancellation`). A streamed body is cancelled by Starlette itself."""

    @functools.wraps(handler)
    async def wrapper(request: Request, *args: P.args, **kwargs: P.kwargs) -> Response:
        try:
            return await unless_disconnected(request, handler(request, *args, **kwargs))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)

    return wrapper
