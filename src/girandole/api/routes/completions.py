"""POST /v1/completions (also under /inference/v1)."""

from __future__ import annotations

import contextlib
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from girandole.api import completions, structured
from girandole.api.auth import require_api_key
from girandole.api.body import read_body
from girandole.api.disconnect import ClientDisconnected, unless_disconnected
from girandole.api.errors import model_not_found, new_request_id
from girandole.api.introspection import perf_headers
from girandole.api.schemas.completions import CompletionRequest
from girandole.api.sse import SSEResponse
from girandole.api.unsupported import COMPLETIONS_UNSUPPORTED, strip_unsupported
from girandole.api.validation import check_not_both, parse_json_object, validate_model

router = APIRouter(dependencies=[Depends(require_api_key)])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": CompletionRequest.model_json_schema()}},
    }
}
CLIENT_CLOSED = 499  # nginx's code: nobody reads it, but logs show what happened


def response_headers(request: Request, request_id: str, sampling: dict) -> dict[str, str]:
    return {
        "x-request-id": request.headers.get("x-request-id") or request_id,
        "fireworks-sampling-options": json.dumps(sampling, separators=(",", ":")),
    }


@router.post("/completions", openapi_extra=_BODY_DOC, summary="Create a text completion")
async def create_completion(request: Request) -> Response:
    received = time.monotonic()
    state = request.app.state.girandole
    request_id = new_request_id()
    request.state.request_id = request_id
    data = parse_json_object(await read_body(request, state.settings.max_request_bytes))
    model = data.get("model")
    if isinstance(model, str):  # unknown models and other accounts' models alike: 404
        if state.ops.resolve(request, model, request.headers.get("fireworks-deployment")) is None:
            raise model_not_found()
    state.ops.check_prompt_size(data)
    strip_unsupported(data, COMPLETIONS_UNSUPPORTED)
    check_not_both(data, "max_tokens", "max_completion_tokens")
    req = validate_model(CompletionRequest, data)
    engine = state.require_engine()
    job = await completions.prepare(
        engine, req, request_id, req.model, state.context_length, request.headers
    )
    await structured.apply_response_format(engine, req, job.choices)
    job.received = received
    headers = response_headers(request, request_id, job.sampling_options)
    try:
        fanout = await unless_disconnected(
            request, completions.start(engine, job, state.count_aborted)
        )
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    if job.stream:
        body = completions.stream(job, fanout, state.settings.stream_usage)
        return SSEResponse(body, headers=headers)
    try:
        result = await unless_disconnected(request, completions.collect(job, fanout))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        with contextlib.suppress(Exception):
            fanout.close()
    headers.update(perf_headers(job.perf_metrics or {}))
    return JSONResponse(result, headers=headers)
