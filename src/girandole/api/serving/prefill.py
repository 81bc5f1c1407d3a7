"""Prefill-only requests (embeddings, rerank) from their HTTP body to their response.

    body -> the model's engine (target.py) -> validated request (the endpoint's schema)
    -> engine requests as Choices (the endpoint's: pooled vectors or scored prompts)
    -> admission (ops) -> fan-out to the engine -> each choice's final output
    -> the endpoint's response body

The same operations as generation: the bearer key, rate limits, the admission queue, metrics
and the usage row (prompt tokens; nothing is generated) come from `ServerOps` through the
request's record, which is the fan-out's observer. An endpoint gives only its schema, its
engine requests and its response (`PrefillEndpoint`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fastapi import APIRouter, Request
from fastapi.responses import Response

from girandole.api.http.disconnect import with_cancellation
from girandole.api.http.errors import APIError
from girandole.api.http.finite_json import render_in_pieces
from girandole.api.http.unsupported import strip_unsupported
from girandole.api.http.validation import validate_model
from girandole.api.ops.tracking import record_of
from girandole.api.serving.choice import Choice, OutputOptions
from girandole.api.serving.fanout import ChoiceFanout
from girandole.api.serving.pipeline import post_route, receive
from girandole.api.serving.response import engine_error
from girandole.api.serving.target import hold
from girandole.api.serving.usage import count_usage
from girandole.engine.outputs import RequestOutput
from girandole.engine.protocol import EngineClient
from girandole.sampling.params import SamplingParams

if TYPE_CHECKING:
    from girandole.api.state import AppState


@dataclass(frozen=True)
class Prefill:
    """One engine request of a prefill-only endpoint: a prompt, and either a pooling method
    (a vector comes back) or `score` (the prompt's own log-probabilities come back)."""

    prompt_token_ids: list[int]
    engine_kwargs: dict[str, Any]  # AsyncEngine.generate's: pooling=PoolingParams(...)
    score: bool = False  # prompt_logprobs: each prompt token's log-probability


@dataclass(frozen=True)
class PrefillEndpoint:
    """What differs between prefill-only endpoints: subclassed by embeddings and rerank."""

    schema: type
    unsupported: dict[str, Any]  # girandole.api.http.unsupported tables
    id_prefix: str
    prompt_field: ClassVar[str] = "input"  # the body field a too-long prompt's 400 names

    def prompt_fields(self, data: dict[str, Any]) -> dict[str, Any]:
        """The text of the body's longest prompt, by field, to refuse a hopelessly long one
        before tokenizing it (ServerOps.check_prompt_size)."""
        return {}

    async def requests(self, engine: EngineClient, req: Any) -> list[Prefill]:
        raise NotImplementedError

    def respond(
        self, engine: EngineClient, req: Any, outputs: list[RequestOutput]
    ) -> dict[str, Any]:
        """The response body from each request's final output (in `requests`' order)."""
        raise NotImplementedError

    def usage_fields(self, request_id: str, prompt_tokens: int) -> dict[str, Any]:
        """What the body adds about its cost: OpenAI's `usage` (nothing is generated)."""
        return {"usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def prefill_router(endpoint: PrefillEndpoint, path: str, name: str, summary: str) -> APIRouter:
    async def handler(request: Request) -> Response:
        return await serve_prefill(request, endpoint)

    return post_route(handler, endpoint.schema, path, name, summary)


async def serve_prefill(
    request: Request, endpoint: PrefillEndpoint, tier: int | None = None
) -> Response:
    """The whole of a prefill-only route. `tier`: the scheduling tier the server gives the
    request (batch-job lines: girandole.engine.scheduler.BATCH_TIER); None: the default."""

    async def parse(state: AppState, data: dict[str, Any]) -> Any:
        strip_unsupported(data, endpoint.unsupported)
        return validate_model(endpoint.schema, data)

    got = await receive(request, endpoint.id_prefix, parse, endpoint.prompt_fields)
    engine = got.engine
    prefills = await endpoint.requests(engine, got.req)
    choices = [
        Choice(
            i,
            i,
            p.prompt_token_ids,
            SamplingParams(max_tokens=0, prompt_logprobs=0 if p.score else None),
            f"{got.request_id}-{i}",
            engine.tokenizer,
            OutputOptions(),
            {**p.engine_kwargs, "priority": tier} if tier else p.engine_kwargs,
        )
        for i, p in enumerate(prefills)
    ]
    return await _run(request, got.state, engine, endpoint, got.req, choices, got.target, tier or 0)


@with_cancellation
async def _run(
    request: Request,
    state: AppState,
    engine: EngineClient,
    endpoint: PrefillEndpoint,
    req: Any,
    choices: list[Choice],
    target: Any,
    tier: int = 0,
) -> Response:
    record = record_of(request)
    if record is not None and record.model is None:
        record.model = state.served.name
    # its inputs run a window at a time, on part of the slots: others are served beside it
    admission = state.ops.admission
    window = admission.prefill_window(len(choices))
    admission.num_prefill += window  # until it ends: a prefill request beside it gets less
    try:
        # its inputs go a window at a time (its engine may run none of them between two):
        # the deployment is held, not idle, from the admission queue to the last result
        with hold(request, target):
            # the prompt limit (400); the admission queue (429/503)
            await state.ops.admit(record, choices, tier, window, endpoint.prompt_field)
            started = time.monotonic()
            fanout = ChoiceFanout(
                engine, choices, observer=record, on_abort=state.count_aborted, max_in_flight=window
            )
            try:
                await fanout.start()
                final: dict[int, RequestOutput] = {}
                async for choice, out in fanout.events():
                    choice.sent.advance(out)
                    if out.finished:
                        final[choice.index] = out
            except APIError:
                raise
            except Exception as exc:  # noqa: BLE001 - a request the engine rejects is a 400
                raise engine_error(exc) from None
            finally:
                fanout.close()
    finally:
        admission.num_prefill -= window
    missing = [c.index for c in choices if c.index not in final or final[c.index].extra]
    if missing:  # an engine request that ended without its result (aborted, failed)
        raise engine_error(RuntimeError(f"input {missing[0]} ended without a result"))
    outputs = [final[c.index] for c in choices]
    usage = count_usage(choices)

    def body_bytes() -> bytes:
        body = endpoint.respond(engine, req, outputs)
        if "model" in body and body["model"] is None:  # no model named: the server's own
            body["model"] = state.served.name
        body.update(endpoint.usage_fields(request.state.request_id, usage.prompt_tokens))
        return render_in_pieces(body)

    headers = {
        "x-request-id": request.headers.get("x-request-id") or request.state.request_id,
        "fireworks-prompt-tokens": str(usage.prompt_tokens),
        "fireworks-server-processing-time": str(round(time.monotonic() - started, 6)),
    }
    # off the event loop: thousands of vectors take ~1 s to shape and write (streams beside)
    content = await asyncio.to_thread(body_bytes)
    return Response(content, headers=headers, media_type="application/json")
