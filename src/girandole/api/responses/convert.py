"""A Responses request as a chat request (the rules: `girandole.api.responses`): input items
(stored as OpenAI writes them) to chat messages, tools and text.format to chat's fields."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from girandole.api.http.errors import bad_request
from girandole.api.responses.schema import (
    AllowedToolsChoice,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionTool,
    ImagePart,
    McpApprovalRequestItem,
    McpApprovalResponseItem,
    McpCallItem,
    McpChoice,
    McpListToolsItem,
    McpTool,
    MessageItem,
    NamespaceTool,
    ReasoningItem,
    ResponsesRequest,
)
from girandole.mcp.client import error_text

if TYPE_CHECKING:
    from girandole.api.responses.mcp import McpToolbox


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _parts(content: Any, role: str, where: str) -> list[dict[str, Any]]:
    """Content as OpenAI lists it: a string becomes one input_text (output_text for the
    assistant) part; input_image parts of a user message are kept (`_image`); other parts,
    and a text part without its `text` (a refusal part without its `refusal`), are a 400."""
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        part: dict[str, Any] = {"type": kind, "text": content}
        return [part | {"annotations": []}] if kind == "output_text" else [part]
    parts = []
    for k, p in enumerate(content):
        if p.type == "input_image":
            parts.append(_image(p, role, f"{where}.{k}"))
            continue
        if p.type not in ("input_text", "output_text", "refusal"):
            raise bad_request(
                f"Content parts of type '{p.type}' are not supported: this model takes text"
                f" only, field: '{where}.{k}'",
                f"{where}.{k}",
            )
        field = "refusal" if p.type == "refusal" else "text"
        if getattr(p, field) is None:  # OpenAI requires it: no empty part stored in its place
            raise bad_request(
                f"Field required, field: '{where}.{k}.{field}'", f"{where}.{k}.{field}"
            )
        parts.append(p.model_dump(exclude_none=True))
    return parts


def _image(part: ImagePart, role: str, where: str) -> dict[str, Any]:
    """An input_image part as stored (and re-sent by a later turn that chains from it)."""
    if role != "user":
        raise bad_request(
            f"input_image parts go in user messages only, not in a {role} message,"
            f" field: '{where}'",
            where,
        )
    if part.image_url is None:
        if part.file_id is not None:
            raise bad_request(
                "input_image with a file_id is not supported: send its image_url (a data: URL"
                f" or an http(s) URL), field: '{where}.file_id'",
                f"{where}.file_id",
            )
        raise bad_request(f"Field required, field: '{where}.image_url'", f"{where}.image_url")
    return {"type": "input_image", "image_url": part.image_url, "detail": part.detail or "auto"}


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A message's chat content: its text, or, where it has images, chat's parts (its input_image
    parts as image_url parts where they stand)."""
    if not any(p["type"] == "input_image" for p in parts):
        return _text(parts)
    return [
        {"type": "image_url", "image_url": {"url": p["image_url"]}}
        if p["type"] == "input_image"
        else {"type": "text", "text": _text([p])}
        for p in parts
    ]


