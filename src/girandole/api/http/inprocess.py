"""Requests the server makes to itself: a batch line run as an HTTP request, a background
response run after its HTTP request was answered. Each is a Starlette request whose client
never hangs up (whoever runs it cancels its task instead)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp


def inprocess_request(
    app: ASGIApp,
    path: str,
    body: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = ((b"content-type", b"application/json"),),
) -> Request:
    """A POST of `body` to `path` whose client never goes away."""
    scope: dict[str, Any] = {
        "type": "http",
        "app": app,
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": list(headers),
        "client": None,
        "server": None,
        "state": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the task is cancelled instead
        raise AssertionError("unreachable")

    return Request(scope, receive)
