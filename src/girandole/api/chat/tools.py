"""Tool calling on /chat/completions: tools into the prompt, calls out of the output.

The prompt. A chat template that knows tools (its source mentions `tools`, as the Llama 3.1,
Qwen, Mistral... templates do) gets them as the `tools` variable and the messages as they are.
A template that does not (the built-in Gemma, Llama 3, Llama 2 and ChatML ones) gets instead:
- a system-prompt text (after any system message of the request) that lists the functions, one
  JSON object a line (`{"name", "description", "parameters"}`), and says how to call them:
  answer with only `{"name": <function name>, "arguments": <object>}`, or a JSON array of such
  objects for several calls;
- each assistant message's `tool_calls` written into its content in that same format;
- each run of `tool` messages as one user message, `Result of <name> (call <id>): <content>`
  per message (merged with a user message that follows, so roles still alternate).
With `tool_choice: "none"` the functions are not described (past calls and results still are).


The output (calls recognised in it, and how they are streamed): `girandole.api.chat.tool_calls`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from girandole.api.chat.schema import (
    AllowedToolsChoice,
    LegacyFunctionCall,
    NamedToolChoice,
    Tool,
)
from girandole.api.http.errors import bad_request
from girandole.api.serving.structured import ToolsCheck, check_schema, tuple_items
from girandole.sampling.grammar import GrammarSpec
from girandole.tokenizer.chat_template import flatten_content

ARGUMENT_KEYS = ("arguments", "parameters")
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolPlan:
    tools: list[Tool]
    mode: str  # "none" | "auto" | "required"
    allowed: list[str]  # names a call may use
    parallel: bool
    native: bool  # the chat template renders tools itself
    grammar: GrammarSpec | None = None  # the forced-call grammar
    check: ToolsCheck | None = None  # every tool's schema, compiled to check it (any mode)

    @property
    def detects_calls(self) -> bool:
        return self.mode != "none"

    @property
    def forced_name(self) -> str | None:
        """The function every call must be (a named tool_choice, or `required` with one tool
        allowed): its name is known before the model writes it."""
        return self.allowed[0] if self.mode == "required" and len(self.allowed) == 1 else None


def template_handles_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template) is not None


# -- the request -----------------------------------------------------------------------------


def plan_tools(req: Any, template: str | None) -> ToolPlan | None:
    """What the request's tools/tool_choice ask for; None when no tools are declared."""
    tools = list(req.tools or [])
    choice = req.tool_choice
    if req.functions:
        if tools:
            raise bad_request("Send either 'tools' or 'functions', not both", "functions")
        tools = [Tool(type="function", function=f) for f in req.functions]
    if req.function_call is not None:
        if choice is not None:
            raise bad_request(
                "Send either 'tool_choice' or 'function_call', not both", "function_call"
            )
        fc = req.function_call
        choice = (
            NamedToolChoice(type="function", name=fc.name)
            if isinstance(fc, LegacyFunctionCall)
            else fc
        )
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("Tool names must be unique", "tools")
    for i, tool in enumerate(tools):
        params = tool.function.parameters
        if params is not None:
            param = f"tools.{i}.function.parameters"
            check_schema(params, param)
            if params.get("type", "object") != "object":
                raise bad_request(
                    f"A function's parameters must be a JSON schema of type 'object',"
                    f" field: '{param}'",
                    param,
                )
    if not tools:
        if choice in (None, "auto", "none"):
            return None
        raise bad_request("tool_choice needs tools", "tool_choice")
    mode, allowed = "auto", list(names)
    single = False
    if choice in ("required", "any"):
        mode = "required"
    elif choice == "none":
        mode = "none"
    elif isinstance(choice, NamedToolChoice):
        name = choice.function_name()
        if name is None:
            raise bad_request(
                'tool_choice of type "function" needs the function: {"type": "function",'
                ' "function": {"name": "..."}}',
                "tool_choice",
            )
        if name not in names:
            raise bad_request(f"tool_choice names a function not in tools: '{name}'", "tool_choice")
        mode, allowed, single = "required", [name], True
    elif isinstance(choice, AllowedToolsChoice):
        allowed = []
        for t in choice.allowed_tools.tools:
            name = t.function_name()
            if name not in names:
                raise bad_request(
                    f"allowed_tools names a function not in tools: '{name}'", "tool_choice"
                )
            allowed.append(name)
        mode = choice.allowed_tools.mode
    parallel = req.parallel_tool_calls is not False and not single
    plan = ToolPlan(tools, mode, allowed, parallel, template_handles_tools(template))
    if mode == "required":
        plan.grammar = call_grammar([t for t in tools if t.function.name in allowed], parallel)
    parts = [
        (t.function.parameters, f"tools.{i}.function.parameters")
        for i, t in enumerate(tools)
        if t.function.parameters is not None
    ]
    if parts:
        plan.check = ToolsCheck(call_grammar(tools, parallel=False), parts)
    return plan


