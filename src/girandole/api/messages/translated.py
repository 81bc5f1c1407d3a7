"""An endpoint of another API run as chat: its body is validated against its own schema, then
translated into a chat request (`TranslatedChat`), so the chat template, tools, tool-call
parsing, structured output, sampling and usage are chat's. Only the wire shape is its own.
Anthropic's Messages and OpenAI's Responses are such endpoints."""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request

from girandole.api.chat.images import image_parts
from girandole.api.chat.route import Chat
from girandole.api.chat.schema import ChatCompletionRequest
from girandole.api.chat.shape import ChatShape
from girandole.api.http.errors import APIError
from girandole.api.http.unsupported import strip_unsupported
from girandole.api.http.validation import validate_model
from girandole.api.messages.blocks import Event, OutputBlocks, feed_choice
from girandole.api.serving.choice import Choice
from girandole.api.serving.response import ResponseShape
from girandole.api.state import AppState
from girandole.engine.protocol import EngineClient


class TranslatedChat(ChatCompletionRequest):
    """A chat request made from another API's request, which it carries (`source`)."""

    source: Any = None
    # reasoning_effort came from an API whose effort is a hint about spending (Anthropic's
    # output_config.effort): a template that cannot reason ignores it rather than refusing
    effort_is_hint: bool = False
    # each image part's fields in the source request, in prompt order: (the part, its URL or
    # data), so that chat's 400s about an image name the source's field
    image_fields: list[tuple[str, str]] = []


def to_chat(fields: dict[str, Any], source: Any) -> TranslatedChat:
    """The chat request of `fields` (chat's names; None values left out). The source request was
    validated with chat's limits, so a 400 here is rare (and names chat's field).

    Special-token strings in the text (`<end_of_turn>`, `<|im_start|>` typed by a user) are
    always read as plain text: Anthropic's and OpenAI's APIs have no way to inject turn markers,
    and no field that would opt into it (chat's `safe_tokenization`, always on here)."""
    fields = {**fields, "safe_tokenization": True}
    req = validate_model(TranslatedChat, {k: v for k, v in fields.items() if v is not None})
    req.source = source
    return req


class TranslatedShape(ResponseShape):
    """A response shape over chat's: its template and tool plan (the prompt reads them)."""

    def __init__(self, chat: ChatShape) -> None:
        self.take_chat(chat)

    def take_chat(self, chat: ChatShape | TranslatedShape) -> None:
        """Chat's side of the shape: its template and tool plan (a later round's, in a tool
        loop, whose tool_choice differs)."""
        self.template = chat.template
        self.plan = chat.plan
        self.forced_grammar = chat.forced_grammar
        self.tools_check = chat.tools_check  # a bad tool schema is a 400 whatever tool_choice
        self.reasoning = chat.reasoning  # the prompt is built as chat's (thinking on or off)
        self.think_end_id = chat.think_end_id
        self.allow_private_images = chat.allow_private_images

    def output_blocks(self, max_calls: int | None = None) -> OutputBlocks:
        """A choice's output as blocks: its reasoning (a template that can think), text and
        tool calls, as chat would split and recognise them."""
        return OutputBlocks(self.plan, self.reasoning, max_calls)

    def feed(self, blocks: OutputBlocks, choice: Choice, text: str, finished: bool) -> list[Event]:
        return feed_choice(blocks, choice, text, finished, self.think_end_id)


class TranslatedEndpoint(Chat):
    """Chat's prompt and tools under another API's request and response shapes."""

    # chat's field (a regular expression, matched whole) -> this API's (`re` replacement), for
    # the 400s chat's checks raise (their `param`)
    chat_fields: dict[str, str] = {}

    async def parse(self, request: Request, state: AppState, data: dict[str, Any]) -> Any:
        strip_unsupported(data, self.unsupported)
        return await self.translate(request, state, validate_model(self.schema, data))

    async def translate(self, request: Request, state: AppState, source: Any) -> TranslatedChat:
        """The chat request that runs `source` (a 400 for what chat cannot express)."""
        raise NotImplementedError

    def shape(self, state: AppState, engine: EngineClient, req: TranslatedChat) -> ResponseShape:
        try:
            chat = super().shape(state, engine, req)
        except APIError as exc:
            self.rename_field(exc, req)
            raise
        return self.wire_shape(chat, req)

    async def prompts(self, engine: EngineClient, req: Any, shape: Any) -> list[list[int]]:
        try:
            return await super().prompts(engine, req, shape)
        except APIError as exc:  # the chat template's 400s name chat's `messages`
            self.rename_field(exc, req)
            raise

    def rename_field(self, exc: APIError, req: TranslatedChat) -> None:
        if exc.param and req.image_fields and req.messages is not None:
            for (path, _), (part, url) in zip(image_parts(req.messages), req.image_fields):
                chat_part = path.removesuffix(".image_url.url")
                if exc.param in (path, chat_part):
                    self.renamed(exc, url if exc.param == path else part)
                    return
        for pattern, replacement in self.chat_fields.items():
            if exc.param and re.fullmatch(pattern, exc.param):
                self.renamed(exc, re.sub(pattern, replacement, exc.param))
                return

    @staticmethod
    def renamed(exc: APIError, own: str) -> None:
        """`exc` names `own` instead of its param (in its message too)."""
        exc.message = exc.message.replace(f"'{exc.param}'", f"'{own}'")
        exc.param = own

    def wire_shape(self, chat: ChatShape, req: TranslatedChat) -> TranslatedShape:
        """How the response is written, given chat's shape (its template and tool plan)."""
        raise NotImplementedError
