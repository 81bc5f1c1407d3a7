"""How a chat choice is written: a `message` whole, `delta`s in a stream (a role chunk first),
reasoning split from the answer (`girandole.api.chat.reasoning`), tool calls recognised in the
answer (`girandole.api.chat.tool_calls`)."""

from __future__ import annotations

from typing import Any

from girandole.api.chat.reasoning import (
    ReasoningPlan,
    ReasoningSplitter,
    reasoning_tokens,
    splitter_for,
)
from girandole.api.chat.tool_calls import ToolStream, finish_message
from girandole.api.chat.tools import ToolPlan
from girandole.api.serving.choice import Choice
from girandole.api.serving.response import ResponseShape
from girandole.engine.images import PromptImage


class ChatShape(ResponseShape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prompt_ids_on_body = True

    def __init__(
        self,
        template: str,
        plan: ToolPlan | None,
        reasoning: ReasoningPlan | None = None,
        think_end_id: int | None = None,
    ) -> None:
        self.template = template
        self.plan = plan  # declared tools: calls are looked for in the output
        self.forced_grammar = plan.grammar if plan is not None else None
        self.tools_check = plan.check if plan is not None else None
        self.reasoning = reasoning  # a template that can think: its output is split
        self.think_end_id = think_end_id  # the </think> token, to count reasoning tokens
        self._calls: dict[int, ToolStream] = {}  # per choice: content or tool-call deltas
        self._splitters: dict[int, ReasoningSplitter] = {}
        self._echoed: set[int] = set()  # choices whose echoed prompt was passed on
        # The prompt's images (a vision model; api/chat/images.py), for every choice's request.
        self.images: list[PromptImage] = []

    def _splitter(self, choice: Choice) -> ReasoningSplitter:
        splitter = self._splitters.get(choice.index)
        if splitter is None:
            splitter = self._splitters[choice.index] = splitter_for(self.reasoning)
        return splitter

    def _echo_split(self, choice: Choice, text: str) -> tuple[str, str]:
        """(the echoed prompt, the generated text) of a choice's text: an echo is content, and
        only what the model generated is split into reasoning and answer and read for calls."""
        if not choice.echo_text or choice.index in self._echoed:
            return "", text
        self._echoed.add(choice.index)
        echo = choice.echo_text
        return (echo, text[len(echo) :]) if text.startswith(echo) else ("", text)

    def _count(self, choice: Choice, splitter: ReasoningSplitter) -> None:
        choice.reasoning_tokens = reasoning_tokens(
            splitter, choice.token_ids, choice.tokenizer, self.think_end_id
        )

    def whole(self, choice: Choice) -> dict[str, Any]:
        # the echoed prompt (the tool listing too) is never read as reasoning or tool calls
        echo, text = self._echo_split(choice, choice.full_text)
        reasoning = None
        if self.reasoning is not None:
            splitter = self._splitter(choice)
            splitter.feed(text, final=True)
            reasoning = splitter.reasoning_text if splitter.reasoned else None
            text = splitter.content_text
            self._count(choice, splitter)
        message, choice.finish_reason = finish_message(self.plan, text, choice.finish_reason)
        if echo:  # content before the answer, beside any tool calls (as the stream sends it)
            message["content"] = echo + (message["content"] or "")
        if self.reasoning is not None:
            message["reasoning_content"] = reasoning or None
        return {"message": message}

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant"}}

    def pieces(self, choice: Choice, text: str, finished: bool) -> list[dict[str, Any]]:
        calls = self._calls.get(choice.index)
        if calls is None:  # not setdefault: that built a ToolStream for every chunk
            calls = self._calls[choice.index] = ToolStream(self.plan)
        echo, text = self._echo_split(choice, text)
        deltas: list[dict[str, Any]] = [{"content": echo}] if echo else []
        if self.reasoning is not None:
            splitter = self._splitter(choice)
            reasoning, text = splitter.feed(text, final=finished)
            if reasoning:
                deltas.append({"reasoning_content": reasoning})
            if finished:
                self._count(choice, splitter)
        deltas += calls.feed(text) if text else []
        if finished:
            tail, choice.finish_reason = calls.finish(choice.finish_reason)
            deltas += tail
        if echo and len(deltas) > 1 and set(deltas[1]) == {"content"}:
            # the echo and the first generated text in one chunk (as /completions sends them),
            # the chunk that carries the logprobs and ids of both
            deltas[:2] = [{"content": echo + deltas[1]["content"]}]
        return [{"delta": delta} for delta in deltas]

    def text_piece(self, text: str) -> dict[str, Any]:
        # no text (a chunk for logprobs or ids alone: a tool call's name still being written,
        # text held back for a stop string): an empty delta, never `content: ""`, which turned
        # a streamed tool call's message content from null into "" in clients that add it up
        return {"delta": {"content": text} if text else {}}

    def finish_piece(self) -> dict[str, Any]:
        return {"delta": {}}

    def add_internal_content(self, body: dict[str, Any], token_ids: list[int]) -> None:
        content = {"token_id": token_ids[-1], "token_ids": list(token_ids)}
        body["delta"] = {**body["delta"], "internal_content": content}
