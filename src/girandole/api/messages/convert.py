"""An Anthropic Messages request as a chat request (the rules: `girandole.api.messages`)."""

from __future__ import annotations

import json
from typing import Any

from girandole.api.http.errors import bad_request
from girandole.api.messages.context_edits import (
    PLACEHOLDER,
    Cleared,
    check_context_edits,
    cleared_input,
    cleared_thinking,
)
from girandole.api.messages.images import ImagePart, image_part
from girandole.api.messages.pairing import check_tool_pairing
from girandole.api.messages.schema import (
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ThinkingEnabled,
    Tool,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
)
from girandole.api.messages.thinking import check_thinking_prefill
from girandole.api.messages.translated import TranslatedChat, to_chat

# an assistant turn's `thinking` blocks are its reasoning_content (the template decides what it
# shows: Qwen3's, those of the turns after the last user message); redacted ones are left out
SKIPPED_BLOCKS = ("redacted_thinking",)
# output_config.effort as Fireworks reads it: `max` (and Anthropic's `xhigh`) is `high`
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def system_text(system: str | list[TextBlock] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n\n".join(block.text for block in system)


def _unsupported_block(kind: str, where: str) -> Exception:
    return bad_request(
        f"Content blocks of type '{kind}' are not supported: this server reads text blocks"
        f" (and, for a vision model, image blocks of user turns), field: '{where}'",
        where,
    )


def _result_text(block: ToolResultBlock, where: str) -> str:
    content = block.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        parts = []
        for k, part in enumerate(content):
            if part.type != "text":
                raise _unsupported_block(part.type, f"{where}.content.{k}")
            parts.append(part.text)
        text = "\n\n".join(parts)
    return f"Error: {text}" if block.is_error else text


def check_not_empty(req: MessagesRequest) -> None:
    """Anthropic's 400s for empty content: a turn of no blocks (or of one empty text, as `""`
    arrives) other than a final assistant turn (an empty prefill), and an empty text block.
    Without them the turn vanished (its neighbours then merged into one) or, alone, left a
    conversation chat called empty under another field's name."""
    if all(message.role == "system" for message in req.messages):
        raise bad_request(
            "messages: the conversation needs a user or assistant message, not only system"
            " messages",
            "messages",
        )
    last = len(req.messages) - 1
    for i, message in enumerate(req.messages):
        blocks = message.content
        if i == last and message.role == "assistant":
            _check_prefill(blocks, f"messages.{i}")
            continue
        if not blocks or (len(blocks) == 1 and blocks[0].type == "text" and not blocks[0].text):
            raise bad_request(
                f"messages.{i}: all messages must have non-empty content except for the"
                " optional final assistant message",
                f"messages.{i}.content",
            )
        for j, block in enumerate(blocks):
            if block.type == "text" and not block.text:
                where = f"messages.{i}.content.{j}"
                raise bad_request(f"{where}: text content blocks must be non-empty", where)


def _check_prefill(blocks: list[Any], where: str) -> None:
    """Anthropic's 400 for a final assistant turn (a prefill) whose text ends in whitespace:
    the model would continue after it, where its tokenizer would rather have put the space
    inside the next token (Anthropic refuses it rather than continue badly)."""
    if blocks and blocks[-1].type == "text" and blocks[-1].text != blocks[-1].text.rstrip():
        at = f"{where}.content.{len(blocks) - 1}"
        raise bad_request(f"{at}: final assistant content cannot end with trailing whitespace", at)


def check_forced_output(req: CountTokensRequest, messages: list[dict[str, Any]]) -> None:
    """Anthropic's 400s for what cannot go with an output forced from its first token (a tool
    call under tool_choice `any`/`tool`, or output_config.format's JSON): a prefill (the answer
    would have to continue the prefill's text, which the forced output cannot), and, for a
    forced call, thinking turned on."""
    forced_call = isinstance(req.tool_choice, ToolChoiceAny | ToolChoiceTool)
    if forced_call and isinstance(req.thinking, ThinkingEnabled):
        raise bad_request(
            "Thinking may not be enabled when tool_choice forces tool use, field: 'tool_choice'",
            "tool_choice",
        )
    if not messages or messages[-1]["role"] != "assistant":
        return  # no prefill: chat continues a final assistant message only
    if forced_call:
        why = "When `tool_choice` forces tool use"
    elif req.output_config is not None and req.output_config.format is not None:
        why = "When using output format"
    else:
        return
    at = f"messages.{len(req.messages) - 1}"
    raise bad_request(
        f"{at}: Your API request included an `assistant` message in the final position, which"
        f" would pre-fill the `assistant` response. {why}, pre-filling the `assistant`"
        " response is not supported.",
        at,
    )


def chat_messages(
    req: CountTokensRequest, cleared: Cleared | None = None, images: list[str] | None = None
) -> list[dict[str, Any]]:
    """The conversation as chat messages: tool_result blocks become tool messages (before the
    user's text of the same turn), tool_use blocks the assistant's tool_calls; consecutive
    turns of one role are merged, as Anthropic does.

    A system message inside the conversation (Claude Code sends them) is read as user text:
    most chat templates take a system message only first (Gemma's refuses one later: "roles
    must alternate"). Before any turn it joins the system prompt; after a user turn, that
    turn's text; otherwise the next user turn's text (after its tool results), or a user turn
    of its own at the end.

    `cleared`: what context edits leave out (girandole.api.messages.context_edits); None: the
    thinking a clear_thinking edit clears. An image block of a user turn becomes chat's
    image_url part there (the turn's content a list of parts); `images` gets each one's field,
    in prompt order (chat's errors about an image then name the block)."""
    if cleared is None:
        cleared = Cleared(thinking=frozenset(cleared_thinking(req)))
    out: list[dict[str, Any]] = []
    system = system_text(req.system)
    if system:
        out.append({"role": "system", "content": system})
    pending: list[str] = []  # system text waiting for the next user turn
    for i, message in enumerate(req.messages):
        if message.role == "system":
            text = "\n\n".join(_system_texts(message.content, i))
            if all(m["role"] == "system" for m in out):  # none but the system prompt yet
                prompt = out[0]["content"] if out else ""
                out[:] = [{"role": "system", "content": _join(prompt, text, "system")}]
            elif out[-1]["role"] == "user":
                _append(out[-1], text)
            else:
                pending.append(text)
            continue
        texts: list[str | ImagePart] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if block.type == "text":
                texts.append(block.text)
            elif block.type == "image" and message.role == "user":
                texts.append(image_part(block, where))
                if images is not None:
                    images.append(where)
            elif block.type == "thinking" and message.role == "assistant":
                if i not in cleared.thinking:
                    thoughts.append(block.thinking)
            elif block.type in SKIPPED_BLOCKS and message.role == "assistant":
                continue
            elif block.type == "tool_use" and message.role == "assistant":
                function = {"name": block.name, "arguments": cleared_input(block, cleared)}
                calls.append({"id": block.id, "type": "function", "function": function})
            elif block.type == "tool_result" and message.role == "user":
                cut = block.tool_use_id in cleared.results
                result = PLACEHOLDER if cut else _result_text(block, where)
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
            elif block.type in ("tool_use", "tool_result", "thinking", "image", *SKIPPED_BLOCKS):
                # a user turn of thinking blocks only vanished (the assistant turn before it
                # then read as a prefill to continue)
                raise bad_request(
                    f"A '{block.type}' block cannot be in a message of role '{message.role}',"
                    f" field: '{where}'",
                    where,
                )
            else:
                raise _unsupported_block(block.type, where)
        if message.role == "user" and pending:
            texts, pending = [*pending, *texts], []
        _add_turn(out, message.role, texts, thoughts, calls)
    if pending:
        _add_turn(out, "user", pending, [], [])
    for message in out:
        texts = message.pop(_TEXTS, None)
        if texts is not None:
            sep = "" if message["role"] == "assistant" else "\n\n"
            message["content"] = _content(texts, sep)
        thoughts = message.pop(_THOUGHTS, None)
        if thoughts is not None:
            message["reasoning_content"] = "\n\n".join(thoughts)
    return out


def _system_texts(blocks: list[Any], i: int) -> list[str]:
    for j, block in enumerate(blocks):
        if block.type != "text":
            where = f"messages.{i}.content.{j}"
            raise bad_request(
                f"A '{block.type}' block cannot be in a message of role 'system': it holds"
                f" text blocks only, field: '{where}'",
                where,
            )
    return [block.text for block in blocks]


def _content(texts: list[str | ImagePart], sep: str) -> str | list[dict[str, Any]]:
    """A message's content from its texts (joined by `sep`) and images: a list of parts
    (consecutive texts joined into one) where there is an image, else the text."""
    if not any(isinstance(t, dict) for t in texts):
        return sep.join(t for t in texts if isinstance(t, str) and t)
    parts: list[dict[str, Any]] = []
    run: list[str] = []
    for item in [*texts, None]:
        if isinstance(item, str):
            if item:
                run.append(item)
            continue
        if run:
            parts.append({"type": "text", "text": sep.join(run)})
            run = []
        if item is not None:
            parts.append(item)
    return parts


def _add_turn(
    out: list[dict[str, Any]],
    role: str,
    texts: list[str | ImagePart],
    thoughts: list[str],
    calls: list[dict[str, Any]],
) -> None:
    """A turn's chat message, or its text added to the message before (one of the same role)."""
    if not any(texts) and not calls:  # an empty final assistant turn: no prefill
        return
    has_image = any(isinstance(t, dict) for t in texts)  # an image part (user turns only)
    sep = "" if role == "assistant" else "\n\n"
    text = "" if has_image else sep.join(t for t in texts if isinstance(t, str))
    last = out[-1] if out else None
    thought = "\n\n".join(t for t in thoughts if t)
    if last is not None and last["role"] == role and not last.get("tool_calls"):
        if has_image:
            last.setdefault(_TEXTS, [last["content"]]).extend(texts)
        else:
            _append(last, text)
        if calls:
            last["tool_calls"] = calls
        if thought:
            before = last.get("reasoning_content")
            last.setdefault(_THOUGHTS, [before] if before else []).append(thought)
        return
    turn: dict[str, Any] = {"role": role, "content": text if texts else None}
    if has_image:
        turn[_TEXTS] = list(texts)
    if calls:
        turn["tool_calls"] = calls
    if thought:
        turn["reasoning_content"] = thought
    out.append(turn)


# texts a message's content is joined from at the end (as _join would, one by one): adding each
# to the whole text so far copied it every time (30,000 user messages: 2 s of the event loop)
_TEXTS = "_texts"
_THOUGHTS = "_thoughts"  # the same for the reasoning of merged assistant turns


def _append(message: dict[str, Any], text: str) -> None:
    message.setdefault(_TEXTS, [message["content"]]).append(text)


def _join(before: str | None, text: str, role: str) -> str:
    if not before:
        return text
    return before + ("" if role == "assistant" else "\n\n") + text if text else before


def chat_tools(req: MessagesRequest) -> tuple[list[dict[str, Any]] | None, Any, bool | None]:
    """Chat's tools, tool_choice and parallel_tool_calls."""
    tools = None
    if req.tools is not None:
        tools = []
        for i, tool in enumerate(req.tools):
            if tool.type not in (None, "custom"):
                raise bad_request(
                    f"Tool type '{tool.type}' is not supported: this server runs no server tools,"
                    f" field: 'tools.{i}.type'",
                    f"tools.{i}.type",
                )
            if tool.input_schema is None:
                raise bad_request(
                    f"Field required, field: 'tools.{i}.input_schema'", f"tools.{i}.input_schema"
                )
            if tool.allowed_callers is not None and "direct" not in tool.allowed_callers:
                raise bad_request(
                    "Tool callers other than 'direct' are not supported: this server runs no"
                    " code execution tool, so only the model calls tools, field:"
                    f" 'tools.{i}.allowed_callers'",
                    f"tools.{i}.allowed_callers",
                )
            function = {
                "name": tool.name,
                "description": _description(tool),
                "parameters": tool.input_schema,
                "strict": tool.strict,
            }
            tools.append({"type": "function", "function": function})
    choice = req.tool_choice
    parallel = None
    if isinstance(choice, ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool):
        if choice.disable_parallel_tool_use:
            parallel = False
    if isinstance(choice, ToolChoiceAuto):
        return tools, "auto", parallel
    if isinstance(choice, ToolChoiceAny):
        return tools, "required", parallel
    if isinstance(choice, ToolChoiceTool):
        return tools, {"type": "function", "function": {"name": choice.name}}, parallel
    if isinstance(choice, ToolChoiceNone):
        return tools, "none", parallel
    return tools, None, parallel


def _source_field(req: CountTokensRequest, where: str) -> str:
    """The field of the image block at `where` (messages.i.content.j) that holds its image."""
    i, j = (int(n) for n in where.split(".")[1::2])
    block = req.messages[i].content[j]
    return f"{where}.source." + ("url" if block.source.type == "url" else "data")


def _description(tool: Tool) -> str | None:
    """The tool's description, and its input_examples after it (Anthropic shows them to the
    model: here the description is what the template shows of a tool besides its schema)."""
    if not tool.input_examples:
        return tool.description
    examples = "\n".join(json.dumps(e, ensure_ascii=False) for e in tool.input_examples)
    return f"{tool.description or ''}\n\nInput examples:\n{examples}".lstrip()


def to_chat_request(req: MessagesRequest, cleared: Cleared | None = None) -> TranslatedChat:
    """The chat request of a Messages request; `cleared`: what context edits leave out (None:
    the thinking a clear_thinking edit clears; tool uses are cleared once the prompt is known,
    girandole.api.messages.route)."""
    config = req.output_config
    effort = config.effort if config is not None else None
    response_format = None
    if config is not None and config.format is not None:
        schema = {"name": "output", "schema": config.format.schema_}
        response_format = {"type": "json_schema", "json_schema": schema}
    check_not_empty(req)
    check_context_edits(req)
    images: list[str] = []
    messages = chat_messages(req, cleared, images)  # blocks in the wrong role are a 400 first
    check_tool_pairing(req.messages)
    check_forced_output(req, messages)
    check_thinking_prefill(req, messages)
    tools, tool_choice, parallel = chat_tools(req)
    fields = {
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": req.stop_sequences,
        "stream": req.stream,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": parallel,
        "response_format": response_format,
        "raw_output": req.raw_output,
        # chat's reasoning fields (girandole.api.chat.reasoning): `thinking` in Anthropic's form
        "thinking": (
            req.thinking.model_dump(exclude_none=True, exclude={"display"})
            if req.thinking
            else None
        ),
        "reasoning_effort": EFFORTS[effort] if effort is not None else None,
        # Anthropic's effort governs all output, not only thinking: a model that cannot think
        # takes it as a hint with nothing to change (Claude Code always sends it)
        "effort_is_hint": effort is not None,
        "user": req.metadata.user_id if req.metadata is not None else None,
        "image_fields": [(where, _source_field(req, where)) for where in images],
    }
    return to_chat(fields, req)
