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

Logprobs, echo, raw_output, return_token_ids, perf metrics and prompt-cache keys are shared
with chat (`girandole.api.introspection`). In streams: echoed prompt text (and its logprobs)
leads each choice's first chunk, `prompt_token_ids` rides each choice's first chunk and
`token_ids` every chunk, `raw_output` the choice's finish chunk, and `perf_metrics` the final
chunk (the usage chunk, or the last finish chunk when usage rides the finish chunks or is off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from girandole.api.errors import APIError, bad_request, internal_error
from girandole.api.fanout import ChoiceFanout, ChoiceRequest
from girandole.api.introspection import (
    ChoiceOutput,
    OutputOptions,
    cache_kwargs,
    output_options,
    perf_metrics,
)
from girandole.api.prompts import fit_max_tokens, tokenize_prompts
from girandole.api.sampling import (
    applied_options,
    build_params,
    choice_seed,
    parse_logit_bias,
    sampling_defaults,
)
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
    tokenizer: Any = None
    options: OutputOptions = field(default_factory=OutputOptions)
    received: float = field(default_factory=time.monotonic)  # the route sets when it got it
    prepared: float = field(default_factory=time.monotonic)  # tokenized, ready to run
    sampling_options: dict[str, Any] = field(default_factory=dict)  # choice 0's, as applied
    perf_metrics: dict[str, Any] | None = None  # set once every choice finished

    def prompt_index(self, choice_index: int) -> int:
        return choice_index // self.n


# Request fields that map straight onto SamplingParams (see `build_params`).
SAMPLING_FIELDS = {
    "temperature", "top_p", "top_k", "min_p", "typical_p", "ignore_eos", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "mirostat_target", "mirostat_lr",
}  # fmt: skip


def choice_params(
    req: Any,
    defaults: dict[str, Any],
    max_tokens: int,
    k: int,
    *,
    logit_bias: dict[int, float] | None = None,
    options: OutputOptions | None = None,
) -> SamplingParams:
    """Sample k's SamplingParams. Shared with /chat/completions (`girandole.api.chat`), whose
    request model has the same sampling fields: read fields that only one of the two has with
    `getattr(req, name, None)`. `options` sets logprobs and prompt_logprobs."""
    params = build_params(
        req.model_dump(include=SAMPLING_FIELDS),
        defaults,
        max_tokens=max_tokens,
        stop=req.stop_list(),
        seed=choice_seed(req.seed, k),
        logit_bias=logit_bias,
    )
    if options is not None and options.logprobs_mode is not None:
        params.logprobs = options.num_top
        params.prompt_logprobs = options.prompt_logprobs
    return params


async def prepare(
    engine: Any,
    req: CompletionRequest,
    request_id: str,
    model: str,
    context_length: int,
    headers: Any = None,
) -> CompletionJob:
    config = engine.model_config
    prompts = await tokenize_prompts(engine.tokenizer, req.prompts(), config.vocab_size)
    options = output_options(req)
    logit_bias = parse_logit_bias(req.logit_bias, config.vocab_size)
    engine_kwargs = cache_kwargs(req, headers)
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
            params = choice_params(
                req, defaults, max_tokens, k, logit_bias=logit_bias, options=options
            )
            index = i * n + k
            choices.append(
                ChoiceRequest(index, i, ids, params, f"{request_id}-{index}", engine_kwargs)
            )
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
        tokenizer=engine.tokenizer,
        options=options,
        sampling_options=applied_options(choices[0].params),
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


def new_outputs(job: CompletionJob) -> dict[int, ChoiceOutput]:
    outputs = {
        c.index: ChoiceOutput(job.tokenizer, job.options, c.prompt_token_ids) for c in job.choices
    }
    for c in job.choices:  # raw_output.grammar: the grammar constrained decoding used
        if c.params.grammar is not None:
            outputs[c.index].grammar = c.params.grammar.describe()
    return outputs


def finish_metrics(
    job: CompletionJob, states: dict[int, ChoiceState], outputs: dict[int, ChoiceOutput]
) -> dict[str, Any]:
    """Usage and perf metrics once every choice finished (perf also kept on the job)."""
    usage = _usage(job, states)
    lasts = [o.last for o in outputs.values()]
    job.perf_metrics = perf_metrics(usage, lasts, job.received, job.prepared)
    return usage


async def collect(job: CompletionJob, fanout: ChoiceFanout) -> dict[str, Any]:
    """The whole (non-streamed) response body."""
    states = {c.index: ChoiceState() for c in job.choices}
    outputs = new_outputs(job)
    try:
        async for index, out in fanout.events():
            _record(states[index], out)
            outputs[index].add(out)
    except Exception as exc:  # noqa: BLE001
        raise _engine_error(exc) from None
    finally:
        fanout.close()
    choices = []
    for index in sorted(states):
        o = outputs[index]
        choices.append(
            {
                "index": index,
                "text": o.full_text,
                "logprobs": o.logprobs(o.tracker.entries),
                "finish_reason": states[index].finish_reason,
                **o.extras(),
            }
        )
    usage = finish_metrics(job, states, outputs)
    perf = job.perf_metrics if job.options.perf_metrics else None
    return envelope(job, "text_completion", choices, usage, perf)


def envelope(
    job: CompletionJob, obj: str, choices: list[dict[str, Any]], usage: Any, perf: Any = None
) -> dict[str, Any]:
    """The body around the choices, shared by completions and chat, whole and in chunks."""
    body: dict[str, Any] = {
        "id": job.id,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": usage,
    }
    if perf is not None:
        body["perf_metrics"] = perf
    return body


def _chunk(
    job: CompletionJob, choices: list[dict[str, Any]], usage: Any = None, perf: Any = None
) -> bytes:
    return sse_event(envelope(job, "text_completion", choices, usage, perf))


def _choice(index: int, text: str, finish_reason: str | None, logprobs: Any = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


async def stream(
    job: CompletionJob, fanout: ChoiceFanout, usage_placement: str = "separate"
) -> AsyncIterator[bytes]:
    """The SSE body. Closing it (client gone) aborts the engine requests."""
    states = {c.index: ChoiceState() for c in job.choices}
    outputs = new_outputs(job)
    opts = job.options
    sent_prompt_ids: set[int] = set()
    unfinished = len(states)
    separate = job.include_usage and usage_placement != "finish"
    try:
        async for index, out in fanout.events():
            state, o = states[index], outputs[index]
            _record(state, out)
            update = o.add(out)
            extras = opts.return_token_ids and bool(update.token_ids)
            if update.text or update.entries or extras:
                c = _choice(index, update.text, None, o.logprobs(update.entries))
                if opts.return_token_ids:
                    if index not in sent_prompt_ids:
                        c["prompt_token_ids"] = list(o.prompt_ids)
                        sent_prompt_ids.add(index)
                    c["token_ids"] = update.token_ids
                yield _chunk(job, [c])
            if out.finished:
                unfinished -= 1
                usage = perf = None
                if unfinished == 0:
                    finish_usage = finish_metrics(job, states, outputs)
                    if opts.perf_metrics and not separate:
                        perf = job.perf_metrics
                if job.include_usage and usage_placement == "finish":
                    usage = finish_usage if unfinished == 0 else _usage(job, states)
                final = _choice(index, "", state.finish_reason)
                if opts.return_token_ids and index not in sent_prompt_ids:
                    final["prompt_token_ids"] = list(o.prompt_ids)
                    final["token_ids"] = []
                    sent_prompt_ids.add(index)
                if opts.raw_output:
                    final["raw_output"] = o.raw_output()
                yield _chunk(job, [final], usage, perf)
        if separate:
            perf = job.perf_metrics if opts.perf_metrics else None
            yield _chunk(job, [], finish_metrics(job, states, outputs), perf)
        yield DONE
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
        error = _engine_error(exc)
        yield sse_event({"error": error.body(job.id)["error"]})
    finally:
        fanout.close()
