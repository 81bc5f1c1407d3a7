"""A validated request made ready to run: its choices (one engine request each, prompt-major:
prompt i, sample k has index i * n + k), their SamplingParams, and what the response echoes.

Omitted fields take the model's defaults (`girandole.api.serving.params`); `max_tokens` falls
back to the endpoint's default and is fitted to the context per prompt
(`girandole.api.serving.prompt`). Prompt cache: `prompt_cache_isolation_key` (or the
`x-prompt-cache-isolation-key` header; the field wins) salts the prefix-cache hashes, so
different keys never share blocks; `prompt_cache_max_len` caps the reused prefix (0 = no reuse).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from girandole.api.http.schema import RequestFields
from girandole.api.http.unsupported import unsupported_field
from girandole.api.serving.buffering import StreamBuffer
from girandole.api.serving.cache_scope import cache_salt
from girandole.api.serving.choice import Choice, OutputOptions, output_options
from girandole.api.serving.params import (
    applied_options,
    build_params,
    choice_seed,
    parse_logit_bias,
    sampling_defaults,
    special_stop_ids,
)
from girandole.api.serving.prompt import fit_max_tokens
from girandole.engine.protocol import EngineClient
from girandole.sampling.grammar import GrammarSpec
from girandole.sampling.params import SamplingParams

# Request fields that map straight onto SamplingParams (see `build_params`).
SAMPLING_FIELDS = {
    "temperature", "top_p", "top_k", "min_p", "typical_p", "ignore_eos", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "mirostat_target", "mirostat_lr",
}  # fmt: skip


@dataclass
class Job:
    """A request ready to run: its choices and what the response needs to echo."""

    id: str
    model: str  # as the client sent it
    n: int
    choices: list[Choice]
    stream: bool
    include_usage: bool
    options: OutputOptions
    received: float  # when the server got the request (time.monotonic)
    # the admission and engine queues' tier: 1 service_tier "priority", 0 the default, -1 a
    # batch-job line (girandole.engine.scheduler.BATCH_TIER)
    tier: int = 0
    metadata: dict[str, str] | None = None  # kept with the request's usage row
    buffer: StreamBuffer | None = None  # stream_options.buffer_*: chunks coalesced
    internal_content: bool = False  # stream_options.include_internal_content
    prepared: float = field(default_factory=time.monotonic)  # tokenized, ready to run
    created: int = field(default_factory=lambda: int(time.time()))
    sampling_options: dict[str, Any] = field(default_factory=dict)  # choice 0's, as applied
    perf_metrics: dict[str, Any] | None = None  # set once every choice finished
    max_response_bytes: int | None = None  # a whole response larger is a 400 (None: no limit)


def cache_kwargs(
    req: RequestFields, headers: Mapping[str, str] | None, scope: str | None = None
) -> dict[str, Any]:
    """AsyncEngine.generate's prefix-cache arguments from the request, its headers and the
    server's cache scope for its key (girandole.api.serving.cache_scope)."""
    key = req.prompt_cache_isolation_key
    if key is None and headers is not None:
        key = headers.get("x-prompt-cache-isolation-key") or None
    salt = cache_salt(scope, key)
    out: dict[str, Any] = {}
    if salt is not None:
        out["cache_salt"] = salt
    if req.prompt_cache_max_len is not None:
        out["prefix_cache_max_len"] = req.prompt_cache_max_len
    return out


def max_tokens_field(req: RequestFields) -> str | None:
    """The field the request's length limit came in; None: it set none (the endpoint's default)."""
    if req.max_tokens is not None:
        return "max_tokens"
    return "max_completion_tokens" if req.max_completion_tokens is not None else None


