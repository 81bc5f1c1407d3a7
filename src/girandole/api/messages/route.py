"""POST /v1/messages (also under /inference/v1): Anthropic's Messages API, run as chat; and
POST /v1/messages/count_tokens, its prompt's token count (`count_tokens.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import Response

from girandole.api.chat.shape import ChatShape
from girandole.api.http.openapi import body_doc
from girandole.api.messages.context_edits import (
    record_tool_edit,
    thinking_edit,
    tool_uses_to_clear,
)
from girandole.api.messages.convert import to_chat_request
from girandole.api.messages.count_tokens import count_tokens
from girandole.api.messages.schema import CountTokensRequest, MessagesRequest
from girandole.api.messages.shape import MessagesShape, anthropic_error
from girandole.api.messages.thinking import check_thinking_budget, check_thinking_sampling
from girandole.api.messages.translated import TranslatedChat, TranslatedEndpoint
from girandole.api.serving.job import Job
from girandole.api.serving.pipeline import inference_router
from girandole.api.state import AppState
from girandole.engine.protocol import EngineClient

# Fields no client needs for plain use, accepted only when they ask for nothing.
MESSAGES_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "service_tier": lambda v: v in ("auto", "standard_only"),
    "container": lambda v: False,
    "mcp_servers": lambda v: v == [],
}


class Messages(TranslatedEndpoint):
    chat_fields = {
        "reasoning_effort": "output_config.effort",
        r"tools\.(\d+)\.function\.parameters": r"tools.\1.input_schema",  # tools keep their order
        "response_format": "output_config.format",
    }

    async def translate(
        self, request: Request, state: AppState, source: MessagesRequest
    ) -> TranslatedChat:
        # not in to_chat_request: count_tokens has no max_tokens nor sampling fields
        check_thinking_budget(source)
        check_thinking_sampling(source)
        return to_chat_request(source)

    def shape(self, state: AppState, engine: EngineClient, req: TranslatedChat) -> MessagesShape:
        shape = super().shape(state, engine, req)
        assert isinstance(shape, MessagesShape)
        shape.edits = thinking_edit(
            req.source,
            lambda text: len(engine.tokenizer.encode(text, add_bos=False, parse_special=False)),
        )
        return shape

    async def prompts(
        self, engine: EngineClient, req: TranslatedChat, shape: ChatShape
    ) -> list[list[int]]:
        """Chat's prompt; where a clear_tool_uses edit is triggered by it, the prompt with the
        old tool uses cleared instead (unless that clears fewer tokens than it asks)."""
        (prompt,) = await super().prompts(engine, req, shape)
        cleared = tool_uses_to_clear(req.source, len(prompt))
        if cleared is None:
            return [prompt]
        assert isinstance(shape, MessagesShape) and shape.edits is not None
        whole = req.messages
        req.messages = to_chat_request(req.source, cleared).messages
        (edited,) = await super().prompts(engine, req, shape)
        if record_tool_edit(req.source, shape.edits, cleared, len(prompt) - len(edited)):
            return [edited]
        req.messages = whole
        return [prompt]

    def adjust_job(self, req: TranslatedChat, job: Job) -> None:
        """`max_tokens: 0` pre-warms the prompt cache (Anthropic's documented use): the prompt
        is prefilled and nothing generated. The engine computes nothing for a request of no
        tokens unless it scores the prompt, so it scores the last prompt token only."""
        if req.source.max_tokens > 0:
            return
        for choice in job.choices:
            choice.params.prompt_logprobs = 0
            choice.engine_kwargs["prompt_logprobs_last"] = 1

    def wire_shape(self, chat: ChatShape, req: TranslatedChat) -> MessagesShape:
        return MessagesShape(chat, req.source)


async def anthropic_errors(request: Request) -> None:
    """Errors on this route, 401s included, in Anthropic's shape."""
    request.state.error_body = anthropic_error


ENDPOINT = Messages(MessagesRequest, MESSAGES_UNSUPPORTED, "msg_", 0)
router = inference_router(
    ENDPOINT, "/messages", "create_message", "Create a message (Anthropic's Messages API)",
    before_auth=[Depends(anthropic_errors)],
)  # fmt: skip


async def count_message_tokens(request: Request) -> Response:
    return await count_tokens(request, ENDPOINT)


# on the same router: Anthropic's error shape and the key check come with it
router.add_api_route(
    "/messages/count_tokens", count_message_tokens, methods=["POST"], name="count_message_tokens",
    summary="Count a message's input tokens (Anthropic's Messages API)",
    openapi_extra=body_doc(CountTokensRequest),
)  # fmt: skip
