"""`POST /v1/embeddings` request body (Fireworks' `EmbeddingRequest`, OpenAI-compatible).

`input`: a string, a list of strings, one token-id list, a list of token-id lists, or an object
or list of objects whose fields fill `prompt_template`'s `{field}` slots. At most 2048 inputs,
no empty string.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from girandole.api.http.schema import StrictModel, one_error

MAX_INPUTS = 2048

Text = Annotated[str, Field(min_length=1)]
# fail_fast (lists stop at their first bad item): as completions' prompt (its schema says why)
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, fail_fast=True)]
TemplateFields = Annotated[dict[str, str | int | float | bool], Field(min_length=1)]
Input = Annotated[
    Text
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS, fail_fast=True)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS, fail_fast=True)]
    | TemplateFields
    | Annotated[list[TemplateFields], Field(min_length=1, max_length=MAX_INPUTS, fail_fast=True)],
    one_error(
        "input_type",
        "Input should be a non-empty string, an array of such strings, a non-empty array of"
        " token ids (integers >= 0), an array of such arrays, or an object (or array of objects)"
        f" of string fields for prompt_template; at most {MAX_INPUTS} inputs",
    ),
]


class EmbeddingRequest(StrictModel):
    model: str
    input: Input
    dimensions: Annotated[int | None, Field(ge=1)] = None
    encoding_format: Literal["float", "base64"] | None = None
    normalize: bool | None = None
    prompt_template: Annotated[str | None, Field(min_length=1)] = None
    user: str | None = None
    prompt_cache_key: str | None = None  # session affinity: one replica here, so a no-op
    # Embedding inputs never use the prefix cache, so there is nothing to isolate.
    prompt_cache_isolation_key: str | None = None

    def inputs(self) -> list[str] | list[list[int]] | list[dict[str, Any]]:
        """The input as a list of inputs: strings, token-id lists or template objects."""
        x = self.input
        if isinstance(x, (str, dict)):
            return [x]  # type: ignore[list-item]
        if isinstance(x[0], int):
            return [x]  # type: ignore[list-item]
        return list(x)  # type: ignore[arg-type]


def _never(value: Any) -> bool:
    return False


# Fields of Fireworks' schema not implemented here: a 400 naming them (null or false: a no-op).
EMBEDDINGS_UNSUPPORTED = {
    "return_logits": lambda v: v == [],
    "raw_output": lambda v: v is False,
    "perf_metrics_in_response": lambda v: v is False,
    "fanout_size": _never,
}
