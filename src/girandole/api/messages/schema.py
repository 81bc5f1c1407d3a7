"""`POST /v1/messages` request body: Anthropic's Messages API as Fireworks serves it.

Strict like the other endpoints: unknown fields are a 400 naming them. Content blocks are told
apart by `type`; `image` blocks (a base64 or URL source) go to a vision model as chat's image_url
parts, `document` blocks parse (so the error can say what is missing) but are a 400
(`girandole.api.messages.convert`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field

from girandole.api.chat.schema import MAX_TOOLS, ToolName
from girandole.api.http.schema import (
    StrictModel,
    Temperature,
    TopK,
    TopP,
)

MAX_INPUT_EXAMPLES = 32  # a tool's input_examples (each one is prompt text)


class CacheControl(StrictModel):
    type: Literal["ephemeral"]
    ttl: str | None = None  # a caching hint: the prefix cache here is automatic


class TextBlock(StrictModel):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: Annotated[list[Any], Field(max_length=0)] | None = None


class MediaBlock(StrictModel):
    """A document: read so that the error names it, never sent to the model."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["document"]


class Base64Source(StrictModel):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLSource(StrictModel):
    type: Literal["url"]
    url: str


class FileSource(StrictModel):
    """An image uploaded to Anthropic's Files API: parsed so that the 400 can say so."""

    type: Literal["file"]
    file_id: str


class ImageBlock(StrictModel):
    """An image for a vision model (chat's image_url part); a 400 for a text-only model."""

    type: Literal["image"]
    source: Annotated[Base64Source | URLSource | FileSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None


class DirectCaller(StrictModel):
    type: Literal["direct"]


class ToolUseBlock(StrictModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    # who made the call: the model itself ("direct") is the only caller here (no code execution)
    caller: DirectCaller | None = None
    toolset_name: str | None = None  # a label of Anthropic's toolsets: read by nothing here


ResultPart = Annotated[TextBlock | ImageBlock | MediaBlock, Field(discriminator="type")]


class ToolResultBlock(StrictModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None
    toolset_name: str | None = None


class ThinkingBlock(StrictModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(StrictModel):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock
    | ImageBlock
    | MediaBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock,
    Field(discriminator="type"),
]


def _text_as_block(value: Any) -> Any:
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


# a string is one text block (so that errors in blocks name the block)
Content = Annotated[list[Block], BeforeValidator(_text_as_block)]


class Message(StrictModel):
    # "system": a system message inside the conversation (Anthropic's beta
    # mid-conversation-system-2026-04-07, which Claude Code sends), text blocks only
    role: Literal["user", "assistant", "system"]
    content: Content


class Tool(StrictModel):
    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any] | None = None  # required of custom tools (convert.py)
    type: str | None = None  # "custom"; Anthropic's server tools are a 400
    strict: bool | None = None
    cache_control: CacheControl | None = None
    # examples of valid input: shown to the model after the description (convert.chat_tools)
    input_examples: Annotated[list[dict[str, Any]], Field(max_length=MAX_INPUT_EXAMPLES)] | None = (
        None
    )
    # the model calls tools itself ("direct"); a code-execution caller is a 400 (convert.py)
    allowed_callers: Annotated[list[str], Field(max_length=8)] | None = None
    # loaded by a tool search tool at Anthropic; none here, so the tool is described up front
    defer_loading: bool | None = None
    # calls stream their input as they are generated whatever this says
    eager_input_streaming: bool | None = None


class ToolChoiceAuto(StrictModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(StrictModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(StrictModel):
    type: Literal["tool"]
    name: ToolName
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(StrictModel):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
    Field(discriminator="type"),
]


class Metadata(StrictModel):
    user_id: str | None = None


# how thinking blocks are shown: "omitted" leaves their text out (girandole.api.messages.shape)
ThinkingDisplay = Literal["summarized", "omitted"]


class ThinkingEnabled(StrictModel):
    type: Literal["enabled"]
    # Anthropic's floor; and under max_tokens (thinking.check_thinking_budget)
    budget_tokens: Annotated[int, Field(ge=1024)]
    display: ThinkingDisplay | None = None


class ThinkingDisabled(StrictModel):
    type: Literal["disabled"]


class ThinkingAdaptive(StrictModel):
    type: Literal["adaptive"]
    display: ThinkingDisplay | None = None


ThinkingConfig = Annotated[
    ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")
]


class Diagnostics(StrictModel):
    """Anthropic's prompt-cache diagnostics: the answer says why the cache missed the prefix of
    the message named here (`girandole.api.messages.shape.diagnostics`)."""

    previous_message_id: str | None = None


class OutputFormat(StrictModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(StrictModel):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class ThinkingTurns(StrictModel):
    type: Literal["thinking_turns"]
    value: Annotated[int, Field(ge=0)]


class ClearThinkingEdit(StrictModel):
    """Thinking blocks of all but the last `keep` assistant turns that have some are left out
    (default: the last one's kept; "all": none left out)."""

    type: Literal["clear_thinking_20251015"]
    keep: Literal["all"] | ThinkingTurns | None = None


class InputTokens(StrictModel):
    type: Literal["input_tokens"]
    value: Annotated[int, Field(ge=0)]


class ToolUses(StrictModel):
    type: Literal["tool_uses"]
    value: Annotated[int, Field(ge=0)]


class ClearToolUsesEdit(StrictModel):
    """Once the prompt passes `trigger` (default 100,000 input tokens), the results of all but
    the last `keep` tool uses (default 3) not in `exclude_tools` become a placeholder, and their
    inputs too where `clear_tool_inputs` says (all, or the named tools'); not done when it would
    clear fewer than `clear_at_least` tokens (girandole.api.messages.context_edits)."""

    type: Literal["clear_tool_uses_20250919"]
    trigger: Annotated[InputTokens | ToolUses, Field(discriminator="type")] | None = None
    keep: ToolUses | None = None
    clear_at_least: InputTokens | None = None
    exclude_tools: Annotated[list[str], Field(max_length=MAX_TOOLS)] | None = None
    clear_tool_inputs: bool | Annotated[list[str], Field(max_length=MAX_TOOLS)] | None = None


ContextEdit = Annotated[ClearThinkingEdit | ClearToolUsesEdit, Field(discriminator="type")]


class ContextManagement(StrictModel):
    """Anthropic's context editing (beta context-management-2025-06-27)."""

    edits: Annotated[list[ContextEdit], Field(max_length=8)] | None = None


class CountTokensRequest(StrictModel):
    """`POST /v1/messages/count_tokens`: the fields that make a Messages prompt."""

    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None  # chat's `thinking` (girandole.api.chat.reasoning)
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None  # a hint, as on blocks
    context_management: ContextManagement | None = None
    # Anthropic's speed mode and account fields: one speed, no profiles or workspaces here
    speed: Literal["standard", "fast"] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class MessagesRequest(CountTokensRequest):
    # required, as at Anthropic; 0 pre-warms the prompt cache (prefilled, nothing generated)
    max_tokens: Annotated[int, Field(ge=0)]
    stop_sequences: Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool | None = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    metadata: Metadata | None = None
    raw_output: bool | None = None  # Fireworks' extension
    diagnostics: Diagnostics | None = None
    inference_geo: str | None = None  # where it runs: here, whatever this says
