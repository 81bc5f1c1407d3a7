"""`POST /v1/completions` request body: the fields this server supports today.

Fields of Fireworks' schema that later work adds are listed in `girandole.api.http.unsupported`;
they are answered with a 400 naming them until they are implemented here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from girandole.api.http.schema import RequestFields, one_error

# fail_fast: a list stops at its first bad item. Else pydantic lists an error per item per
# member of the union, and one_error reads them all: 300,000 items (a 1.2 MB body) held the
# event loop 6 s and 1.2 GB, and a 16 MB body got the server killed for memory.
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, fail_fast=True)]
Prompt = Annotated[
    str
    | Annotated[list[str], Field(min_length=1, fail_fast=True)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, fail_fast=True)],
    one_error(
        "prompt_type",
        "Input should be a string, an array of strings, a non-empty array of token ids (integers"
        " >= 0) or an array of such arrays",
    ),
]


class CompletionRequest(RequestFields):
    prompt: Prompt
    # Set only for a vision model (girandole.api.completions.images); a text-only model's
    # request never gets here with images (girandole.api.http.unsupported).
    images: list[str] | None = None

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]
