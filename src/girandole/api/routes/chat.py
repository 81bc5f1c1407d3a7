"""POST /v1/chat/completions (also under /inference/v1)."""

from __future__ import annotations

import contextlib
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from girandole.api import chat
from girandole.api.auth import require_api_key
from girandole.api.body import read_body
from girandole.api.disconnect import ClientDisconnected, unless_disconnected
from girandole.api.errors import model_not_found
from girandole.api.introspection import perf_headers
from girandole.api.routes.completions import CLIENT_CLOSED, response_headers
from girandole.api.schemas.chat import ChatCompletionRequest
from girandole.api.sse import SSEResponse
from girandole.api.unsupported import CHAT_UNSUPPORTED, strip_unsupported
from girandole.api.validation import check_not_both, parse_json_object, validate_model

router = APIRouter(dependencies=[Depends(require_api_key)])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
    }
}


@router.post("/chat/completions", openapi_extra=_BODY_DOC, summary="Create a chat completion")
async def create_chat_completion(request: Request) -> Response:
    received = time.monotonic()
    state = request.app.state.girandole
    request_id = chat.new_chat_id()
    request.state.request_id = request_id
    data = parse_json_object(await read_body(request, state.settings.max_request_bytes))
    model = data.get("model")
    if isinstance(model, str):  # unknown models and other accounts' models alike: 404
        if state.ops.resolve(request, model, request.headers.get("fireworks-deployment")) is None:
            raise model_not_found()
    state.ops.check_prompt_size(data)
    strip_unsupported(data, CHAT_UNSUPPORTED)
    check_not_both(data, "max_tokens", "max_completion_tokens")
    req = validate_model(ChatCompletionRequest, data)
    engine = state.require_engine()
    template = chat.chat_template_for(engine.tokenizer, getattr(state, "chat_template", None))
    cj = await chat.prepare(
        engine, req, request_id, req.model, state.context_length, template, request.headers
    )
    cj.job.received = received
    headers = response_headers(request, request_id, cj.job.sampling_options)
    try:
        fanout = await unless_disconnected(request, chat.start(engine, cj.job, state.count_aborted))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    if cj.job.stream:
        return SSEResponse(chat.stream(cj, fanout, state.settings.stream_usage), headers=headers)
    try:
        result = await unless_disconnected(request, chat.collect(cj, fanout))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        with contextlib.suppress(Exception):
            fanout.close()
    headers.update(perf_headers(cj.job.perf_metrics or {}))
    return JSONResponse(result, headers=headers)