def image_fields(
    items: list[dict[str, Any]], inherited: int, earlier: str
) -> list[tuple[str, str]]:
    """Each image's fields (its part, its URL), in prompt order: `input.{i}.content.{k}` for
    the request's items, `earlier` (previous_response_id, conversation) for the inherited ones."""
    fields = []
    for i, item in enumerate(items):
        if item.get("type", "message") != "message":
            continue
        for k, part in enumerate(item["content"]):
            if part["type"] == "input_image":
                where = f"input.{i - inherited}.content.{k}" if i >= inherited else earlier
                fields.append((where, f"{where}.image_url" if i >= inherited else earlier))
    return fields


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as stored items, each with an id."""
    return stored_items(req.input or [], "input")


def check_unique_ids(items: list[dict[str, Any]], existing: list[str], field: str) -> None:
    """A 400 for an item whose id another item of its conversation has (as OpenAI answers):
    retrieving or deleting by id would find only one of them, or remove both."""
    seen = set(existing)
    for i, item in enumerate(items):
        if item["id"] in seen:
            raise bad_request(f"Duplicate item found with id '{item['id']}'", f"{field}.{i}.id")
        seen.add(item["id"])


def stored_items(given: list[Any], field: str) -> list[dict[str, Any]]:
    """Validated items (a request's `input`, a conversation's `items`) as stored items, each
    with an id; `field` names them in errors."""
    items = []
    for i, item in enumerate(given):
        where = f"{field}.{i}"
        if isinstance(item, MessageItem):
            parts = _parts(item.content, item.role, where + ".content")
            items.append({"id": item.id or new_id("msg"), "type": "message", "role": item.role,
                          "content": parts, "status": item.status or "completed"})  # fmt: skip
        elif isinstance(item, FunctionCallItem):
            items.append(item.model_dump(exclude_none=True) | {"id": item.id or new_id("fc"),
                                                               "status": "completed"})  # fmt: skip
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output
            if not isinstance(output, str):
                output = _text(_parts(output, "tool", where + ".output"))
            items.append({"id": item.id or new_id("fco"), "type": "function_call_output",
                          "call_id": item.call_id, "output": output,
                          "status": "completed"})  # fmt: skip
        elif isinstance(item, ReasoningItem):
            items.append(item.model_dump(exclude_none=True) | {"id": item.id or new_id("rs")})
        elif isinstance(item, tuple(MCP_ITEMS)):
            dumped = item.model_dump(exclude_none=True)
            items.append(dumped | {"id": item.id or new_id(MCP_ITEMS[type(item)])})
        else:
            raise bad_request(
                f"Input items of type '{item.type}' are not supported by this server,"
                f" field: '{where}.type'",
                f"{where}.type",
            )
    return items


# MCP items a client sends back (or a stored turn holds), by their id prefix
MCP_ITEMS = {McpListToolsItem: "mcpl", McpCallItem: "mcp", McpApprovalRequestItem: "mcpr",
             McpApprovalResponseItem: "mcpa"}  # fmt: skip


def _text(parts: list[dict[str, Any]]) -> str:
    return "".join(p.get("text") or p.get("refusal") or "" for p in parts)


def _reasoning_text(item: dict[str, Any]) -> str:
    parts = item.get("content") or item.get("summary") or []
    return "\n\n".join(p["text"] for p in parts if p.get("text"))


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as chat messages: `developer` is `system` (before any other turn; after
    one it is user text, joining a user turn next to it), function_call items become
    the assistant's tool_calls, function_call_output items tool messages; consecutive messages
    of one role are merged. A reasoning item is the reasoning_content of the assistant turn
    that follows it (the template decides what it shows), dropped if no such turn follows.
    An `mcp_call` item is an assistant's call too, and its result (its output, else its
    error's text) a tool message after that turn's calls; the other MCP items (lists,
    approvals) are not turns."""
    out: list[dict[str, Any]] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    thoughts: list[str] = []  # reasoning waiting for its assistant turn
    # each assistant message's reasoning, joined once at the end (as for merged texts below)
    reasoning: dict[int, tuple[dict[str, Any], list[str]]] = {}
    results: list[dict[str, Any]] = []  # MCP results waiting for the end of their turn's calls
    merged: dict[int, tuple[dict[str, Any], list[str], list[bool]]] = {}  # message, texts, any
    for item in items:
        kind = item.get("type", "message")
        if kind not in ("function_call", "mcp_call"):
            out += results
            results = []
        last = out[-1] if out else None
        if kind == "reasoning":
            text = _reasoning_text(item)
            if text:
                thoughts.append(text)
            continue
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            if role == "system" and last is not None and last["role"] != "system":
                # later in the conversation (a previous response's turns before it): user text,
                # as Messages reads a system message there (most templates take a system
                # message only first; Gemma's refuses one later: "roles must alternate")
                role = "user"
            text = _content(item["content"])
            same = last is not None and last["role"] == role and not last.get("tool_calls")
            if same and (isinstance(text, list) or isinstance(last["content"], list)):
                _merge_parts(last, text, merged)
            elif same:
                # the pieces are joined once at the end: adding each to the text so far copied
                # it whole every time (30,000 short user messages: 1.9 s of the event loop)
                sep = "" if role == "assistant" else "\n\n"
                first = last["content"] or ""
                parts = merged.setdefault(id(last), (last, [first], [bool(first)]))
                parts[1].append((sep if parts[2][0] else "") + text)
                parts[2][0] = parts[2][0] or bool(text)
            else:
                out.append({"role": role, "content": text})
        elif kind in ("function_call", "mcp_call"):
            call_id = item["call_id"] if kind == "function_call" else item["id"]
            call = {"id": call_id, "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            if kind == "mcp_call":
                output = item.get("output")
                if output is None:
                    error = item.get("error") or {}
                    output = f"Error: {error}" if isinstance(error, str) else error_text(error)
                results.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        else:  # mcp_list_tools, mcp_approval_request, mcp_approval_response: not turns
            continue
        if thoughts and out[-1]["role"] == "assistant":
            reasoning.setdefault(id(out[-1]), (out[-1], []))[1].extend(thoughts)
        thoughts = []
    for message, texts, _ in merged.values():
        message["content"] = "".join(texts)
    for message, pieces in reasoning.values():
        message["reasoning_content"] = "\n\n".join(pieces)
    return out + results


def _merge_parts(
    last: dict[str, Any],
    content: str | list[dict[str, Any]],
    merged: dict[int, tuple[dict[str, Any], list[str], list[bool]]],
) -> None:
    """A message with images joined to the message before (one of its role, a user's), or a
    message's text to one with images: their content as parts, one after the other, a text
    next to a text joined by a blank line (as merged texts are)."""
    before = last["content"]
    if id(last) in merged:  # its texts so far, joined now
        before = "".join(merged.pop(id(last))[1])
    if isinstance(before, str):
        before = [{"type": "text", "text": before}] if before else []
    if isinstance(content, str):
        content = [{"type": "text", "text": content}] if content else []
    if before and content and before[-1]["type"] == content[0]["type"] == "text":
        joined = {"type": "text", "text": before[-1]["text"] + "\n\n" + content[0]["text"]}
        before, content = [*before[:-1], joined], content[1:]
    last["content"] = [*before, *content]


def namespaces(req: ResponsesRequest) -> dict[str, str]:
    """The namespace of each namespaced function, by the function's name."""
    return {
        function.name: tool.name
        for tool in req.tools or []
        if isinstance(tool, NamespaceTool)
        for function in tool.tools
    }


def chat_tools(
    req: ResponsesRequest, toolbox: McpToolbox | None = None
) -> tuple[list[dict[str, Any]] | None, Any, list[str]]:
    """Chat's tools (the function tools, then the MCP servers' tools), tool_choice, and where
    each chat tool's function is in the request (`tools.N`, a namespace's `tools.N.tools.K`;
    an MCP server's tool: `tools.N` of the server), for naming chat's 400s."""
    tools, paths = None, []
    if req.tools is not None:
        tools = []
        for i, tool in enumerate(req.tools):
            if isinstance(tool, McpTool):
                continue
            if isinstance(tool, NamespaceTool):  # its functions, each as a function tool
                for k, function in enumerate(tool.tools):
                    fields = function.model_dump(exclude_none=True, exclude={"type"})
                    tools.append({"type": "function", "function": fields})
                    paths.append(f"tools.{i}.tools.{k}")
                continue
            if not isinstance(tool, FunctionTool):
                raise bad_request(
                    f"Tools of type '{tool.type}' are not supported: this server runs function,"
                    f" namespace and MCP tools only, field: 'tools.{i}.type'",
                    f"tools.{i}.type",
                )
            function = tool.model_dump(exclude_none=True, exclude={"type"})
            tools.append({"type": "function", "function": function})
            paths.append(f"tools.{i}")
        if toolbox is not None:
            tools += toolbox.functions()
            paths += [f"tools.{s.index}" for s in toolbox.servers for _ in s.tools]
    choice = req.tool_choice
    if isinstance(choice, FunctionChoice):
        return tools, {"type": "function", "function": {"name": choice.name}}, paths
    if isinstance(choice, AllowedToolsChoice):
        allowed = [{"type": "function", "name": t.name} for t in choice.tools]
        return tools, {"type": "allowed_tools",
                       "allowed_tools": {"mode": choice.mode, "tools": allowed}}, paths  # fmt: skip
    if isinstance(choice, McpChoice):
        return tools, _mcp_choice(choice, toolbox), paths
    return tools, choice, paths


def _mcp_choice(choice: McpChoice, toolbox: McpToolbox | None) -> dict[str, Any]:
    """`{"type": "mcp", "server_label", "name"}`: a call of that tool, or of any of the
    server's tools when no name is given."""
    server = toolbox.server_labelled(choice.server_label) if toolbox is not None else None
    if server is None:
        raise bad_request(
            f"tool_choice names the MCP server '{choice.server_label}', which is not among the"
            " request's tools, field: 'tool_choice.server_label'",
            "tool_choice.server_label",
        )
    names = [t["name"] for t in server.tools]
    if choice.name is not None:
        if choice.name not in names:
            raise bad_request(
                f"The MCP server '{server.label}' offers no tool '{choice.name}',"
                " field: 'tool_choice.name'",
                "tool_choice.name",
            )
        return {"type": "function", "function": {"name": choice.name}}
    if not names:
        raise bad_request(
            f"The MCP server '{server.label}' offers no tools to call,"
            " field: 'tool_choice.server_label'",
            "tool_choice.server_label",
        )
    allowed = [{"type": "function", "name": name} for name in names]
    return {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": allowed}}


def response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    """Chat's response_format from `text.format`."""
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return {"type": fmt.type} if fmt is not None else None
    if fmt.schema_ is None:
        raise bad_request("Field required, field: 'text.format.schema'", "text.format.schema")
    schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description,
              "strict": fmt.strict}  # fmt: skip
    return {
        "type": "json_schema",
        "json_schema": {k: v for k, v in schema.items() if v is not None},
    }
