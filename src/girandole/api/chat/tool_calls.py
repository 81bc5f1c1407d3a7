"""Tool calls out of a chat choice's output (the prompt side: `girandole.api.chat.tools`).

The output.
- `tool_choice` `"required"`/`"any"`, a named function, or `allowed_tools` in mode `required`:
  decoding is constrained to a call (a JSON schema: `name` one of the allowed names, then
  `arguments` that function's `parameters` schema); with `parallel_tool_calls` (the default,
  true) the model may instead write an array of calls. A named function is always one call.
- `"auto"` (the default with tools): decoding is free; the output is a call when the whole of
  it (trimmed, a Markdown code fence around it removed) parses as a call or an array of calls in
  the format above, or is only calls each in `<tool_call>...</tool_call>` tags (the format
  Hermes' and Qwen's chat templates ask for), to allowed functions, with object arguments
  (`"parameters"` is read as a synonym of `"arguments"`). Otherwise it is plain content. With
  `parallel_tool_calls: false` an array of several calls gives only its first.
- A call gives `message.tool_calls` (`id` `call_<24 hex>`, `type: "function"`, `function.name`,
  `function.arguments`: the arguments exactly as the model wrote them, a JSON string) with
  `content: null` and `finish_reason: "tool_calls"`.
- A forced call cut short (max_tokens, a stop string) keeps `finish_reason` and gives the calls
  whose names were written, arguments as far as they go, `content: null` (what the stream's
  deltas add up to, and what OpenAI answers); cut before its name, neither calls nor content.
- Streaming: per call, one chunk with `index`, `id`, `type` and `function.name` (and arguments
  `""`), then the arguments as string fragments as they are generated. Constrained output is
  known to be a call from its first token; under `auto`, output that starts with `{`, `[`, a
  code fence or `<tool_call>` is held back until it ends and then sent as calls (header chunk
  and one arguments chunk each) or as content.
- `response_format` together with a forced call is a 400; with `auto` the response_format
  grammar applies and a call is still recognised in the output.
- The deprecated `functions`/`function_call` are read as `tools`/`tool_choice`.
"""

from __future__ import annotations

import json
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

from girandole.api.chat.tools import ARGUMENT_KEYS, ToolPlan
from girandole.api.serving.growing_text import append_text


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


# where a JSON string may end: its closing quote, or an escape to step over
_QUOTE_OR_ESCAPE = re.compile(r'["\\]')


def _string_end(text: str, i: int, j: int | None = None) -> tuple[int | None, int]:
    """(the end of the JSON string opening at i, or None while unfinished; where a later call
    may go on scanning it from). `j`: where an earlier call stopped."""
    j = i + 1 if j is None else j
    while True:
        found = _QUOTE_OR_ESCAPE.search(text, j)
        if found is None:
            return None, len(text)
        k = found.start()
        if text[k] == '"':
            return k + 1, k + 1
        if k + 1 >= len(text):
            return None, k  # an escape cut in two: read it again with what follows
        j = k + 2


class CallScanner:
    """The calls in a (possibly unfinished) JSON call or array of calls: their names once
    written, and the span of their arguments. Stops at the first thing it cannot read.

    The text may grow between `scan`s (a stream's output so far); each scan reads on from
    where the last one stopped, so a stream's scans cost its length once in all (scanning the
    whole text at every token was quadratic: 36 ms a token once a call's arguments reached
    45 KB, on the event loop)."""

    def __init__(self) -> None:
        self.calls: list[CallSpan] = []
        self._stack: list[_Frame] = []
        self._i = 0  # the first character not yet read
        self._string: tuple[int, int] | None = None  # an unfinished string: (start, read to)

    def _string_end(self, text: str, i: int) -> int | None:
        resume = self._string[1] if self._string is not None and self._string[0] == i else None
        end, reached = _string_end(text, i, resume)
        self._string = (i, reached) if end is None else None
        return end

    def scan(self, text: str) -> list[CallSpan]:
        calls, stack = self.calls, self._stack
        i, n = self._i, len(text)

        def value_start(pos: int) -> CallSpan | None:
            top = stack[-1] if stack else None
            if top is not None and top.call is not None and top.key in ARGUMENT_KEYS:
                top.call.args_start = pos
                return top.call
            return None

        # each branch either reads a whole element (and moves i past it) or stops before it,
        # with nothing changed, to read it again once more text has come
        while i < n:
            c = text[i]
            if c in " \t\r\n":
                i += 1
                continue
            top = stack[-1] if stack else None
            if top is not None and top.kind == "obj" and top.expect_key:
                if c == '"':
                    end = self._string_end(text, i)
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
                end = self._string_end(text, i)
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
        self._i = i
        return calls


