"""POST /v1/completions (also under /inference/v1): the endpoint the pipeline runs, and its route."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from girandole.api.completions.images import checked_urls, prompt_with_images
from girandole.api.completions.prompt import tokenize_prompts
from girandole.api.completions.schema import CompletionRequest
from girandole.api.http.unsupported import COMPLETIONS_UNSUPPORTED
from girandole.api.serving.pipeline import Endpoint, inference_router
from girandole.api.serving.response import ResponseShape
from girandole.api.serving.target import engine_of
from girandole.api.state import AppState
from girandole.engine.protocol import EngineClient

DEFAULT_MAX_TOKENS = 16


class Completions(Endpoint):
    """Prompts as text or token ids; choices written as `text` (the pipeline's default shape)."""

    def num_prompts(self, req: CompletionRequest) -> int:
        return len(req.prompts())

    async def parse(self, request: Request, state: AppState, data: dict[str, Any]) -> Any:
        """A vision model reads `images` (girandole.api.completions.images); for a text-only
        one the unsupported-fields table refuses it."""
        urls = data.get("images")
        if urls not in (None, []):
            engine = engine_of(request, state, request.state.target)
            if engine.model_config.vision is not None:
                urls = checked_urls(data.pop("images"))
                req = await super().parse(request, state, data)
                req.images = urls
                return req
        return await super().parse(request, state, data)

    def shape(self, state: AppState, engine: EngineClient, req: Any) -> ResponseShape:
        shape = super().shape(state, engine, req)
        shape.allow_private_images = state.settings.allow_private_image_urls
        return shape

    async def prompts(
        self, engine: EngineClient, req: CompletionRequest, shape: ResponseShape
    ) -> list[list[int]]:
        vocab_size = engine.model_config.vocab_size
        context = AppState.context_length_of(engine)
        prompts = req.prompts()
        if req.images:
            vision = engine.model_config.vision
            prompts, shape.images = await prompt_with_images(
                engine.tokenizer, prompts, req.images, vision, shape.allow_private_images
            )
        return await tokenize_prompts(engine.tokenizer, prompts, vocab_size, context)


ENDPOINT = Completions(CompletionRequest, COMPLETIONS_UNSUPPORTED, "cmpl-", DEFAULT_MAX_TOKENS)
router = inference_router(ENDPOINT, "/completions", "create_completion", "Create a text completion")
