"""`POST /tokenize` and `POST /detokenize` request bodies: vLLM's (`TokenizeCompletionRequest`,
`TokenizeChatRequest`, `DetokenizeRequest`), and llama.cpp's `/tokenize` form (`content`).

Strict like every body of this API (an unknown field is a 400). The chat form also takes the
chat fields that shape a prompt (tools and tool_choice, reasoning, safe_tokenization,
prompt_truncate_len), so that a chat body's prompt fields give the ids chat would run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, RootModel

from girandole.api.chat.schema import (
    MAX_TOOLS,
    ChatMessage,
    FunctionCallChoice,
    FunctionDef,
    ReasoningEffort,
    Thinking,
    Tool,
    ToolChoice,
)
from girandole.api.http.schema import StrictModel

TOKEN_ID_MAX = 2**63 - 1  # vLLM's bound (an int64)


class TokenizeCompletionRequest(StrictModel):
    """vLLM's: the ids /v1/completions runs for `prompt` (BOS as the model's metadata says)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # false: no BOS
    return_token_strs: bool | None = False


class TokenizeChatRequest(StrictModel):
    """vLLM's: the ids /v1/chat/completions runs for these messages."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # both unset: as chat ends a prompt (a final assistant message is continued)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool = False  # true: BOS too when the template wrote none
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    # chat's own fields that shape the prompt
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDef], Field(max_length=MAX_TOOLS)] | None = None
    function_call: FunctionCallChoice = None
    reasoning_effort: ReasoningEffort = None
    reasoning_history: Literal["disabled", "interleaved", "preserved"] | None = None
    thinking: Thinking | None = None
    safe_tokenization: bool | None = None
    prompt_truncate_len: Annotated[int | None, Field(ge=1)] = None


class LlamaTokenizeRequest(StrictModel):
    """llama.cpp's server: answered as it answers, `{"tokens": [...]}`."""

    model: str | None = None
    content: str
    add_special: bool = False  # true: BOS as the model's metadata says
    parse_special: bool = True  # false: special-token strings are plain text
    with_pieces: bool = False  # tokens as {"id", "piece"}


class TokenizeRequest(
    RootModel[TokenizeCompletionRequest | TokenizeChatRequest | LlamaTokenizeRequest]
):
    """The three forms, for the OpenAPI document (the route tells them apart by field)."""


TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]


class DetokenizeRequest(StrictModel):
    """vLLM's (llama.cpp's is the same body): answered `{"prompt", "content"}`."""

    model: str | None = None
    tokens: list[TokenId]
