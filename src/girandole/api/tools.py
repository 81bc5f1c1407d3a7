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

The output.
- `tool_choice` `"required"`/`"any"`, a named function, or `allowed_tools` in mode `required`:
  decoding is constrained to a call (a JSON schema: `name` one of the allowed names, then
  `arguments` that function's `parameters` schema); with `parallel_tool_calls` (the default,
  true) the model may instead write an array of calls. A named function is always one call.
- `"auto"` (the default with tools): decoding is free; the output is a call when the whole of
  it (trimmed, a Markdown code fence around it removed) parses as a call or an array of calls in
  the format above, to allowed functions, with object arguments (`"parameters"` is read as a
  synonym of `"arguments"`). Otherwise it is plain content.
- A call gives `message.tool_calls` (`id` `call_<24 hex>`, `type: "function"`, `function.name`,
  `function.arguments`: the arguments exactly as the model wrote them, a JSON string) with
  `content: null` and `finish_reason: "tool_calls"`.
- Streaming: per call, one chunk with `index`, `id`, `type` and `function.name` (and arguments
  `""`), then the arguments as string fragments as they are generated. Constrained output is
  known to be a call from its first token; under `auto`, output that starts with `{`, `[` or a
  code fence is held back until it ends and then sent as calls (header chunk and one arguments
  chunk each) or as content.
- `response_format` together with a forced call is a 400; with `auto` the response_format
  grammar applies and a call is still recognised in the output.
- The deprecated `functions`/`function_call` are read as `tools`/`tool_choice`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from girandole.api.errors import bad_request
from girandole.api.schemas.structured import (
    AllowedToolsChoice,
    LegacyFunctionCall,
    NamedToolChoice,
    Tool,
)
from girandole.api.structured import check_schema
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

    @property
    def detects_calls(self) -> bool:
        return self.mode != "none"


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
                else:
                    value = f"#/$defs/{prefix}__root{ref}" if ref in ("", "/") else value
            out[key] = _rewrite_refs(value, prefix)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


def call_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a call to one of `tools` (or an array of calls when `parallel`). Each
    function's `$defs`/`definitions` move to the top level (prefixed with its name), so its
    `$ref`s still resolve."""
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        name = tool.function.name
        params = tool.function.parameters
        params = dict(params) if params is not None else dict(NO_PARAMETERS)
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


@dataclass
class CallSpan:
    """Where one call sits in the output text, as far as it has been written."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None  # exclusive; None while the arguments are still open


@dataclass
class _Frame:
    kind: str  # "obj" | "arr"
    call: CallSpan | None = None  # this object is a call
    args_of: CallSpan | None = None  # this container is a call's arguments
    key: str | None = None
    expect_key: bool = False


def _string_end(text: str, i: int) -> int | None:
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
        elif c == '"':
            return j + 1
        else:
            j += 1
    return None


def scan_calls(text: str) -> list[CallSpan]:
    """The calls in a (possibly unfinished) JSON call or array of calls: their names once
    written, and the span of their arguments. Stops at the first thing it cannot read."""
    calls: list[CallSpan] = []
    stack: list[_Frame] = []
    i, n = 0, len(text)

    def value_start(pos: int) -> CallSpan | None:
        top = stack[-1] if stack else None
        if top is not None and top.call is not None and top.key in ARGUMENT_KEYS:
            top.call.args_start = pos
            return top.call
        return None

    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
            continue
        top = stack[-1] if stack else None
        if top is not None and top.kind == "obj" and top.expect_key:
            if c == '"':
                end = _string_end(text, i)
                if end is None:
                    break
                try:
                    top.key = json.loads(text[i:end])
                except ValueError:
                    break
                i = end
            elif c == ":":
                top.expect_key = False
                i += 1
            elif c == "}":
                stack.pop()
                i += 1
                if top.args_of is not None:
                    top.args_of.args_end = i
            else:
                break
            continue
        if c == ",":
            if top is not None and top.kind == "obj":
                top.expect_key, top.key = True, None
            i += 1
            continue
        if c in "}]":
            if not stack:
                break
            frame = stack.pop()
            i += 1
            if frame.args_of is not None:
                frame.args_of.args_end = i
            continue
        owner = value_start(i)
        if c in "{[":
            frame = _Frame("obj" if c == "{" else "arr", args_of=owner)
            if c == "{" and (not stack or (len(stack) == 1 and stack[0].kind == "arr")):
                if not stack or stack[0].call is None:
                    frame.call = CallSpan()
                    calls.append(frame.call)
            frame.expect_key = c == "{"
            stack.append(frame)
            i += 1
            continue
        if c == '"':
            end = _string_end(text, i)
            if end is None:
                break
            if top is not None and top.call is not None and top.key == "name":
                try:
                    top.call.name = json.loads(text[i:end])
                except ValueError:
                    break
        else:
            end = i
            while end < n and text[end] not in ",}] \t\r\n":
                end += 1
            if end == n:
                break  # a number or literal that may go on
        if owner is not None:
            owner.args_end = end
        i = end
    return calls


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as written


