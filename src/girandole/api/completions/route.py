"""POST /v1/completions (also under /inference/v1): the endpoint the pipeline runs, and its route."""

from __future__ import annotations

from girandole.api.completions.prompt import tokenize_prompts
from girandole.api.completions.schema import CompletionRequest
from girandole.api.http.unsupported import COMPLETIONS_UNSUPPORTED
from girandole.api.serving.pipeline import Endpoint, inference_router
from girandole.api.serving.response import ResponseShape
from girandole.api.state import AppState
from girandole.engine.protocol import EngineClient

DEFAULT_MAX_TOKENS = 16


class Completions(Endpoint):
    """Prompts as text or token ids; choices written as `text` (the pipeline's default shape)."""

    def num_prompts(self, req: CompletionRequest) -> int:
        return len(req.prompts())

    async def prompts(
        self, engine: EngineClient, req: CompletionRequest, shape: ResponseShape
    ) -> list[list[int]]:
        vocab_size = engine.model_config.vocab_size
        context = AppState.context_length_of(engine)
        return await tokenize_prompts(engine.tokenizer, req.prompts(), vocab_size, context)


ENDPOINT = Completions(CompletionRequest, COMPLETIONS_UNSUPPORTED, "cmpl-", DEFAULT_MAX_TOKENS)
router = inference_router(ENDPOINT, "/completions", "create_completion", "Create a text completion")
