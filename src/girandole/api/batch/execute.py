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
from girandole.api.http.errors import APIError, bad_request, deployment_error, internal_error
from girandole.api.http.inprocess import inprocess_request
from girandole.api.messages.route import ENDPOINT as MESSAGES_ENDPOINT
from girandole.api.messages.shape import anthropic_error
from girandole.api.ops.tracking import Principal, RequestRecord, attach_record
from girandole.api.responses.route import ENDPOINT as RESPONSES_ENDPOINT
from girandole.api.serving.pipeline import Endpoint, serve
from girandole.api.serving.prefill import serve_prefill
from girandole.batch.lines import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES
from girandole.engine.scheduler import BATCH_TIER
from girandole.registry.deployments import DeploymentError

logger = logging.getLogger("girandole.batch")
ENDPOINTS: dict[str, Endpoint] = {
    CHAT: CHAT_ENDPOINT,
    COMPLETIONS: COMPLETIONS_ENDPOINT,
    RESPONSES: RESPONSES_ENDPOINT,
    MESSAGES: MESSAGES_ENDPOINT,
}


async def execute(
    app: FastAPI, principal: Principal, url: str, body: dict[str, Any], label: str
) -> tuple[int, dict[str, Any], str, bool]:
    """(HTTP status, response body, request id, whether to retry it later) of one request;
    `label` names it in the access log. The request id is its usage row's (the response's id
    where it has one). A refusal for capacity is retried later: a 429, or a 503 that says when
    to retry (Retry-After: the model loading, the queue full, a deployment scaling up from
    zero); a 503 without (a deployment failed or scaled to at most 0 replicas) is the line's
    error."""
    path = "/inference" + url
    request = inprocess_request(app, path, json.dumps(body).encode())
    state = app.state.girandole
    record = RequestRecord("POST", path, label, principal=principal)  # no ops: not in the
    attach_record(request.scope, record)  # interactive latency histograms
    status, error, headers = 500, None, {}
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
        status, headers = response.status_code, response.headers
    except APIError as exc:
        status, error, headers = exc.status_code, exc, exc.headers
    except DeploymentError as exc:  # the deployment's engine refused it (404, 503)
        error = deployment_error(exc)
        status, headers = error.status_code, error.headers
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
    retry = status == 429 or (status == 503 and any(k.lower() == "retry-after" for k in headers))
    if error is not None:
        return status, error_body(url, error, record.request_id), record.request_id, retry
    return status, json.loads(bytes(response.body)), record.request_id, retry


def error_body(url: str, error: APIError, request_id: str) -> dict[str, Any]:
    """The error as the line's endpoint writes it to its clients (Anthropic's shape for
    Messages, Fireworks' otherwise)."""
    return anthropic_error(error, request_id) if url == MESSAGES else error.body(request_id)