def parse_calls(text: str, allowed: list[str]) -> list[ParsedCall] | None:
    """The calls in a finished output, or None when it is not (only) calls to allowed tools."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body or body[0] not in "{[":
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    spans = scan_calls(body)
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or item.get("name") not in allowed:
            return None
        keys = [key for key in ARGUMENT_KEYS if key in item]
        if set(item) - {"name", *keys} or len(keys) > 1:
            return None
        arguments = item[keys[0]] if keys else {}
        if isinstance(arguments, str):  # arguments written as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
            raw = None
        else:
            span = spans[k] if k < len(spans) else None
            ok = span is not None and span.args_start is not None and span.args_end is not None
            raw = body[span.args_start : span.args_end] if ok else None
        if not isinstance(arguments, dict):
            return None
        out.append(ParsedCall(item["name"], raw or json.dumps(arguments, ensure_ascii=False)))
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_calls_json(calls: list[ParsedCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


def finish_message(
    plan: ToolPlan | None, text: str, finish_reason: str | None
) -> tuple[dict[str, Any], str | None]:
    """The non-streamed `message` and `finish_reason` of a choice whose output is `text`."""
    if plan is not None and plan.detects_calls:
        calls = parse_calls(text, plan.allowed)
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls_json(calls)}
            return message, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason


@dataclass
class ToolStream:
    """Turns one choice's text deltas into chat deltas: content, or tool-call fragments."""

    plan: ToolPlan | None
    text: str = ""
    mode: str = "undecided"  # "content" | "calls" (streamed as written) | "held" (auto, JSON)
    headers: list[str] = field(default_factory=list)  # call ids sent, per call
    sent: list[int] = field(default_factory=list)  # argument characters sent, per call
    is_call: bool = False

    def __post_init__(self) -> None:
        if self.plan is None or not self.plan.detects_calls:
            self.mode = "content"
        elif self.plan.mode == "required":
            self.mode = "calls"

    def feed(self, new_text: str) -> list[dict[str, Any]]:
        if self.mode == "content":
            return [{"content": new_text}] if new_text else []
        self.text += new_text
        if self.mode == "undecided":
            head = self.text.lstrip()
            if not head:
                return []
            if head[0] in "{[`":
                self.mode = "held"
                return []
            self.mode = "content"
            return [{"content": self.text}]
        if self.mode == "calls":
            return self._stream_calls()
        return []

    def _stream_calls(self) -> list[dict[str, Any]]:
        deltas = []
        for k, span in enumerate(scan_calls(self.text)):
            if span.name is None:
                break
            if k >= len(self.headers):
                call_id = new_call_id()
                self.headers.append(call_id)
                self.sent.append(0)
                deltas.append(_call_delta(k, call_id, span.name, ""))
            if span.args_start is None:
                continue
            end = span.args_end if span.args_end is not None else len(self.text)
            start = span.args_start + self.sent[k]
            if end > start:
                deltas.append(_args_delta(k, self.text[start:end]))
                self.sent[k] = end - span.args_start
        return deltas

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas of the choice and its finish_reason."""
        if self.mode == "content":
            return [], finish_reason
        if self.mode == "undecided":  # only blanks so far
            return ([{"content": self.text}] if self.text else []), finish_reason
        assert self.plan is not None
        calls = parse_calls(self.text, self.plan.allowed)
        if self.mode == "calls":
            deltas = self._stream_calls()
            return deltas, "tool_calls" if calls else finish_reason
        if not calls:
            return [{"content": self.text}], finish_reason
        deltas = []
        for k, call in enumerate(calls):
            deltas.append(_call_delta(k, new_call_id(), call.name, ""))
            deltas.append(_args_delta(k, call.arguments))
        return deltas, "tool_calls"


def _call_delta(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "tool_calls": [
            {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]
    }


def _args_delta(index: int, fragment: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
