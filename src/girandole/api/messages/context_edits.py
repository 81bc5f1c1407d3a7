"""Anthropic's context editing (`context_management.edits`, beta context-management-2025-06-27):
what of a conversation the prompt leaves out, and what the answer says of it (`applied_edits`).

- `clear_thinking_20251015`: the thinking blocks of all but the last `keep` assistant turns with
  some (default 1; "all": none cleared). Always applies; its `cleared_input_tokens` counts the
  thinking text left out.
- `clear_tool_uses_20250919`: once the prompt passes its trigger (more than 100,000 input tokens
  unless given; or more than N tool uses), the results of the oldest tool uses, all but the last
  `keep` (default 3) of those not in `exclude_tools`, become `PLACEHOLDER`, and their inputs
  become `{}` where `clear_tool_inputs` says (true: all; a list: those tools'). Its
  `cleared_input_tokens` is what the prompt shrank by (both prompts are rendered); when that is
  under `clear_at_least`, nothing is cleared and the edit is not reported.

The client keeps its whole conversation: only this request's prompt is edited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from girandole.api.http.errors import bad_request
from girandole.api.messages.schema import (
    ClearThinkingEdit,
    ClearToolUsesEdit,
    CountTokensRequest,
    ToolUseBlock,
)

# what a cleared tool result reads as, so the model knows something was there
PLACEHOLDER = "[tool result cleared to save context]"
DEFAULT_TRIGGER_TOKENS = 100_000
DEFAULT_KEEP_TOOL_USES = 3
THINKING = "clear_thinking_20251015"
TOOL_USES = "clear_tool_uses_20250919"


@dataclass(frozen=True)
class Cleared:
    """What the prompt leaves out: thinking of these messages (indices), the results of these
    tool uses (ids) and the inputs of these."""

    thinking: frozenset[int] = frozenset()
    results: frozenset[str] = frozenset()
    inputs: frozenset[str] = frozenset()


@dataclass
class AppliedEdits:
    """The response's `context_management` as the prompt is built (None: the request had none)."""

    requested: bool
    edits: list[dict[str, Any]] = field(default_factory=list)

    def body(self) -> dict[str, Any] | None:
        return {"applied_edits": self.edits} if self.requested else None

    def cleared_tokens(self) -> int:
        return sum(edit["cleared_input_tokens"] for edit in self.edits)


def _edits(req: CountTokensRequest) -> list[Any]:
    return list(req.context_management.edits or []) if req.context_management else []


def check_context_edits(req: CountTokensRequest) -> None:
    """Each edit at most once, and clear_thinking first when both are given (as Anthropic asks:
    thinking is cleared before tool uses are counted)."""
    seen: set[str] = set()
    for i, edit in enumerate(_edits(req)):
        where = f"context_management.edits.{i}.type"
        if edit.type in seen:
            raise bad_request(f"Context edit '{edit.type}' is given more than once", where)
        if edit.type == THINKING and seen:
            raise bad_request(
                f"Context edit '{THINKING}' must be listed first in context_management.edits",
                where,
            )
        seen.add(edit.type)


def cleared_thinking(req: CountTokensRequest) -> list[int]:
    """The messages whose thinking blocks a `clear_thinking_20251015` edit leaves out: every
    assistant message with some, but the last `keep` of them (1 unless given; "all": none)."""
    edit = next((e for e in _edits(req) if isinstance(e, ClearThinkingEdit)), None)
    if edit is None or edit.keep == "all":
        return []
    keep = 1 if edit.keep is None else edit.keep.value
    thinking = [
        i
        for i, message in enumerate(req.messages)
        if message.role == "assistant" and any(b.type == "thinking" for b in message.content)
    ]
    return thinking[: max(0, len(thinking) - keep)]


def thinking_edit(req: CountTokensRequest, count: Any) -> AppliedEdits:
    """The applied edits before tool uses are looked at: the thinking cleared (`count`: tokens
    of a text)."""
    applied = AppliedEdits(requested=req.context_management is not None)
    cleared = cleared_thinking(req)
    if cleared:
        text = "".join(
            block.thinking
            for i in cleared
            for block in req.messages[i].content
            if block.type == "thinking"
        )
        applied.edits.append({"type": THINKING, "cleared_thinking_turns": len(cleared),
                              "cleared_input_tokens": count(text)})  # fmt: skip
    return applied


def tool_uses(req: CountTokensRequest) -> list[ToolUseBlock]:
    """The conversation's tool_use blocks, oldest first."""
    return [
        block
        for message in req.messages
        if message.role == "assistant"
        for block in message.content
        if block.type == "tool_use"
    ]


def tool_uses_to_clear(req: CountTokensRequest, prompt_tokens: int) -> Cleared | None:
    """What a `clear_tool_uses_20250919` edit clears from a prompt of `prompt_tokens` (thinking
    already cleared); None when there is no such edit, it is not triggered, or nothing is
    left to clear."""
    edit = next((e for e in _edits(req) if isinstance(e, ClearToolUsesEdit)), None)
    if edit is None:
        return None
    uses = tool_uses(req)
    trigger = edit.trigger
    if trigger is None or trigger.type == "input_tokens":
        limit = DEFAULT_TRIGGER_TOKENS if trigger is None else trigger.value
        if prompt_tokens <= limit:
            return None
    elif len(uses) <= trigger.value:
        return None
    excluded = set(edit.exclude_tools or [])
    candidates = [use for use in uses if use.name not in excluded]
    keep = DEFAULT_KEEP_TOOL_USES if edit.keep is None else edit.keep.value
    cleared = candidates[: max(0, len(candidates) - keep)]
    if not cleared:
        return None
    which = edit.clear_tool_inputs
    inputs = [u for u in cleared if which is True or (isinstance(which, list) and u.name in which)]
    return Cleared(
        thinking=frozenset(cleared_thinking(req)),
        results=frozenset(use.id for use in cleared),
        inputs=frozenset(use.id for use in inputs if use.input),
    )


def record_tool_edit(
    req: CountTokensRequest, applied: AppliedEdits, cleared: Cleared, shrank_by: int
) -> bool:
    """Report the tool-use edit whose prompt is `shrank_by` tokens shorter; False (not applied)
    when that is under its `clear_at_least`."""
    edit = next(e for e in _edits(req) if isinstance(e, ClearToolUsesEdit))
    if edit.clear_at_least is not None and shrank_by < edit.clear_at_least.value:
        return False
    applied.edits.append({"type": TOOL_USES, "cleared_tool_uses": len(cleared.results),
                          "cleared_input_tokens": max(0, shrank_by)})  # fmt: skip
    return True


def cleared_input(block: ToolUseBlock, cleared: Cleared) -> str:
    """A tool call's arguments as the prompt shows them."""
    return "{}" if block.id in cleared.inputs else json.dumps(block.input, ensure_ascii=False)
