"""A choice's output as a list of blocks (reasoning, text, tool calls) for the APIs that write
blocks: Anthropic's content blocks, OpenAI Responses' output items.

Chat's `ReasoningSplitter` takes the reasoning out first (a template that can think: the text up
to `</think>`, a `thinking` block), then chat's `ToolStream` decides what the rest is (content,
or calls recognised in it, streamed as written) and says it as chat deltas; `OutputBlocks` turns
those into block events: a block starts, grows (reasoning, text, or a call's arguments as JSON
text), and stops. A whole response feeds the whole text at once and reads `blocks`.
`max_calls` keeps the first calls only (Responses' `max_tool_calls`).

A call forced to one function (a named tool_choice, or `required`/`any` with one allowed) is that
function's call from the output's first token, as OpenAI's and Anthropic's forced calls are (their
name comes first): chat's `ToolStream` sends its header then, so a call cut short before the
model wrote the name is still the (incomplete) call the client forced, not an empty output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import pydantic_core

from girandole.api.chat.reasoning import ReasoningPlan, reasoning_tokens, splitter_for
from girandole.api.chat.tool_calls import ToolStream
from girandole.api.chat.tools import ToolPlan
from girandole.api.serving.choice import Choice
from girandole.api.serving.growing_text import append_text


@dataclass
class Block:
    type: Literal["thinking", "text", "call"]
    index: int  # in the output
    text: str = ""  # the reasoning, the text, or the call's arguments (JSON text)
    call_id: str | None = None
    name: str | None = None

    def arguments(self) -> dict[str, Any] | None:
        """A call's arguments as an object; None when they are not (cut short by max_tokens)."""
        try:
            value = json.loads(self.text or "{}")
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def partial_arguments(self) -> dict[str, Any]:
        """A call's arguments cut short, as far as they parse: what the Anthropic SDK makes of
        the same text streamed as `input_json_delta` events (jiter's partial mode: complete
        values only, an unfinished string dropped)."""
        try:
            value = pydantic_core.from_json(self.text or "{}", allow_partial=True)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


Event = tuple[Literal["start", "delta", "stop"], Block, str]  # (what, block, new text)


class OutputBlocks:
    """One choice's blocks, built from its text as it arrives."""

    def __init__(
        self,
        plan: ToolPlan | None,
        reasoning: ReasoningPlan | None = None,
        max_calls: int | None = None,
    ) -> None:
        self.calls = ToolStream(plan)
        # a template that can think: its reasoning split out (chat's rules)
        self.splitter = splitter_for(reasoning) if reasoning is not None else None
        self.max_calls = max_calls
        self.blocks: list[Block] = []
        self._open: Block | None = None
        self._call_blocks: dict[int, Block | None] = {}  # chat's call index -> block (None: cut)
        self._made = 0  # call blocks made (counted, not summed again at each call: quadratic)
        self.finish_reason: str | None = None  # once finished

    def feed(self, text: str, finished: bool, finish_reason: str | None = None) -> list[Event]:
        """The events of new `text`; when `finished` (with the engine's finish_reason), the last
        ones, and `finish_reason` becomes the choice's ("tool_calls" if its output is calls)."""
        events: list[Event] = []
        if self.splitter is not None:
            thought, text = self.splitter.feed(text, final=finished)
            if thought:
                events += self._grow("thinking", thought)
        deltas = self.calls.feed(text)
        if finished:
            tail, self.finish_reason = self.calls.finish(finish_reason)
            deltas += tail
        for delta in deltas:
            events += self._apply(delta)
        if finished:
            events += self._close()
        return events

    def _grow(self, kind: Literal["thinking", "text"], text: str) -> list[Event]:
        """`text` onto the open block of `kind` (a new one if the open block is another)."""
        events: list[Event] = []
        if self._open is None or self._open.type != kind:
            events += self._start(Block(kind, len(self.blocks)))
        assert self._open is not None
        append_text(self._open, "text", text)
        events.append(("delta", self._open, text))
        return events

    def _apply(self, delta: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        text = delta.get("content")
        if text:
            events += self._grow("text", text)
        for call in delta.get("tool_calls") or []:
            function = call["function"]
            if "id" in call:  # a call's header: a block of its own, unless past max_calls
                if self.max_calls is not None and self._made >= self.max_calls:
                    self._call_blocks[call["index"]] = None
                    continue
                block = Block("call", len(self.blocks), call_id=call["id"], name=function["name"])
                events += self._start(block)
                self._call_blocks[call["index"]] = block
                self._made += 1
            block = self._call_blocks[call["index"]]
            if block is None:
                continue
            fragment = function.get("arguments") or ""
            if fragment:
                append_text(block, "text", fragment)
                events.append(("delta", block, fragment))
        return events

    def _start(self, block: Block) -> list[Event]:
        events = self._close()
        self.blocks.append(block)
        self._open = block
        return events + [("start", block, "")]

    def _close(self) -> list[Event]:
        block, self._open = self._open, None
        return [("stop", block, "")] if block is not None else []


def feed_choice(
    blocks: OutputBlocks,
    choice: Choice,
    text: str,
    finished: bool,
    think_end_id: int | None = None,
) -> list[Event]:
    """`blocks.feed` for a choice: its finish_reason becomes the blocks' once finished, and its
    reasoning tokens are counted (`think_end_id`: the </think> token, if the vocabulary has one)."""
    events = blocks.feed(text, finished, choice.finish_reason)
    if finished:
        choice.finish_reason = blocks.finish_reason
        if blocks.splitter is not None:
            choice.reasoning_tokens = reasoning_tokens(
                blocks.splitter, choice.token_ids, choice.tokenizer, think_end_id
            )
    return events
