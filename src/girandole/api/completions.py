"""The completions service: one validated request to engine requests, and back to a response.

Choices are indexed prompt-major: prompt i, sample k has index i * n + k.

Usage: `prompt_tokens` counts every prompt once (BOS included, as fed to the model), however
many samples it has; `completion_tokens` sums the tokens generated over all choices (EOS
included); `prompt_tokens_details.cached_tokens` counts, per prompt, the prompt tokens served
from the prefix cache (the smallest figure among that prompt's choices), summed over prompts.

Streaming (SSE): one chunk per new piece of text, one `text: ""` chunk with `finish_reason` per
choice, then (unless `stream_options.include_usage` is false) a usage chunk, then
`data: [DONE]`. With the default placement ("separate", Fireworks' 2026 spec) usage rides its own
final chunk with `choices: []`; with "finish" (the 2025 recordings) each finish chunk carries the
usage so far. An error after the stream started is sent as `data: {"error": {...}}` and the
stream ends without `[DONE]`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from girandole.api.errors import APIError, bad_request, internal_error
from girandole.api.fanout import ChoiceFanout, ChoiceRequest
from girandole.api.prompts import fit_max_tokens, tokenize_prompts
from girandole.api.sampling import build_params, choice_seed, sampling_defaults
from girandole.api.schemas.completions import CompletionRequest
from girandole.api.sse import DONE, sse_event
from girandole.engine.outputs import RequestOutput
from girandole.sampling.params import SamplingParams

logger = logging.getLogger("girandole.api")

DEFAULT_MAX_TOKENS = 16
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "error"}


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class CompletionJob:
    """A request ready to run: its choices and what the response needs to echo."""

    id: str
    created: int
    model: str  # as the client sent it
    n: int
    prompt_token_ids: list[list[int]]
    choices: list[ChoiceRequest]
    stream: bool
    include_usage: bool

    def prompt_index(self, choice_index: int) -> int:
        return choice_index // self.n


# Request fields that map straight onto SamplingParams (see `build_params`).
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "ignore_eos"}


def choice_params(req: Any, defaults: dict[str, Any], max_tokens: int, k: int) -> SamplingParams:
    """Sample k's SamplingParams. Shared with /chat/completions (`girandole.api.chat`), whose
    request model has the same sampling fields: read fields that only one of the two has with
    `getattr(req, name, None)`."""
    return build_params(
        req.model_dump(include=SAMPLING_FIELDS),
        defaults,
        max_tokens=max_tokens,
        stop=req.stop_list(),
        seed=choice_seed(req.seed, k),
    )


async def prepare(
    engine: Any, req: CompletionRequest, request_id: str, model: str, context_length: int
) -> CompletionJob:
    config = engine.model_config
    prompts = await tokenize_prompts(engine.tokenizer, req.prompts(), config.vocab_size)
    n = req.n or 1
    requested = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    if requested is None:
        requested = DEFAULT_MAX_TOKENS
    behavior = req.context_length_exceeded_behavior or "truncate"
    defaults = sampling_defaults(getattr(config, "generation_config", None))
    choices: list[ChoiceRequest] = []
    for i, ids in enumerate(prompts):
        max_tokens = fit_max_tokens(len(ids), requested, context_length, behavior)
        for k in range(n):
            params = choice_params(req, defaults, max_tokens, k)
            index = i * n + k
            choices.append(ChoiceRequest(index, i, ids, params, f"{request_id}-{index}"))
    include_usage = True
    if req.stream_options is not None and req.stream_options.include_usage is False:
        include_usage = False
    return CompletionJob(
        id=request_id,
        created=int(time.time()),
        model=model,
        n=n,
        prompt_token_ids=prompts,
        choices=choices,
        stream=bool(req.stream),
        include_usage=include_usage,
    )


def _usage(job: CompletionJob, states: dict[int, ChoiceState]) -> dict[str, Any]:
    prompt_tokens = sum(len(ids) for ids in job.prompt_token_ids)
    completion_tokens = sum(s.num_output_tokens for s in states.values())
    cached: dict[int, int] = {}
    for index, state in states.items():
        p = job.prompt_index(index)
        cached[p] = min(cached.get(p, state.num_cached_tokens), state.num_cached_tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }


def _record(state: ChoiceState, out: RequestOutput) -> None:
    if out.new_text:
        state.text.append(out.new_text)
    state.num_output_tokens = max(state.num_output_tokens, out.num_output_tokens)
    state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
    if out.finished:
        state.finish_reason = _FINISH_REASONS.get(out.finish_reason or "", "stop")


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if type(exc).__name__ == "EngineDeadError":
        logger.error("the engine is not running: %s", exc)
        return APIError(
            503, "The engine is not running", type="service_unavailable", code="UNAVAILABLE"
        )
    logger.error("request failed in the engine", exc_info=exc)
    return internal_error()


async def start(
    engine: Any, job: CompletionJob, on_abort: Callable[[int], None] | None = None
) -> ChoiceFanout:
    """Start the engine requests; a request the engine rejects becomes a 400."""
    fanout = ChoiceFanout(engine, job.choices, on_abort)
    try:
        await fanout.start()
    except Exception as exc:  # noqa: BLE001
        raise _engine_error(exc) from None
    return fanout


async def collect(job: CompletionJob, fanout: ChoiceFanout) -> dict[str, Any]:
    """The whole (non-streamed) response body."""
    states = {c.index: ChoiceState() for c in job.choices}
    try:
        async for index, out in fanout.events():
            _record(states[index], out)
    except Exception as exc:  # noqa: BLE001
        raise _engine_error(exc) from None
    finally:
        fanout.close()
    choices = [
        {
            "index": index,
            "text": "".join(states[index].text),
            "logprobs": None,
            "finish_reason": states[index].finish_reason,
        }
        for index in sorted(states)
    ]
    return {
        "id": job.id,
        "object": "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": _usage(job, states),
    }


def _chunk(job: CompletionJob, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
    return sse_event(
        {
            "id": job.id,
            "object": "text_completion",
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": usage,
        }
    )


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


async def stream(
    job: CompletionJob, fanout: ChoiceFanout, usage_placement: str = "separate"
) -> AsyncIterator[bytes]:
    """The SSE body. Closing it (client gone) aborts the engine requests."""
    states = {c.index: ChoiceState() for c in job.choices}
    try:
        async for index, out in fanout.events():
            state = states[index]
            _record(state, out)
            if out.new_text:
                yield _chunk(job, [_choice(index, out.new_text, None)])
            if out.finished:
                usage = None
                if job.include_usage and usage_placement == "finish":
                    usage = _usage(job, states)
                yield _chunk(job, [_choice(index, "", state.finish_reason)], usage)
        if job.include_usage and usage_placement != "finish":
            yield _chunk(job, [], _usage(job, states))
        yield DONE
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
        error = _engine_error(exc)
        yield sse_event({"error": error.body(job.id)["error"]})
    finally:
        fanout.close()
