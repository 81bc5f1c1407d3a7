"""POST /v1/chat/completions (also under /inference/v1): the endpoint the pipeline runs, and its
route."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from girandole.api.chat.prompt import chat_prompt, check_parts
from girandole.api.chat.schema import ChatCompletionRequest
from girandole.api.chat.shape import ChatShape
from girandole.api.chat.tools import plan_tools
from girandole.api.http.auth import require_api_key
from girandole.api.http.errors import bad_request
from girandole.api.http.openapi import body_doc
from girandole.api.http.unsupported import CHAT_UNSUPPORTED
from girandole.api.serving.pipeline import serve
from girandole.api.state import AppState
from girandole.engine.protocol import EngineClient
from girandole.tokenizer.chat_template import chat_template_for

DEFAULT_MAX_TOKENS = 2048  # Fireworks' chat guide


class Chat:
    """Messages through the chat template; choices written as `message`/`delta`, with tools."""

    schema = ChatCompletionRequest
    unsupported = CHAT_UNSUPPORTED
    id_prefix = "chatcmpl-"
    default_max_tokens = DEFAULT_MAX_TOKENS

    def shape(self, state: AppState, engine: EngineClient, req: ChatCompletionRequest) -> ChatShape:
        template = chat_template_for(engine.tokenizer, state.chat_template)
        if template is None:
            raise bad_request(
                "This model has no chat template (none in its files and no built-in one for its"
                " family): use /completions, or start the server with --chat-template",
                "messages",
            )
        check_parts(req.messages)
        return ChatShape(template, plan_tools(req, template))

    async def prompts(
        self, engine: EngineClient, req: ChatCompletionRequest, shape: ChatShape
    ) -> list[list[int]]:
        vocab_size = engine.model_config.vocab_size
        prompt = await chat_prompt(engine.tokenizer, req, shape.template, shape.plan, vocab_size)
        return [prompt.token_ids]


router = APIRouter(dependencies=[Depends(require_api_key)])
ENDPOINT = Chat()


@router.post(
    "/chat/completions",
    openapi_extra=body_doc(ChatCompletionRequest),
    summary="Create a chat completion",
)
async def create_chat_completion(request: Request) -> Response:
    return await serve(request, ENDPOINT)
