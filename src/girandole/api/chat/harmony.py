"""OpenAI's "harmony" output format (gpt-oss): the answer is a run of messages, each a header
and a body,

    <|channel|>analysis<|message|>REASONING<|end|><|start|>assistant<|channel|>final<|message|>ANSWER

(the prompt ends with `<|start|>assistant`; `<|return|>` or `<|call|>`, stop tokens, end it).
The header names the channel: `analysis` (the chain of thought) comes back as
`reasoning_content`, `final` and `commentary` (preambles the model writes to the user) as
`content`. The markers reach this text because the tokenizer keeps them as text
(tokenizer/harmony.py).

A message addressed to a function (`to=functions.NAME` in its header, its body the JSON
arguments, ended by `<|call|>`) is a tool call: it is passed on as content in the form chat's
tool-call reader takes from any model, `<tool_call>{"name": NAME, "arguments": ARGS}</tool_call>`
(api/chat/tool_calls.py), once its body is complete; a body that is not a JSON object stays as
the model wrote it, header and all.

`HarmonySplitter` has ReasoningSplitter's interface (api/chat/reasoning.py), fed a choice's text
as it comes; text that may be the start of a marker is held until it is known.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from girandole.api.serving.growing_text import append_text

CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
START = "<|start|>"
END = "<|end|>"
BODY_ENDS = (END, START, "<|return|>", "<|call|>")  # what ends a message's body
REASONING_CHANNEL = "analysis"
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")
_RECIPIENT = re.compile(r"(?:^|\s|>)to=functions\.([\w.\-]+)")


def is_harmony(template: str) -> bool:
    """A chat template that writes harmony messages (gpt-oss's)."""
    return CHANNEL in template and MESSAGE in template


def _held_tail(text: str) -> int:
    """Characters at the end of `text` that could start a body-ending marker."""
    at = text.rfind("<|")
    if at < 0:
        return 1 if text.endswith("<") else 0
    tail = text[at:]
    return len(tail) if any(m.startswith(tail) for m in BODY_ENDS) else 0


@dataclass
class HarmonySplitter:
    """One choice's harmony output split into reasoning and content as it comes."""

    # "header": reading a message's header; "body": inside one; "plain": the model wrote no
    # harmony at all (everything is content)
    state: str = "header"
    pending: str = ""
    channel: str = ""  # the current message's channel
    recipient: str | None = None  # the function the current message calls, if any
    header: str = ""  # the current message's header (a call's, to pass on if it is not one)
    reasoning_text: str = ""
    content_text: str = ""
    ended: bool = False  # an analysis message was closed (its reasoning is complete)
    _saw_reasoning: bool = False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) that `text` adds; `final`: nothing more will come."""
        self.pending += text
        reasoning, content = [], []
        while self.pending:
            if self.state == "plain":
                content.append(self.pending)
                self.pending = ""
            elif self.state == "header":
                stripped = self.pending.lstrip()
                # a header opens with a marker, or with the recipient right after the prompt's
                # `<|start|>assistant`
                opens = ("<|", "to=")
                if stripped and not any(
                    stripped.startswith(o) or o.startswith(stripped) for o in opens
                ):
                    self.state = "plain"  # no header: plain text
                    continue
                at = self.pending.find(MESSAGE)
                if at < 0:
                    if final:  # a header never finished: nothing to show of it
                        self.pending = ""
                    break
                self.header = self.pending[:at]
                m = _CHANNEL_NAME.search(self.header)
                self.channel = m.group(1) if m else ""
                call = _RECIPIENT.search(self.header)
                self.recipient = call.group(1) if call else None
                self.pending = self.pending[at + len(MESSAGE) :]
                self.state = "body"
            elif self.recipient is not None:  # a call's arguments: whole, then passed on
                ends = [(i, m) for m in BODY_ENDS if (i := self.pending.find(m)) >= 0]
                if not ends and not final:
                    break
                at = min(ends)[0] if ends else len(self.pending)
                marker = min(ends)[1] if ends else ""
                args, self.pending = self.pending[:at], self.pending[at + len(marker) :]
                if marker == START:
                    self.pending = START + self.pending
                content.append(_call_text(self.recipient, self.header, args))
                self.recipient, self.state = None, "header"
            else:  # body
                ends = [(i, m) for m in BODY_ENDS if (i := self.pending.find(m)) >= 0]
                if ends:
                    at, marker = min(ends)
                    body, self.pending = self.pending[:at], self.pending[at + len(marker) :]
                    if marker != END:
                        self.pending = marker + self.pending if marker == START else ""
                    self._emit(body, reasoning, content)
                    if self.channel == REASONING_CHANNEL:
                        self.ended = True
                    self.state = "header"
                    continue
                keep = 0 if final else _held_tail(self.pending)
                body = self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(body) :]
                self._emit(body, reasoning, content)
                break
        r, c = "".join(reasoning), "".join(content)
        append_text(self, "reasoning_text", r)
        append_text(self, "content_text", c)
        return r, c

    def _emit(self, body: str, reasoning: list[str], content: list[str]) -> None:
        if not body:
            return
        if self.channel == REASONING_CHANNEL:
            self._saw_reasoning = True
            reasoning.append(body)
        else:
            content.append(body)

    def finish(self) -> tuple[str, str]:
        return self.feed("", final=True)

    @property
    def reasoned(self) -> bool:
        return self._saw_reasoning or self.ended


def _call_text(name: str, header: str, args: str) -> str:
    """A harmony call as a `<tool_call>` block, or as written where its arguments are not a
    JSON object."""
    try:
        parsed = json.loads(args)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        return header + MESSAGE + args
    return f'<tool_call>{{"name": {json.dumps(name)}, "arguments": {args.strip()}}}</tool_call>'
