"""What the engine reports about a request after each step it took part in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens sampled since the previous output of this request
    new_text: str  # text since the previous output: UTF-8 complete, stop strings trimmed
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_output_tokens: int = 0  # all tokens sampled so far, EOS included
    # Timings (seconds, time.monotonic()) for perf metrics; filled by the engine.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # With SamplingParams.logprobs: one SampleResult (girandole.sampling.sampler) per new token.
    logprobs: list | None = None
    # With SamplingParams.prompt_logprobs, on the first output: one per prompt token, the first
    # None (no context to predict it from).
    prompt_logprobs: list | None = None
    # A pooling request's vector, on its finished output (girandole.engine.pooling).
    embedding: list[float] | None = None
    # Speculative decoding so far (girandole.engine.speculation.speculation_counts): tokens
    # "proposed" and "accepted", and with a prediction "prediction_tokens" (its length) and
    # "prediction_matched" (its tokens accepted). Empty when the request does not speculate.
    speculation: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class CompletionOutput:
    """Final result of one prompt in the synchronous `LLM.generate`."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    num_cached_tokens: int = 0
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    # why the engine ended it early (finish_reason "abort"): "ExceptionType: message"
    error: str | None = None