def scan_calls(text: str) -> list[CallSpan]:
    """`CallScanner().scan(text)`: the calls in a whole text."""
    return CallScanner().scan(text)


_FENCE = "```"
_LANGUAGE = frozenset(string.ascii_letters)  # a fence's info string: ```json


def unfence(body: str) -> str | None:
    """What a Markdown code fence around `body` (stripped) holds, stripped; None when `body` is
    not fenced: ```, a language name, then anything that ends in ```. By hand: the regex it
    replaces (a lazy group between optional blanks) backtracked over blanks after a fence that
    does not close, cubic in their number (1,000 newlines: 2.9 s of the event loop at a tools
    response's finish, 3,000: 77 s)."""
    if not body.startswith(_FENCE):
        return None
    i = len(_FENCE)
    while i < len(body) and body[i] in _LANGUAGE:
        i += 1
    rest = body[i:]
    if len(rest) < len(_FENCE) or not rest.endswith(_FENCE):
        return None
    return rest[: -len(_FENCE)].strip()


# Hermes' and Qwen's form, which their chat templates ask for: each call in its own tag
TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"


def untag_calls(body: str) -> str:
    """Output that is only `<tool_call>{...}</tool_call>` blocks (Hermes', Qwen's format) as
    a JSON array of their bodies; any other output as it is. One pass over the text (a regex
    of repeated lazy blocks backtracks exponentially on many blocks and an unclosed one), by
    index (cutting the rest off after each block copied it: quadratic, 4.7 s for 50,000)."""
    parts: list[str] = []
    text = body.strip()
    i, n = 0, len(text)
    while i < n:
        end = text.find(TAG_CLOSE, i) if text.startswith(TAG_OPEN, i) else -1
        if end < 0:
            return body
        parts.append(text[i + len(TAG_OPEN) : end].strip())
        i = end + len(TAG_CLOSE)
        while i < n and text[i].isspace():
            i += 1
    return "[" + ", ".join(parts) + "]" if parts else body


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as written


def parse_calls(text: str, allowed: list[str], parallel: bool = True) -> list[ParsedCall] | None:
    """The calls in a finished output, or None when it is not (only) calls to allowed tools.
    Not `parallel` (`parallel_tool_calls: false`): at most one call, the first written."""
    body = text.strip()
    fenced = unfence(body)
    if fenced is not None:
        body = fenced
    body = untag_calls(body)
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
    return out if parallel else out[:1]


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
        calls = parse_calls(text, plan.allowed, plan.parallel)
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls_json(calls)}
            return message, "tool_calls"
        started = text.lstrip()[:1] in ("{", "[") or (plan.forced_name and not text.strip())
        if plan.mode == "required" and started:
            # cut short: max_tokens, a stop
            return cut_call_message(text, plan.forced_name), finish_reason
    return {"role": "assistant", "content": text}, finish_reason


