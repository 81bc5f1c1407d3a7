"""`POST /v1/chat/completions` request body: the fields this server supports today.

Messages follow Fireworks' schema (`additionalProperties: false`): `role`, `content` (a string,
a list of parts, or null), `reasoning_content`, `tool_calls`, `tool_call_id`; anything else
(`name` included) is a 400. Tools and response_format: `girandole.api.schemas.structured`.
Fields of the reference not implemented yet are in `girandole.api.unsupported.CHAT_UNSUPPORTED`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from girandole.api.schemas.common import (
    MAX_TOP_LOGPROBS,  # noqa: F401 - re-exported
    MaxTokens,
    MinP,
    N,
    SamplingFields,
    Seed,
    Stop,
    StreamOptions,
    StrictModel,
    Temperature,
    TopK,
    TopP,
    one_error,
)
from girandole.api.schemas.structured import (
    FunctionCallChoice,
    FunctionDef,
    ResponseFormat,
    Tool,
    ToolChoice,
)


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

    def content_value(self) -> Any:
        if isinstance(self.content, list):
            return [part.model_dump(exclude_none=True) for part in self.content]
        return self.content


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
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
    prompt_truncate_len: Annotated[int | None, Field(ge=1)] = None
    safe_tokenization: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None  # deprecated: read as tools
    function_call: FunctionCallChoice = None  # deprecated: read as tool_choice
    response_format: ResponseFormat | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
