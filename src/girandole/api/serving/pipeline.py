"""One inference request from its HTTP body to its response, for every endpoint.

    body -> the model's engine (target.py: the server's own, or a deployment's; 404, 503)
    -> validated request (the endpoint's schema) -> the endpoint's response shape
    -> grammar (response_format, or a forced tool call) -> prompt token ids (the endpoint's)
    -> Job: choices, one engine request each -> admission (ops) -> fan-out to the engine
    -> one collect loop or one stream loop -> the response

An endpoint family gives only what differs (an `Endpoint`); its route (`inference_router`) is
one call of `serve`. The way in, up to the engine (`receive`), is also the prefill-only
endpoints' (prefill.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from girandole.api.http.auth import require_api_key
from girandole.api.http.disconnect import with_cancellation
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.finite_json import render_in_pieces
from girandole.api.http.inprocess import inprocess_request
from girandole.api.http.json_body import parse_json_body
from girandole.api.http.openapi import body_doc
from girandole.api.http.schema import RequestFields
from girandole.api.http.sse import SSEResponse
from girandole.api.http.unsupported import strip_unsupported
from girandole.api.http.validation import (
    check_not_both,
    read_body,
    validate_model,
)
from girandole.api.ops.tracking import RequestRecord, attach_record, principal_of, record_of
from girandole.api.serving.cache_scope import scope_of
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.job import Job, build_job
from girandole.api.serving.params import check_logit_bias_size
from girandole.api.serving.prompt import off_loop_if_long
from girandole.api.serving.response import ResponseShape, engine_error
from girandole.api.serving.speculation import speculation_chars, speculation_tokens
from girandole.api.serving.structured import request_grammar
from girandole.api.serving.target import Target, engine_of, hold, resolve_target
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

    def background(self, req: Any) -> BackgroundStart | None:
        """How to start the request when it runs on after its HTTP request is answered
        (Responses' `background`); None: it is answered by `run`."""
        return None

    def adjust_job(self, req: Any, job: Job) -> None:
        """What the endpoint changes in its job's engine requests once built (nothing here;
        Anthropic's `max_tokens: 0` prefills the prompt: girandole.api.messages.route)."""

    def rename_field(self, exc: APIError, req: Any) -> None:
        """Name the field of a 400 from a check this endpoint shares with others (on `req`) as
        its own API names it (an endpoint of another API run as chat: girandole.api.messages.translated)."""


# starts a prepared request in the background (`rounds.request`: a detached copy of the
# request) and answers the request
BackgroundStart = Callable[[Request, "Rounds", ResponseShape, Job], Awaitable[Response]]


def inference_router(
    endpoint: Endpoint, path: str, name: str, summary: str, before_auth: Sequence[Any] = ()
) -> APIRouter:
    """The endpoint's POST route: one call of `serve`."""

    async def handler(request: Request) -> Response:
        return await serve(request, endpoint)

    return post_route(handler, endpoint.schema, path, name, summary, before_auth)


def post_route(
    handler: Callable[[Request], Awaitable[Response]],
    schema: type,
    path: str,
    name: str,
    summary: str,
    before_auth: Sequence[Any] = (),
) -> APIRouter:
    """An inference route: POST `path` (bearer key required) answered by `handler`, its body
    documented by `schema`. `before_auth`: dependencies that run first (a route's own error
    shape, so that a 401 has it too)."""
    router = APIRouter(dependencies=[*before_auth, Depends(require_api_key)])
    router.add_api_route(
        path,
        handler,
        methods=["POST"],
        name=name,
        summary=summary,
        openapi_extra=body_doc(schema),
    )
    return router


@dataclass(frozen=True)
class Received:
    """A request past the way in that every inference route shares (`receive`)."""

    state: AppState
    request_id: str
    received: float  # when the server got it (time.monotonic)
    target: Target | None  # the model it names (None: none named, the server's own)
    req: Any  # the endpoint's validated request
    engine: EngineClient  # the engine that runs it


async def receive(
    request: Request,
    id_prefix: str,
    parse: Callable[[AppState, dict[str, Any]], Awaitable[Any]],
    prompt_fields: Callable[[dict[str, Any]], dict[str, Any]] = lambda data: data,
) -> Received:
    """The way in of every inference route, generation and prefill-only alike: the body (size
    limit, a JSON object) -> the model's target (404) -> a hopelessly long prompt refused
    before any tokenizing (`prompt_fields`: the body's prompt text by field) -> the endpoint's
    validated request (`parse`; 400s) -> the engine that runs it (503)."""
    received = time.monotonic()
    state: AppState = request.app.state.girandole
    request_id = id_prefix + uuid.uuid4().hex
    request.state.request_id = request_id
    # a large body parsed in a thread, between whose values the loop runs (json_body.py)
    data = await parse_json_body(await read_body(request, state.settings.max_request_bytes))
    model = data.get("model")
    target = None
    if isinstance(model, str):  # unknown models and other accounts' models alike: 404
        target = resolve_target(request, state, model, request.headers.get("fireworks-deployment"))
        record = record_of(request)
        if record is not None:  # its end counts in the deployment's account metrics
            record.deployment = target.deployment or state.deployment
    request.state.target = target  # for a prompt `parse` reads from storage (Responses)
    state.ops.check_prompt_size(
        prompt_fields(data), target.context_length if target is not None else None
    )
    req = await parse(state, data)
    engine = engine_of(request, state, target)
    return Received(state, request_id, received, target, req, engine)


def check_generates(got: Received) -> None:
    """An embedding-only model (an encoder: engine/encoder.py) generates nothing: a 400 naming
    it and what it serves, before any prompt is built."""
    embedding = got.engine.model_config.embedding
    if embedding is not None and not embedding.generates:
        name = getattr(got.req, "model", None) or got.state.served.name
        serves = "/v1/rerank" if embedding.task == "cross-encoder" else "/v1/embeddings"
        raise bad_request(
            f"Model {name} is embedding-only (an encoder): it serves {serves}, not text generation",
            "model",
        )


async def serve(request: Request, endpoint: Endpoint, tier: int | None = None) -> Response:
    """The whole of an inference route. `tier`: the scheduling tier the server gives the
    request (batch-job lines: girandole.engine.scheduler.BATCH_TIER); None: its service_tier."""

    async def parse(state: AppState, data: dict[str, Any]) -> Any:
        if isinstance(data.get("logit_bias"), dict) and len(data["logit_bias"]) > 1024:
            vocab_size = engine_of(request, state, request.state.target).model_config.vocab_size
            check_logit_bias_size(data["logit_bias"], vocab_size)
        req = await endpoint.parse(request, state, data)
        state.ops.check_choices(endpoint.num_prompts(req), req.n or 1)
        return req

    got = await receive(request, endpoint.id_prefix, parse)
    check_generates(got)
    background = endpoint.background(got.req)
    rounds = Rounds(detached(request) if background else request, endpoint, got, tier)
    shape, job = await rounds.prepare(got.req)
    shape.rounds = rounds
    if background is not None:
        return await background(request, rounds, shape, job)
    return await run(request, got.state, got.engine, job, shape, got.target)


def detached(request: Request) -> Request:
    """A copy of `request` that runs on after it is answered: the same app, path and headers,
    a record of its own (the same key's: its usage row is written when the work ends), and a
    client that never hangs up. `request` keeps its own usage row until the work is handed
    off (`RequestRecord.handed_off`): a 400 before that is its row."""
    copy = inprocess_request(request.app, request.url.path, headers=request.scope["headers"])
    http = record_of(request)
    principal = principal_of(request)
    record = RequestRecord(
        "POST",
        request.url.path,
        http.client_request_id if http is not None else None,
        principal=principal,
        ops=http.ops if http is not None else None,
    )
    if http is not None:
        record.model, record.deployment = http.model, http.deployment
    attach_record(copy.scope, record)
    copy.state.principal = principal
    return copy


@dataclass(frozen=True)
class Rounds:
    """The engine rounds of one HTTP request. A request runs one; a response that feeds tool
    results back to the model (OpenAI Responses' MCP tool loop) runs another per step, each a
    new job of the same response id, under the request's admission slot, its usage counted
    with the request's (`RequestRecord.rounds`)."""

    request: Request
    endpoint: Endpoint
    got: Received
    tier: int | None

    async def prepare(self, req: Any) -> tuple[ResponseShape, Job]:
        """A request's shape and job: grammar (response_format, or a forced tool call), then
        prompt token ids, then one engine request per choice."""
        state, engine = self.got.state, self.got.engine
        shape = self.endpoint.shape(state, engine, req)
        try:
            grammar = await request_grammar(
                engine, req.response_format, shape.forced_grammar, shape.tools_check
            )
            prompts = await self.endpoint.prompts(engine, req, shape)
            context_length = state.context_length_of(engine)
            speculation = await off_loop_if_long(  # a long prediction: tokenized in a thread
                speculation_chars(req), speculation_tokens,
                req, engine.tokenizer, engine.model_config.vocab_size, context_length,
            )  # fmt: skip
            job = build_job(
                engine,
                req,
                self.got.request_id,
                prompts,
                default_max_tokens=self.endpoint.default_max_tokens,
                context_length=context_length,
                grammar=grammar,
                received=self.got.received,
                headers=self.request.headers,
                tier=self.tier,
                speculation=speculation,
                cache_scope=scope_of(principal_of(self.request), state.settings.prompt_cache_scope),
            )
            job.max_response_bytes = state.settings.max_response_bytes
            images = getattr(shape, "images", None)  # a vision model's prompt images
            if images:
                for choice in job.choices:
                    choice.engine_kwargs["images"] = images
            self.endpoint.adjust_job(req, job)
        except APIError as exc:  # a shared check's 400, named as the endpoint's API names it
            self.endpoint.rename_field(exc, req)
            raise
        return shape, job

    async def next(self, req: Any) -> tuple[ResponseShape, Job, ChoiceFanout]:
        """Another round: `req` prepared and started (its shape read for the chat side only)."""
        state = self.got.state
        shape, job = await self.prepare(req)
        # the prompt limit; the admission slot is the first round's
        fanout = await start_job(self.request, state, self.got.engine, job, self.got.target)
        record = record_of(self.request)
        if record is not None:
            record.rounds.append(job.choices)
        if job.stream:
            state.ops.track_stream(fanout)
        return shape, job, fanout


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
    fanout = await start_job(request, state, engine, job, target)
    if job.stream:
        state.ops.track_stream(fanout)
        body = shape.stream_body(job, fanout, state.settings.stream_usage)
        return SSEResponse(body, headers=headers)
    result = await shape.collect_body(job, fanout)
    headers.update(perf_headers(job.perf_metrics or {}))
    # written off the event loop, a choice at a time (json.dumps holds the GIL while it runs):
    # a 25 MB body (n 16, echo, logprobs 5) stalled every other request for seconds
    content = await asyncio.to_thread(render_in_pieces, result)
    return Response(content, headers=headers, media_type="application/json")


async def start_job(
    request: Request, state: AppState, engine: EngineClient, job: Job, target: Target | None
) -> ChoiceFanout:
    """Admit the job (the prompt limit; the admission queue (429/503) by tier: priority,
    default, batch lines) and start its engine requests."""
    record = record_of(request)
    if record is not None:
        record.metadata = job.metadata
    with hold(request, target):  # the wait for admission is no idle time of the deployment
        await state.ops.admit(record, job.choices, job.tier)
        fanout = ChoiceFanout(engine, job.choices, observer=record, on_abort=state.count_aborted)
        try:
            await fanout.start()
        except Exception as exc:  # noqa: BLE001 - a request the engine rejects is a 400
            raise engine_error(exc) from None
    return fanout
