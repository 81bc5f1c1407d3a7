"""DrainCut (girandole/api/ops/drain_cut.py) on its own: a request the drain period cuts before
its response starts is answered 503, however many cancels reach its task."""

from __future__ import annotations

import asyncio
import json
import types

from girandole.api.ops.drain_cut import DrainCut
from girandole.api.ops.server_ops import ServerOps

SCOPE = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
         "query_string": b"", "root_path": ""}  # fmt: skip


async def _cut(extra_cancels: int) -> list[dict]:
    started = asyncio.Event()

    async def app(scope, receive, send):  # a handler still running when the drain ends
        started.set()
        await asyncio.sleep(60)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    # ServerOps' own cut, on the two collections it reads
    ops = types.SimpleNamespace(unanswered=set(), _streams=set())
    task = asyncio.create_task(DrainCut(app, ops)(SCOPE, receive, send))
    await started.wait()
    ServerOps.cut_in_flight(ops, "stopped")
    for _ in range(extra_cancels):  # e.g. asyncio.run's cancel of every task left
        task.cancel()
    await task
    return sent


def test_a_cut_request_is_answered_503_even_when_cancelled_again():
    for extra in (0, 1, 2):
        sent = asyncio.run(_cut(extra))
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503, extra
        body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert body["error"]["code"] == "UNAVAILABLE" and "stopped" in body["error"]["message"]
