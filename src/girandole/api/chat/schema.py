"""`POST /v1/chat/completions` request body: the fields this server supports today.

Messages follow Fireworks' schema (`additionalProperties: false`): `role`, `content` (a string,
a list of parts, or null), `reasoning_content`, `tool_calls`, `tool_call_id`; anything else
(`name` included) is a 400. The fields shared with /completions (response_format included):
`girandole.api.http.schema.RequestFields`. Fields of the reference not implemented yet are in
`girandole.api.http.unsupported.CHAT_UNSUPPORTED`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from girandole.api.http.schema import (
    RequestFields,
    StrictModel,
    one_error,
)

MAX_TOOLS = 128  # tools (or functions) in one request

# Tools: `[{"type": "function", "function": {"name", "description", "parameters", "strict"}}]`,
# names `a-zA-Z0-9_-`, at most 64 characters. `tool_choice`: `"auto"`, `"none"`, `"required"`,
# `"any"` (= required), `{"type": "function", "function": {"name"}}` or `{"type": "function",
# "name"}`, or `{"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}`.
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDef(StrictModel):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(StrictModel):
    name: ToolName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName | None = None
    name: ToolName | None = None  # the flat form {"type": "function", "name": ...}

    def function_name(self) -> str | None:
        return self.function.name if self.function is not None else self.name


class AllowedTool(StrictModel):
    type: Literal["function"]
    function: FunctionName | None = None
    name: ToolName | None = None

    def function_name(self) -> str | None:
        return self.function.name if self.function is not None else self.name


class AllowedTools(StrictModel):
    mode: Literal["auto", "required"] = "auto"
    tools: Annotated[list[AllowedTool], Field(min_length=1)]


class AllowedToolsChoice(StrictModel):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = Annotated[
    Literal["auto", "none", "required", "any"] | NamedToolChoice | AllowedToolsChoice | None,
    one_error(
        "tool_choice_type",
        "Input should be 'auto', 'none', 'required', 'any', {\"type\": \"function\","
        ' "function": {"name": ...}} or {"type": "allowed_tools", "allowed_tools": {...}}',
    ),
]


class LegacyFunctionCall(StrictModel):
    name: ToolName


FunctionCallChoice = Literal["auto", "none"] | LegacyFunctionCall | None


class ImageURL(StrictModel):
    url: str
    detail: str | None = None
    max_long_side_pixel: int | None = None


class VideoURL(StrictModel):
    url: str
    detail: str | None = None
    fps: float | None = None
    max_frames: int | None = None
    sample_fps: float | None = None
    spatial_limit: int | None = None
    max_long_side_pixel: int | None = None


class ContentPart(StrictModel):
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None


Content = Annotated[
    str | list[ContentPart] | None,
    one_error("content_type", "Input should be a string, an array of content parts, or null"),
]


class FunctionCall(StrictModel):
    name: str
    arguments: str


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: Content = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: content parts as dicts, None fields left
        out (templates test `message.tool_calls is defined`)."""
        return self.model_dump(exclude_none=True) | {"content": self.content_value()}

    def num_chars(self) -> int:
        """Characters of text the template may render: content, reasoning, tool calls."""
        content = self.content
        n = len(content) if isinstance(content, str) else 0
        if isinstance(content, list):
            n += sum(len(part.text or "") for part in content)
        n += len(self.reasoning_content or "") + len(self.tool_call_id or "")
        for call in self.tool_calls or []:
            n += len(call.id) + len(call.function.name) + len(call.function.arguments)
        return n

    def content_value(self) -> Any:
        if isinstance(self.content, list):
            return [part.model_dump(exclude_none=True) for part in self.content]
        return self.content


# Reasoning (girandole.api.chat.reasoning): `true` is "medium" and `false` "none" (as Fireworks
# reads them); an integer is a token cap on reasoning.
Effort = Literal["none", "low", "medium", "high", "xhigh", "max", "adaptive"]
ReasoningEffort = Annotated[
    Effort | bool | Annotated[int, Field(ge=0)] | None,
    one_error(
        "reasoning_effort_type",
        "Input should be 'none', 'low', 'medium', 'high', 'xhigh', 'max', 'adaptive', a boolean"
        " or a number of tokens",
    ),
]


class Thinking(StrictModel):
    """Anthropic's form: `{"type": "enabled", "budget_tokens": N}`, `{"type": "disabled"}`,
    `{"type": "adaptive"}`; `effort` overrides `reasoning_effort`."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, Field(ge=1024)] | None = None
    effort: Effort | None = None
    keep: Literal["all"] | None = None
    budget_end_str: str | None = None


class ChatCompletionRequest(RequestFields):
    # one of the two: messages through the template, or the prompt's token ids as they are
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    prompt_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = (
        None
    )
    prompt_truncate_len: Annotated[int | None, Field(ge=1)] = None
    safe_tokenization: bool | None = None
    # OpenAI's limit too; each tool's schema joins the grammar a tool call is decoded with
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDef], Field(max_length=MAX_TOOLS)] | None = (
        None  # deprecated: read as tools
    )
    function_call: FunctionCallChoice = None  # deprecated: read as tool_choice
    reasoning_effort: ReasoningEffort = None
    reasoning_history: Literal["disabled", "interleaved", "preserved"] | None = None
    thinking: Thinking | None = None
