"""One batch line run through the same serving pipeline as an HTTP request: the line's body
becomes an in-process request to the chat or completions endpoint (`serving.pipeline.serve`),
carrying a request record of the job's account and key, so it is validated, admitted, run and
accounted for (a usage row, the access log) exactly as if a client had sent it. It runs in the
batch tier (`BATCH_TIER`): after every interactive request in the admission queue and in the
engine's scheduler."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request

from girandole.api.chat.route import ENDPOINT as CHAT_ENDPOINT
from girandole.api.completions.route import ENDPOINT as COMPLETIONS_ENDPOINT
from girandole.api.http.errors import APIError, internal_error
from girandole.api.ops.tracking import Principal, RequestRecord, attach_record
from girandole.api.serving.pipeline import serve
from girandole.batch.lines import CHAT
from girandole.engine.scheduler import BATCH_TIER

logger = logging.getLogger("girandole.batch")


def _request(app: FastAPI, path: str, body: bytes) -> Request:
    """A POST of `body` to `path` whose client never goes away."""
    scope: dict[str, Any] = {
        "type": "http",
        "app": app,
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": None,
        "server": None,
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the runner cancels the task instead
        raise AssertionError("unreachable")

    request = Request(scope, receive)
    request.scope["state"] = {}
    return request


async def execute(
    app: FastAPI, principal: Principal, url: str, body: dict[str, Any], label: str
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, response body) of one request; `label` names it in the access log."""
    endpoint = CHAT_ENDPOINT if url == CHAT else COMPLETIONS_ENDPOINT
    path = "/inference" + url
    request = _request(app, path, json.dumps(body).encode())
    state = app.state.girandole
    record = RequestRecord("POST", path, label, principal=principal)  # no ops: not in the
    attach_record(request.scope, record)  # interactive latency histograms
    try:
        response = await serve(request, endpoint, tier=BATCH_TIER)
        record.status = response.status_code
        return response.status_code, json.loads(bytes(response.body))
    except APIError as exc:
        record.status = exc.status_code
        return exc.status_code, exc.body(record.request_id)
    except asyncio.CancelledError:
        record.status = 499
        raise
    except Exception:  # noqa: BLE001 - one bad line must not stop the job
        logger.exception("batch line %s failed", label)
        record.status = 500
        return 500, internal_error().body(record.request_id)
    finally:
        record.response_id = request.scope["state"].get("request_id")
        state.ops.finish(record)  # usage row, admission slot, access log
