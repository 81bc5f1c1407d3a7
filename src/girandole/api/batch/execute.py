"""One batch line run through the same serving pipeline as an HTTP request: the line's body
becomes an in-process request to its endpoint (chat, completions, Responses, Messages:
`serving.pipeline.serve`; embeddings: `serving.prefill.serve_prefill`),
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

from girandole.api.chat.route import ENDPOINT as CHAT_ENDPOINT
from girandole.api.completions.route import ENDPOINT as COMPLETIONS_ENDPOINT
from girandole.api.embeddings.route import ENDPOINT as EMBEDDINGS_ENDPOINT
from girandole.api.http.errors import APIError, bad_request, internal_error
from girandole.api.http.inprocess import inprocess_request
from girandole.api.messages.route import ENDPOINT as MESSAGES_ENDPOINT
from girandole.api.messages.shape import anthropic_error
from girandole.api.ops.tracking import Principal, RequestRecord, attach_record
from girandole.api.responses.route import ENDPOINT as RESPONSES_ENDPOINT
from girandole.api.serving.pipeline import Endpoint, serve
from girandole.api.serving.prefill import serve_prefill
from girandole.batch.lines import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES
from girandole.engine.scheduler import BATCH_TIER

logger = logging.getLogger("girandole.batch")
ENDPOINTS: dict[str, Endpoint] = {
    CHAT: CHAT_ENDPOINT,
    COMPLETIONS: COMPLETIONS_ENDPOINT,
    RESPONSES: RESPONSES_ENDPOINT,
    MESSAGES: MESSAGES_ENDPOINT,
}


async def execute(
    app: FastAPI, principal: Principal, url: str, body: dict[str, Any], label: str
) -> tuple[int, dict[str, Any], str]:
    """(HTTP status, response body, request id) of one request; `label` names it in the access
    log. The request id is its usage row's (the response's id where it has one)."""
    path = "/inference" + url
    request = inprocess_request(app, path, json.dumps(body).encode())
    state = app.state.girandole
    record = RequestRecord("POST", path, label, principal=principal)  # no ops: not in the
    attach_record(request.scope, record)  # interactive latency histograms
    status, error = 500, None
    try:
        if url == EMBEDDINGS:
            response = await serve_prefill(request, EMBEDDINGS_ENDPOINT, tier=BATCH_TIER)
        else:
            if url == RESPONSES and body.get("background") is True:
                raise bad_request(
                    "background is not run in a batch: the line's response is its result",
                    "background",
                )
            endpoint = ENDPOINTS[url]
            response = await serve(request, endpoint, tier=BATCH_TIER)
        status = response.status_code
    except APIError as exc:
        status, error = exc.status_code, exc
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception:  # noqa: BLE001 - one bad line must not stop the job
        logger.exception("batch line %s failed", label)
        error = internal_error()
    finally:
        record.status = status
        record.response_id = request.scope["state"].get("request_id")
        state.ops.finish(record)  # usage row, admission slot, access log
    if error is not None:
        return status, error_body(url, error, record.request_id), record.request_id
    return status, json.loads(bytes(response.body)), record.request_id


def error_body(url: str, error: APIError, request_id: str) -> dict[str, Any]:
    """The error as the line's endpoint writes it to its clients (Anthropic's shape for
    Messages, Fireworks' otherwise)."""
    return anthropic_error(error, request_id) if url == MESSAGES else error.body(request_id)
