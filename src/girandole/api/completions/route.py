"""POST /v1/completions (also under /inference/v1): the endpoint the pipeline runs, and its route."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from girandole.api.completions.prompt import tokenize_prompts
from girandole.api.completions.schema import CompletionRequest
from girandole.api.http.auth import require_api_key
from girandole.api.http.openapi import body_doc
from girandole.api.http.unsupported import COMPLETIONS_UNSUPPORTED
from girandole.api.serving.pipeline import serve
from girandole.api.serving.response import ResponseShape
from girandole.api.state import AppState
from girandole.engine.protocol import EngineClient

DEFAULT_MAX_TOKENS = 16


class Completions:
    """Prompts as text or token ids; choices written as `text` (the pipeline's default shape)."""

    schema = CompletionRequest
    unsupported = COMPLETIONS_UNSUPPORTED
    id_prefix = "cmpl-"
    default_max_tokens = DEFAULT_MAX_TOKENS

    def shape(self, state: AppState, engine: EngineClient, req: CompletionRequest) -> ResponseShape:
        return ResponseShape()

    async def prompts(
        self, engine: EngineClient, req: CompletionRequest, shape: ResponseShape
    ) -> list[list[int]]:
        vocab_size = engine.model_config.vocab_size
        return await tokenize_prompts(engine.tokenizer, req.prompts(), vocab_size)


router = APIRouter(dependencies=[Depends(require_api_key)])
ENDPOINT = Completions()


@router.post(
    "/completions", openapi_extra=body_doc(CompletionRequest), summary="Create a text completion"
)
async def create_completion(request: Request) -> Response:
    return await serve(request, ENDPOINT)
