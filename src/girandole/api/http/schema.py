"""Pieces shared by request schemas: strict config, collapsed union errors, the fields both
inference endpoints take (`RequestFields`), and `response_format`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

# Fireworks rejects unknown fields (additionalProperties: false). Types are strict: "1" is not
# a number and true is not an integer, but an integer is a valid float.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class StrictModel(BaseModel):
    model_config = STRICT


def one_error(kind: str, message: str):
    """A wrap validator that turns every error of a union into one message about the field."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            # keep errors that already say something specific (too many items, ...)
            for err in exc.errors():
                if err["type"] in ("too_long", "too_short", kind):
                    raise PydanticCustomError(kind, err["msg"]) from None
            raise PydanticCustomError(kind, message) from None

    return WrapValidator(validate)


Stop = Annotated[
    str | Annotated[list[str], Field(max_length=4)] | None,
    one_error("stop_type", "Input should be a string or an array of at most 4 strings"),
]


class StreamOptions(StrictModel):
    include_usage: bool | None = None  # Fireworks' default is on
    # adds `internal_content` (the token ids behind each chunk) to every chunk's choice
    include_internal_content: bool | None = None
    # chunk coalescing (girandole.api.serving.buffering)
    buffer_tokens: Annotated[int, Field(ge=1)] | None = None
    buffer_ms: Annotated[float, Field(ge=0)] | None = None
    buffer_mode: Literal["any", "all"] | None = None


# metadata: OpenAI's limits (16 pairs, keys up to 64 characters, values up to 512)
MetadataKey = Annotated[str, Field(min_length=1, max_length=64)]
Metadata = Annotated[
    dict[MetadataKey, Annotated[str, Field(max_length=512)]] | None, Field(max_length=16)
]


Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(ge=0, le=1)]
TopK = Annotated[int | None, Field(ge=0, le=100)]
MinP = Annotated[float | None, Field(ge=0, le=1)]
MaxTokens = Annotated[int | None, Field(ge=0)]
N = Annotated[int | None, Field(ge=1, le=128)]
Seed = Annotated[int | None, Field(ge=SEED_MIN, le=SEED_MAX)]

# Sampling and introspection fields shared by /completions and /chat/completions.
MAX_TOP_LOGPROBS = 5  # Fireworks' default --max-logprobs
Penalty = Annotated[float | None, Field(ge=-2, le=2)]  # presence_penalty, frequency_penalty
RepetitionPenalty = Annotated[float | None, Field(gt=0, le=2)]
TypicalP = Annotated[float | None, Field(gt=0, le=1)]
MirostatTarget = Annotated[float | None, Field(ge=0)]
MirostatLR = Annotated[float | None, Field(gt=0)]
LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]] | None
Logprobs = Annotated[
    bool | Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None,
    one_error(
        "logprobs_type", f"Input should be a boolean or an integer from 0 to {MAX_TOP_LOGPROBS}"
    ),
]
TopLogprobs = Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)]
EchoLast = Annotated[int | None, Field(ge=0)]
PromptCacheMaxLen = Annotated[int | None, Field(ge=0)]


class SamplingFields(StrictModel):
    """Fields of both request bodies: the penalties and filters beyond temperature/top-k/top-p,
    the introspection switches, and prompt-cache control (girandole.api.serving.choice)."""

    typical_p: TypicalP = None
    frequency_penalty: Penalty = None
    presence_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    mirostat_target: MirostatTarget = None
    mirostat_lr: MirostatLR = None
    logit_bias: LogitBias = None
    # true: OpenAI's content format; an int N: the legacy format with N alternatives
    logprobs: Logprobs = None
    top_logprobs: TopLogprobs = None
    echo: bool | None = None
    echo_last: EchoLast = None
    raw_output: bool | None = None
    return_token_ids: bool | None = None
    perf_metrics_in_response: bool | None = None
    prompt_cache_key: str | None = None  # session affinity: one replica here, so a no-op
    prompt_cache_isolation_key: str | None = None
    prompt_cache_max_len: PromptCacheMaxLen = None


# response_format (both endpoints): `{"type": "text"}`, `{"type": "json_object"}` (optionally
# with the legacy `schema`), `{"type": "json_schema", "json_schema": {"name", "schema", "strict",
# "description"}}`, `{"type": "grammar", "grammar": "<GBNF>"}`.
Schema = Annotated[
    dict[str, Any] | bool,
    one_error("schema_type", "Input should be a JSON schema: an object or a boolean"),
]


class JSONSchemaFormat(StrictModel):
    name: str | None = None
    description: str | None = None
    schema_: Schema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema", "grammar"]
    schema_: Schema | None = Field(None, alias="schema")  # legacy Fireworks form (json_object)
    json_schema: JSONSchemaFormat | None = None
    grammar: str | None = None


class PredictionPart(StrictModel):
    type: Literal["text"]
    text: str


class Prediction(StrictModel):
    """OpenAI's predicted output: the text the completion is expected to mostly repeat."""

    type: Literal["content"]
    content: str | Annotated[list[PredictionPart], Field(fail_fast=True)]  # as speculation


PredictionField = Annotated[
    Prediction | str | None,
    one_error(
        "prediction_type",
        'Input should be a string or {"type": "content", "content": a string or text parts}',
    ),
]
SpeculationField = Annotated[
    # fail_fast: as completions' prompt (an error per item of 300,000: 2 s of the event loop)
    str | Annotated[list[Annotated[int, Field(ge=0)]], Field(fail_fast=True)] | None,
    one_error("speculation_type", "Input should be a string or an array of token ids"),
]


class RequestFields(SamplingFields):
    """The body of /completions and /chat/completions but for the prompt: each endpoint's
    schema adds `prompt` or `messages` and its own fields."""

    model: str
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    n: N = None
    seed: Seed = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    user: str | None = None
    context_length_exceeded_behavior: Literal["truncate", "error"] | None = None
    response_format: ResponseFormat | None = None
    # speculative decoding: the expected output (girandole.api.serving.speculation)
    prediction: PredictionField = None
    speculation: SpeculationField = None
    # only "priority" changes anything: ahead of the default tier in both queues
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    metadata: Metadata = None  # kept with the request's usage row
    # per-token sampling mask in content-format logprobs (girandole.api.serving.logprobs)
    sampling_mask: Literal["count", "non_zero_list", "non_zero_buffer"] | None = None
    # MoE router replay: each content-format logprobs entry's `routing_matrix`
    # (girandole.api.serving.logprobs); a 400 on a dense model
    include_routing_matrix: bool | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self, default: int) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return self.max_completion_tokens if self.max_completion_tokens is not None else default

    @property
    def include_usage(self) -> bool:
        """Usage in streams: on unless `stream_options.include_usage` is false."""
        return not (self.stream_options and self.stream_options.include_usage is False)