def cut_call_message(text: str, forced_name: str | None = None) -> dict[str, Any]:
    """A forced call that did not finish, as its stream shows it (and as OpenAI answers a call
    cut by max_tokens): each call whose name is written, its arguments as far as they go, and
    no content. The output is the call's JSON, never text meant for the user. A call cut before
    its name is the call of `forced_name` (a call forced to one function is that call from the
    first token, as OpenAI's and Anthropic's are), else no call and no content."""
    calls = []
    for span in scan_calls(text):
        if span.name is None:
            break
        end = span.args_end if span.args_end is not None else len(text)
        arguments = text[span.args_start : end] if span.args_start is not None else ""
        calls.append(ParsedCall(span.name, arguments))
    if not calls and forced_name is not None:
        calls.append(ParsedCall(forced_name, ""))
    message: dict[str, Any] = {"role": "assistant", "content": None}
    if calls:
        message["tool_calls"] = tool_calls_json(calls)
    return message


@dataclass
class ToolStream:
    """Turns one choice's text deltas into chat deltas: content, or tool-call fragments."""

    plan: ToolPlan | None
    text: str = ""
    mode: str = "undecided"  # "content" | "calls" (streamed as written) | "held" (auto, JSON)
    headers: list[str] = field(default_factory=list)  # call ids sent, per call
    sent: list[int] = field(default_factory=list)  # argument characters sent, per call
    is_call: bool = False
    scanner: CallScanner = field(default_factory=CallScanner)  # over `text` as it grows
    # undecided: `text` is blanks, then this (the start of a tag, or nothing); the head read
    # from it and the new text, not by stripping `text` again at every token (quadratic: 4.9 s
    # for 100,000 newline tokens)
    _head: str = ""
    # calls before this one are whole and sent: not walked again at every token (walking all
    # of them was quadratic in their number: 2,000 calls streamed in 6.6 s)
    _done: int = 0

    def __post_init__(self) -> None:
        if self.plan is None or not self.plan.detects_calls:
            self.mode = "content"
        elif self.plan.mode == "required":
            self.mode = "calls"

    def feed(self, new_text: str) -> list[dict[str, Any]]:
        if self.mode == "content":
            return [{"content": new_text}] if new_text else []
        append_text(self, "text", new_text)
        if self.mode == "undecided":
            head = self._head + new_text if self._head else new_text.lstrip()
            if not head:
                return []
            if head[0] in "{[`" or head.startswith(TAG_OPEN):
                self.mode = "held"
                return []
            if TAG_OPEN.startswith(head):  # maybe a tagged call: wait until it is told
                self._head = head
                return []
            self.mode = "content"
            return [{"content": self.text}]
        if self.mode == "calls":
            return self._stream_calls()
        return []

    def _stream_calls(self, finishing: bool = False) -> list[dict[str, Any]]:
        deltas = []
        forced = self.plan.forced_name if self.plan is not None else None
        if forced is not None and not self.headers and (self.text or finishing):
            # its header from the first token: a call cut before its name is still this call
            self.headers.append(new_call_id())
            self.sent.append(0)
            deltas.append(_call_delta(0, self.headers[0], forced, ""))
        calls = self.scanner.scan(self.text)
        for k in range(self._done, len(calls)):
            span = calls[k]
            if span.name is None:
                break
            if k >= len(self.headers):
                call_id = new_call_id()
                self.headers.append(call_id)
                self.sent.append(0)
                deltas.append(_call_delta(k, call_id, span.name, ""))
            if span.args_start is not None:
                end = span.args_end if span.args_end is not None else len(self.text)
                start = span.args_start + self.sent[k]
                if end > start:
                    deltas.append(_args_delta(k, self.text[start:end]))
                    self.sent[k] = end - span.args_start
            if k == self._done and k + 1 < len(calls):  # a later call began: this one is whole
                self._done = k + 1
        return deltas

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas of the choice and its finish_reason."""
        if self.mode == "content":
            return [], finish_reason
        if self.mode == "undecided":  # only blanks so far
            return ([{"content": self.text}] if self.text else []), finish_reason
        assert self.plan is not None
        calls = parse_calls(self.text, self.plan.allowed, self.plan.parallel)
        if self.mode == "calls":
            deltas = self._stream_calls(finishing=True)
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
