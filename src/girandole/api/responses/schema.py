"""`POST /v1/responses` request body: OpenAI's Responses API, the fields this server runs.

Strict like the other endpoints. Input items and tools are told apart by `type` (a message
item may leave it out); items and tools of kinds this server does not run parse loosely so
that the 400 can name them (`girandole.api.responses.convert`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Discriminator, Field, Tag

from girandole.api.chat.schema import MAX_TOOLS, ToolName
from girandole.api.http.schema import Schema, StrictModel, Temperature, TopP


class TextPart(StrictModel):
    type: Literal["input_text", "output_text", "refusal"]
    text: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class ImagePart(StrictModel):
    """An image for a vision model (chat's image_url part): a data: URL or an http(s) URL.
    `detail` is accepted and changes nothing (the model sees every image at one size); a
    `file_id` image is a 400."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class OtherPart(StrictModel):
    """A file or audio part: read so that the error names it."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["input_file", "input_audio"]


Part = Annotated[TextPart | ImagePart | OtherPart, Field(discriminator="type")]
Content = str | list[Part]


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None  # a namespace tool's function (its name is unique anyway)
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str
    output: Content
    id: str | None = None
    status: str | None = None


class ReasoningText(StrictModel):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(StrictModel):
    """Earlier reasoning: the text of the assistant turn after it (its `content`, else its
    `summary`) becomes that turn's reasoning_content; encrypted content is not read."""

    type: Literal["reasoning"]
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    id: str | None = None
    status: str | None = None


class McpListedTool(StrictModel):
    name: str
    input_schema: Any = None
    description: str | None = None
    annotations: Any = None


class McpListToolsItem(StrictModel):
    """An MCP server's tools as listed earlier: not listed again (OpenAI's rule)."""

    type: Literal["mcp_list_tools"]
    server_label: str
    tools: list[McpListedTool]
    id: str | None = None
    error: str | None = None


class McpCallItem(StrictModel):
    """An MCP tool call the server ran earlier, with its output (or error)."""

    type: Literal["mcp_call"]
    server_label: str
    name: str
    arguments: str
    output: str | None = None
    # OpenAI's error object (`{"type": "mcp_tool_execution_error", ...}`), or a plain message
    # (as older openai SDKs typed it)
    error: str | dict[str, Any] | None = None
    id: str | None = None
    status: str | None = None
    approval_request_id: str | None = None
    mcp: Any = None  # Fireworks' copy of name and arguments


class McpApprovalRequestItem(StrictModel):
    type: Literal["mcp_approval_request"]
    server_label: str
    name: str
    arguments: str
    id: str | None = None


class McpApprovalResponseItem(StrictModel):
    """The client's answer to an `mcp_approval_request`: the call runs if approved."""

    type: Literal["mcp_approval_response"]
    approval_request_id: str
    approve: bool
    reason: str | None = None
    id: str | None = None


class OtherItem(StrictModel):
    """Kinds this server does not run (a 400)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str


ITEM_KINDS = ("message", "function_call", "function_call_output", "reasoning", "mcp_list_tools",
              "mcp_call", "mcp_approval_request", "mcp_approval_response")  # fmt: skip


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else "message"
    return kind if kind in ITEM_KINDS else "other"


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[McpListToolsItem, Tag("mcp_list_tools")]
    | Annotated[McpCallItem, Tag("mcp_call")]
    | Annotated[McpApprovalRequestItem, Tag("mcp_approval_request")]
    | Annotated[McpApprovalResponseItem, Tag("mcp_approval_response")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_kind),
]


def _text_as_item(value: Any) -> Any:
    return (
        [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value
    )


# a string is one user message (so that errors in items name the item)
Input = Annotated[list[Item], BeforeValidator(_text_as_item)]


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamespaceTool(StrictModel):
    """Function tools grouped under a name (the Codex CLI sends its sub-agent tools so): offered
    to the model as plain functions; a call of one is a `function_call` with `namespace`."""

    type: Literal["namespace"]
    name: ToolName
    description: str | None = None
    tools: Annotated[list[FunctionTool], Field(min_length=1, max_length=MAX_TOOLS)]


class McpToolFilter(StrictModel):
    tool_names: list[str] | None = None
    read_only: bool | None = None


class McpApprovalFilter(StrictModel):
    always: McpToolFilter | None = None
    never: McpToolFilter | None = None


class McpTool(StrictModel):
    """A remote MCP server whose tools the server lists and calls itself
    (`girandole.api.responses.mcp`). `type: "sse"` is Fireworks' form (HTTP+SSE transport)."""

    type: Literal["mcp", "sse"]
    server_url: str | None = None
    server_label: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    server_description: str | None = None
    allowed_tools: list[str] | McpToolFilter | None = None
    headers: dict[str, str] | None = None
    authorization: str | None = None
    require_approval: Literal["always", "never"] | McpApprovalFilter | None = None
    connector_id: str | None = None  # a 400: no connectors here
    tunnel_id: str | None = None  # a 400: no tunnels here


class OtherTool(StrictModel):
    """A built-in tool (web search, file search, code...): this server runs none (a 400)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str):  # a list or object `type` (unhashable): OtherTool's 400
        return "other"
    kinds = {"function": "function", "mcp": "mcp", "sse": "mcp", "namespace": "namespace"}
    return kinds.get(kind, "other")


ResponsesTool = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[McpTool, Tag("mcp")]
    | Annotated[OtherTool, Tag("other")],
    Discriminator(_tool_kind),
]


class FunctionChoice(StrictModel):
    type: Literal["function"]
    name: ToolName


class AllowedTool(StrictModel):
    type: Literal["function"]
    name: ToolName


class AllowedToolsChoice(StrictModel):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: Annotated[list[AllowedTool], Field(min_length=1)]


class McpChoice(StrictModel):
    """A call on one MCP server (of its tool `name`, else of any of its tools)."""

    type: Literal["mcp"]
    server_label: str
    name: str | None = None


CHOICE_KINDS = ("function", "allowed_tools", "mcp")


def _choice_kind(value: Any) -> str | None:
    """An object's `type` picks its member, so that its errors name its fields
    (`tool_choice.name`), not every member's (pydantic's labels among them); an object of
    another type is one error naming `tool_choice`."""
    if isinstance(value, dict):
        kind = value.get("type")
        return kind if isinstance(kind, str) and kind in CHOICE_KINDS else None
    if isinstance(value, FunctionChoice | AllowedToolsChoice | McpChoice):
        return value.type
    return "mode"


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("mode")]
    | Annotated[FunctionChoice, Tag("function")]
    | Annotated[AllowedToolsChoice, Tag("allowed_tools")]
    | Annotated[McpChoice, Tag("mcp")],
    Discriminator(
        _choice_kind,
        custom_error_type="invalid_tool_choice",
        custom_error_message="tool_choice should be 'none', 'auto', 'required' or an object of"
        " type 'function', 'allowed_tools' or 'mcp'",
    ),
]


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: Schema | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only one a model without the knob has


class Reasoning(StrictModel):
    """`effort` turns a reasoning model's thinking on or off (chat's reasoning_effort;
    `minimal` is read as `low`); `summary` is accepted, and the reasoning comes as its text."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(StrictModel):
    include_obfuscation: bool | None = None  # no obfuscation padding is sent either way


# OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class ConversationRef(StrictModel):
    id: str


class ResponsesRequest(StrictModel):
    model: str
    input: Input | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None  # OpenAI's Conversations API
    store: bool | None = None  # default true
    background: bool | None = None  # background.py
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None  # chat's
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature = None
    top_p: TopP = None
    max_output_tokens: Annotated[int | None, Field(ge=1)] = None
    tools: Annotated[list[ResponsesTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # the prefix cache is in memory: "in_memory" asks for what it does, "24h" (for more) a 400
    prompt_cache_retention: Literal["in_memory"] | None = None
    # the Codex CLI's labels for its own bookkeeping: accepted, read by nothing here
    client_metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: Reasoning | None = None
    max_tool_calls: Annotated[int | None, Field(ge=1)] = None
    include: list[str] | None = None  # "message.output_text.logprobs" (route.py)
    top_logprobs: Annotated[int | None, Field(ge=0)] = None  # chat's cap applies