# -- the prompt -------------------------------------------------------------------------------


def tools_system_text(plan: ToolPlan) -> str:
    lines = ["You can call these functions:"]
    for tool in plan.tools:
        f = tool.function
        entry: dict[str, Any] = {"name": f.name}
        if f.description:
            entry["description"] = f.description
        entry["parameters"] = f.parameters if f.parameters is not None else NO_PARAMETERS
        lines.append(json.dumps(entry, ensure_ascii=False))
    lines.append(
        'To call a function, answer with only a JSON object {"name": <function name>,'
        ' "arguments": <object of arguments>}, or with a JSON array of such objects to call'
        " several, and nothing else. The results come back in the next user message."
    )
    if plan.mode == "required":
        if len(plan.allowed) == 1:
            lines.append(f"Call the function {plan.allowed[0]} now.")
        else:
            lines.append("Call one of these functions now: " + ", ".join(plan.allowed) + ".")
    else:
        lines.append("If no function call is needed, answer normally.")
    return "\n".join(lines)


def _call_text(calls: list[dict[str, Any]]) -> str:
    out = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments)
        except (TypeError, ValueError):
            pass
        out.append({"name": function.get("name"), "arguments": arguments})
    return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)


def prompt_messages(
    messages: list[dict[str, Any]], plan: ToolPlan | None, template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages for the template, and its `tools` variable (None: none).

    A request without tools keeps its messages as they are (tool-role turns in the model's own
    format) unless the template insists that roles alternate (Gemma, Llama 2): those get the
    rewrite below."""
    alternates = template is None or "must alternate" in template
    if template_handles_tools(template) or (plan is None and not alternates):
        tools = None
        if plan is not None and plan.mode != "none":
            tools = [t.model_dump(exclude_none=True) for t in plan.tools]
        return messages, tools
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name
    pending: list[str] = []  # tool results waiting for their user message

    def flush(extra: str | None = None) -> None:
        if pending or extra is not None:
            parts = pending + ([extra] if extra else [])
            out.append({"role": "user", "content": "\n\n".join(parts)})
            pending.clear()

    for message in messages:
        role = message["role"]
        if role == "tool":
            call_id = message.get("tool_call_id") or ""
            name = names.get(call_id, "a function")
            text = flatten_content(message.get("content"))
            label = f"Result of {name}" + (f" (call {call_id})" if call_id else "")
            pending.append(f"{label}: {text}")
            continue
        if role == "user" and pending:
            flush(flatten_content(message.get("content")))
            continue
        flush()
        m = dict(message)
        if role == "assistant" and m.get("tool_calls"):
            calls = m.pop("tool_calls")
            for call in calls:
                names[call.get("id", "")] = (call.get("function") or {}).get("name", "")
            text = flatten_content(m.get("content"))
            m["content"] = (text + "\n" if text else "") + _call_text(calls)
        out.append(m)
    flush()
    if plan is not None and plan.mode != "none":
        text = tools_system_text(plan)
        if out and out[0]["role"] == "system":
            first = flatten_content(out[0].get("content"))
            out[0] = {**out[0], "content": f"{first}\n\n{text}" if first else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


# -- the grammar ------------------------------------------------------------------------------


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                ref = value[1:]
                for base in ("/$defs/", "/definitions/"):
                    if ref.startswith(base):
                        value = f"#/$defs/{prefix}__{ref[len(base) :]}"
                        break
                else:  # a pointer into the parameters schema: "#", "#/properties/b"...
                    if ref == "" or ref.startswith("/"):
                        value = f"#/$defs/{prefix}__root{ref}"
            out[key] = _rewrite_refs(value, prefix)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


def call_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a call to one of `tools` (or an array of calls when `parallel`). Each
    function's `$defs`/`definitions` move to the top level (prefixed with its name) and its
    parameters schema becomes `$defs/<name>__root`, so its `$ref`s still resolve: to its
    definitions, to itself (`#`), or to any place inside it (`#/properties/b`, as
    zod-to-json-schema writes a reused schema)."""
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        name = tool.function.name
        params = tool.function.parameters
        params = tuple_items(params) if params is not None else dict(NO_PARAMETERS)
        params.setdefault("type", "object")  # as read; else a call's arguments could be any JSON
        for key in ("$defs", "definitions"):
            for def_name, sub in (params.pop(key, None) or {}).items():
                defs[f"{name}__{def_name}"] = _rewrite_refs(sub, name)
        params = _rewrite_refs(params, name)
        params.pop("$schema", None)
        params.pop("$id", None)
        defs[f"{name}__root"] = params
        options.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": {"$ref": f"#/$defs/{name}__root"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    one = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]} if parallel else one
    return {**schema, "$defs": defs}


def call_grammar(tools: list[Tool], parallel: bool) -> GrammarSpec:
    return GrammarSpec.json_schema(json.dumps(call_schema(tools, parallel), ensure_ascii=False))


# -- the output -------------------------------------------------------------------------------
