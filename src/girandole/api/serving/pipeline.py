"""One inference request from its HTTP body to its response, for every endpoint.

    body -> the model's engine (target.py: the server's own, or a deployment's; 404, 503)
    -> validated request (the endpoint's schema) -> the endpoint's response shape
    -> grammar (response_format, or a forced tool call) -> prompt token ids (the endpoint's)
    -> Job: choices, one engine request each -> admission (ops) -> fan-out to the engine
    -> one collect loop or one stream loop -> the response

An endpoint family gives only what differs (an `Endpoint`); its route (`inference_router`) is
one call of `serve`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from girandole.api.http.auth import require_api_key
from girandole.api.http.disconnect import with_cancellation
from girandole.api.http.openapi import body_doc
from girandole.api.http.schema import RequestFields
from girandole.api.http.sse import SSEResponse
from girandole.api.http.unsupported import strip_unsupported
from girandole.api.http.validation import (
    check_not_both,
    parse_json_object,
    read_body,
    validate_model,
)
from girandole.api.ops.tracking import record_of
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.job import Job, build_job
from girandole.api.serving.response import ResponseShape, engine_error
from girandole.api.serving.structured import request_grammar
from girandole.api.serving.target import Target, engine_of, resolve_target, touch
from girandole.api.serving.usage import perf_headers
from girandole.engine.protocol import EngineClient

if TYPE_CHECKING:
    from girandole.api.state import AppState


@dataclass(frozen=True)
class Endpoint:
    """What differs between inference endpoints: an endpoint family subclasses it."""

    schema: type[RequestFields]
    unsupported: dict[str, Callable[[Any], bool]]  # girandole.api.http.unsupported
    id_prefix: str  # of response ids: "cmpl-", "chatcmpl-"
    default_max_tokens: int

    def shape(self, state: AppState, engine: EngineClient, req: Any) -> ResponseShape:
        """How this request's response is written (a 400 for what the endpoint cannot do)."""
        return ResponseShape()

    def num_prompts(self, req: Any) -> int:
        """How many prompts the request holds (each runs `n` choices)."""
        return 1

    async def prompts(self, engine: EngineClient, req: Any, shape: Any) -> list[list[int]]:
        """The request's prompts as token ids."""
        raise NotImplementedError

    async def parse(self, request: Request, state: AppState, data: dict[str, Any]) -> Any:
        """The validated request from its JSON body (an endpoint of another API translates it
        here into the request its prompts and shape read)."""
        strip_unsupported(data, self.unsupported)
        check_not_both(data, "max_tokens", "max_completion_tokens")
        return validate_model(self.schema, data)


def inference_router(
    endpoint: Endpoint, path: str, name: str, summary: str, before_auth: Sequence[Any] = ()
) -> APIRouter:
    """The endpoint's POST route (bearer key required): one call of `serve`. `before_auth`:
    dependencies that run first (a route's own error shape, so that a 401 has it too)."""
    router = APIRouter(dependencies=[*before_auth, Depends(require_api_key)])

    async def handler(request: Request) -> Response:
        return await serve(request, endpoint)

    router.add_api_route(
        path,
        handler,
        methods=["POST"],
        name=name,
        summary=summary,
        openapi_extra=body_doc(endpoint.schema),
    )
    return router


async def serve(request: Request, endpoint: Endpoint) -> Response:
    """The whole of an inference route."""
    received = time.monotonic()
    state: AppState = request.app.state.girandole
    request_id = endpoint.id_prefix + uuid.uuid4().hex
    request.state.request_id = request_id
    data = parse_json_object(await read_body(request, state.settings.max_request_bytes))
    model = data.get("model")
    target = None
    if isinstance(model, str):  # unknown models and other accounts' models alike: 404
        target = resolve_target(request, state, model, request.headers.get("fireworks-deployment"))
    state.ops.check_prompt_size(data, target.context_length if target is not None else None)
    req = await endpoint.parse(request, state, data)
    state.ops.check_choices(endpoint.num_prompts(req), req.n or 1)
    engine = engine_of(request, state, target)
    shape = endpoint.shape(state, engine, req)
    grammar = await request_grammar(engine, req.response_format, shape.forced_grammar)
    prompts = await endpoint.prompts(engine, req, shape)
    job = build_job(
        engine,
        req,
        request_id,
        prompts,
        default_max_tokens=endpoint.default_max_tokens,
        context_length=state.context_length_of(engine),
        grammar=grammar,
        received=received,
        headers=request.headers,
    )
    return await run(request, state, engine, job, shape, target)


@with_cancellation
async def run(
    request: Request,
    state: AppState,
    engine: EngineClient,
    job: Job,
    shape: ResponseShape,
    target: Target | None,
) -> Response:
    """Admit the job, start its engine requests, and answer: whole, or as a stream."""
    headers = {
        "x-request-id": request.headers.get("x-request-id") or job.id,
        "fireworks-sampling-options": json.dumps(job.sampling_options, separators=(",", ":")),
    }
    record = record_of(request)
    if record is not None:
        record.metadata = job.metadata
    # prompt limit; admission queue (429/503), priority requests first
    await state.ops.admit(record, job.choices, job.priority)
    touch(request, target)  # the wait for admission is no idle time of the deployment
    fanout = ChoiceFanout(engine, job.choices, observer=record, on_abort=state.count_aborted)
    try:
        await fanout.start()
    except Exception as exc:  # noqa: BLE001 - a request the engine rejects is a 400
        raise engine_error(exc) from None
    if job.stream:
        state.ops.track_stream(fanout)
        body = shape.stream_body(job, fanout, state.settings.stream_usage)
        return SSEResponse(body, headers=headers)
    result = await shape.collect_body(job, fanout)
    headers.update(perf_headers(job.perf_metrics or {}))
    return JSONResponse(result, headers=headers)
