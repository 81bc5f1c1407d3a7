"""Request pieces of structured output: `response_format` (both endpoints) and chat's tools.

`response_format`: `{"type": "text"}`, `{"type": "json_object"}` (optionally with the legacy
`schema`), `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`,
`{"type": "grammar", "grammar": "<GBNF>"}`.

Tools: `[{"type": "function", "function": {"name", "description", "parameters", "strict"}}]`,
names `a-zA-Z0-9_-`, at most 64 characters. `tool_choice`: `"auto"`, `"none"`, `"required"`,
`"any"` (= required), `{"type": "function", "function": {"name"}}` or `{"type": "function",
"name"}`, or `{"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from girandole.api.schemas.common import StrictModel, one_error

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