def choice_params(
    req: RequestFields,
    defaults: dict[str, Any],
    max_tokens: int,
    k: int,
    *,
    logit_bias: dict[int, float] | None = None,
    options: OutputOptions | None = None,
    stop_token_ids: list[int] | None = None,
) -> SamplingParams:
    """Sample k's SamplingParams. `options` sets logprobs and prompt_logprobs;
    `stop_token_ids`: the special tokens among the stop strings (`special_stop_ids`)."""
    params = build_params(
        req.model_dump(include=SAMPLING_FIELDS),
        defaults,
        max_tokens=max_tokens,
        stop=req.stop_list(),
        stop_token_ids=stop_token_ids,
        seed=choice_seed(req.seed, k),
        logit_bias=logit_bias,
    )
    if options is not None and options.logprobs_mode is not None:
        params.logprobs = options.num_top
        params.prompt_logprobs = options.prompt_logprobs
        params.sampling_mask = options.sampling_mask
        params.routing_matrix = options.routing_matrix
    return params


def build_job(
    engine: EngineClient,
    req: RequestFields,
    request_id: str,
    prompts: list[list[int]],
    *,
    default_max_tokens: int,
    context_length: int,
    grammar: GrammarSpec | None,
    received: float,
    headers: Mapping[str, str] | None = None,
    tier: int | None = None,
    speculation: list[int] | None = None,
    cache_scope: str | None = None,
) -> Job:
    """The request's choices: n samples of each prompt, each with its SamplingParams. `tier`:
    the scheduling tier when the server sets it (batch lines), else the request's
    service_tier. `speculation`: the prediction's tokens (`speculation_tokens`).
    `cache_scope`: who may share its cached prompt blocks (`cache_scope.scope_of`)."""
    config = engine.model_config
    if req.include_routing_matrix and not config.num_moe_layers:
        raise unsupported_field("include_routing_matrix")  # a dense model: no router
    options = output_options(req)
    logit_bias = parse_logit_bias(req.logit_bias, config.vocab_size)
    engine_kwargs = cache_kwargs(req, headers, cache_scope)
    if tier is None:
        tier = 1 if req.service_tier == "priority" else 0
    if tier:
        engine_kwargs["priority"] = tier
    if options.prompt_logprobs is not None and options.echo_last is not None:
        # only the echoed tokens are scored: the LM head skips the rest of the prompt, and the
        # positions before them may come from the prefix cache
        engine_kwargs["prompt_logprobs_last"] = options.echo_last
    n = req.n or 1
    requested = req.requested_max_tokens(default_max_tokens)
    tokens_param = max_tokens_field(req)
    behavior = req.context_length_exceeded_behavior or "truncate"
    defaults = sampling_defaults(config.generation_config)
    stop_token_ids = special_stop_ids(req.stop_list(), engine.tokenizer)
    prompt_param = "messages" if getattr(req, "messages", None) is not None else "prompt"
    choices: list[Choice] = []
    for i, ids in enumerate(prompts):
        max_tokens = fit_max_tokens(
            len(ids), requested, context_length, behavior, prompt_param, tokens_param
        )
        first = choice_params(
            req,
            defaults,
            max_tokens,
            0,
            logit_bias=logit_bias,
            options=options,
            stop_token_ids=stop_token_ids,
        )
        for k in range(n):
            # the prompt's other samples differ only in their seed: a copy, not a new
            # SamplingParams whose checks walk every logit_bias key again (n 64 of a
            # vocabulary-wide bias held the event loop for seconds)
            params = first if k == 0 else copy.copy(first)
            params.seed = choice_seed(req.seed, k)
            params.grammar = grammar
            params.speculation = speculation
            index = i * n + k
            choices.append(
                Choice(
                    index,
                    i,
                    ids,
                    params,
                    f"{request_id}-{index}",
                    engine.tokenizer,
                    options,
                    engine_kwargs,
                )  # fmt: skip
            )
    return Job(
        id=request_id,
        model=req.model,
        n=n,
        choices=choices,
        stream=bool(req.stream),
        include_usage=req.include_usage,
        options=options,
        received=received,
        tier=tier,
        metadata=req.metadata,
        buffer=StreamBuffer.of(req.stream_options),
        internal_content=bool(req.stream_options and req.stream_options.include_internal_content),
        sampling_options=applied_options(choices[0].params),
    )
