"""How a chat choice is written: a `message` whole, `delta`s in a stream (a role chunk first),
tool calls recognised in the output (`girandole.api.chat.tool_calls`)."""

from __future__ import annotations

from typing import Any

from girandole.api.chat.tool_calls import ToolStream, finish_message
from girandole.api.chat.tools import ToolPlan
from girandole.api.serving.choice import Choice
from girandole.api.serving.response import ResponseShape


class ChatShape(ResponseShape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, template: str, plan: ToolPlan | None) -> None:
        self.template = template
        self.plan = plan  # declared tools: calls are looked for in the output
        self.forced_grammar = plan.grammar if plan is not None else None
        self._calls: dict[int, ToolStream] = {}  # per choice: content or tool-call deltas

    def whole(self, choice: Choice) -> dict[str, Any]:
        message, choice.finish_reason = finish_message(
            self.plan, choice.full_text, choice.finish_reason
        )
        return {"message": message}

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant"}}

    def pieces(self, choice: Choice, text: str, finished: bool) -> list[dict[str, Any]]:
        calls = self._calls.setdefault(choice.index, ToolStream(self.plan))
        deltas = calls.feed(text)
        if finished:
            tail, choice.finish_reason = calls.finish(choice.finish_reason)
            deltas += tail
        return [{"delta": delta} for delta in deltas]

    def text_piece(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text}}

    def finish_piece(self) -> dict[str, Any]:
        return {"delta": {}}
