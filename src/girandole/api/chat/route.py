"""POST /v1/chat/completions (also under /inference/v1): the endpoint the pipeline runs, and its
route."""

from __future__ import annotations

from girandole.api.chat.images import image_parts, load_images
from girandole.api.chat.prompt import chat_prompt, check_parts
from girandole.api.chat.reasoning import plan_reasoning, think_end_token
from girandole.api.chat.schema import ChatCompletionRequest
from girandole.api.chat.shape import ChatShape
from girandole.api.chat.tools import plan_tools
from girandole.api.http.errors import bad_request
from girandole.api.http.unsupported import CHAT_UNSUPPORTED
from girandole.api.serving.images import ImageMarkers
from girandole.api.serving.pipeline import Endpoint, inference_router
from girandole.api.state import AppState
from girandole.engine.protocol import EngineClient
from girandole.tokenizer.chat_template import chat_template_for

DEFAULT_MAX_TOKENS = 2048  # Fireworks' chat guide


class Chat(Endpoint):
    """Messages through the chat template; choices written as `message`/`delta`, with tools."""

    def shape(self, state: AppState, engine: EngineClient, req: ChatCompletionRequest) -> ChatShape:
        # --chat-template is the server's own model's; a deployment's engine uses its model's
        override = state.chat_template if engine is state.engine else None
        template = chat_template_for(engine.tokenizer, override)
        if template is None:
            raise bad_request(
                "This model has no chat template (none in its files and no built-in one for its"
                " family): use /completions, or start the server with --chat-template",
                "messages",
            )
        if (req.messages is None) == (req.prompt_token_ids is None):
            both = req.messages is not None
            raise bad_request(
                "Send either messages or prompt_token_ids (a prompt already templated and"
                f" tokenized), {'not both' if both else 'one of them is required'}",
                "prompt_token_ids" if both else "messages",
            )
        if req.messages is not None:
            check_parts(req.messages, vision=engine.model_config.vision is not None)
        reasoning = plan_reasoning(req, template)  # a 400 when asked of a model that cannot
        think_end = None
        if reasoning is not None:
            think_end = engine.tokenizer.token_to_id(think_end_token(template))
        shape = ChatShape(template, plan_tools(req, template), reasoning, think_end)
        shape.allow_private_images = state.settings.allow_private_image_urls
        return shape

    async def prompts(
        self, engine: EngineClient, req: ChatCompletionRequest, shape: ChatShape
    ) -> list[list[int]]:
        vocab_size = engine.model_config.vocab_size
        if req.prompt_token_ids is not None:  # the template is skipped: the ids as they are
            ids = list(req.prompt_token_ids)
            for token in ids:
                if token >= vocab_size:
                    raise bad_request(
                        f"Token id {token} in prompt_token_ids is out of range: the vocabulary"
                        f" has {vocab_size} tokens",
                        "prompt_token_ids",
                    )
            if shape.reasoning is not None:
                text = engine.tokenizer.decode(ids, skip_special_tokens=False)
                shape.reasoning.prompt_suffix(shape.template, text, continued=True)
            return [ids]
        vision = engine.model_config.vision
        markers = None
        if vision is not None and image_parts(req.messages):
            shape.images = await load_images(req.messages, vision, shape.allow_private_images)
            markers = ImageMarkers.of(engine.tokenizer, vision)
        prompt = await chat_prompt(
            engine.tokenizer, req, shape.template, shape.plan, vocab_size, shape.reasoning,
            context=AppState.context_length_of(engine), images=markers,
        )  # fmt: skip
        return [prompt.token_ids]


ENDPOINT = Chat(ChatCompletionRequest, CHAT_UNSUPPORTED, "chatcmpl-", DEFAULT_MAX_TOKENS)
router = inference_router(
    ENDPOINT, "/chat/completions", "create_chat_completion", "Create a chat completion"
)
