"""`POST /v1/completions` request body: the fields this server supports today.

Fields of Fireworks' schema that later work adds are listed in `girandole.api.unsupported`;
they are answered with a 400 naming them until they are implemented here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from girandole.api.schemas.common import (
    MaxTokens,
    MinP,
    N,
    SamplingFields,
    Seed,
    Stop,
    StreamOptions,
    Temperature,
    TopK,
    TopP,
    one_error,
)
from girandole.api.schemas.structured import ResponseFormat

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Annotated[
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)],
    one_error(
        "prompt_type",
        "Input should be a string, an array of strings, a non-empty array of token ids (integers"
        " >= 0) or an array of such arrays",
    ),
]


class CompletionRequest(SamplingFields):
    model: str
    prompt: Prompt
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

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
