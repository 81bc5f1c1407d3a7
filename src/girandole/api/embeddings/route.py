"""POST /v1/embeddings (also under /inference/v1): OpenAI's response shape with `usage`.

Each input is one prefill-only engine request, batched in the engine's steps with generation
rows; on a plain LLM its vector is the mean of the prompt's final hidden states after the model's
final norm (girandole.engine.pooling says why). A model trained to embed pools as its
sentence-transformers config says (CLS, mean or last token; an encoder runs on its own engine,
girandole.engine.encoder). `normalize: true` scales it to unit L2 norm (Fireworks' default is
false: the raw mean; a model with a Normalize module: true). `dimensions: d` keeps the first d values and renormalises them
(Matryoshka truncation). `encoding_format: "base64"` sends each vector as the base64 of its
little-endian float32 bytes, as OpenAI's SDK decodes it.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

from girandole.api.embeddings.inputs import input_token_ids
from girandole.api.embeddings.schema import EMBEDDINGS_UNSUPPORTED, EmbeddingRequest
from girandole.api.http.errors import bad_request
from girandole.api.ops.server_ops import min_tokens
from girandole.api.serving.prefill import Prefill, PrefillEndpoint, prefill_router
from girandole.engine.outputs import RequestOutput
from girandole.engine.pooling import PoolingParams
from girandole.engine.protocol import EngineClient

POOLING = PoolingParams("mean")  # a plain LLM's (girandole.engine.pooling says why)


def l2_normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


def encode(vector: list[float], encoding_format: str | None) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


class Embeddings(PrefillEndpoint):
    def prompt_fields(self, data: dict[str, Any]) -> dict[str, Any]:
        """The longest input (and the template it fills): the context bounds each input, not
        their sum, so 2048 inputs of a few hundred tokens are not 'too long'."""
        x = data.get("input")
        if isinstance(x, list) and x and not isinstance(x[0], int):
            x = max(x, key=min_tokens)
        template = data.get("prompt_template")
        # a token-id list alone: a list around it counted two more items, so one of the
        # context's length less one, which fits, was refused as too long
        return {"input": x if template is None else [template, x]}

    async def requests(self, engine: EngineClient, req: EmbeddingRequest) -> list[Prefill]:
        embedding = engine.model_config.embedding
        if embedding is not None and embedding.task == "cross-encoder":
            raise bad_request(
                f"{req.model} is a reranker (a cross-encoder): it scores query-document pairs"
                " at /v1/rerank, it gives no embeddings",
                "model",
            )
        hidden_size = engine.model_config.hidden_size
        if req.dimensions is not None and req.dimensions > hidden_size:
            raise bad_request(
                f"dimensions is {req.dimensions}, above this model's {hidden_size}", "dimensions"
            )
        ids = await input_token_ids(engine, req.inputs(), req.prompt_template)
        # a model trained to embed pools as its sentence-transformers config says
        pooling = POOLING if embedding is None else PoolingParams(embedding.pooling)
        return [Prefill(seq, {"pooling": pooling}) for seq in ids]

    def respond(
        self, engine: EngineClient, req: EmbeddingRequest, outputs: list[RequestOutput]
    ) -> dict[str, Any]:
        data = []
        normalize = req.normalize
        if normalize is None:  # the model's own Normalize module, else Fireworks' false
            embedding = engine.model_config.embedding
            normalize = embedding is not None and embedding.normalize
        for i, out in enumerate(outputs):
            vector = out.embedding or []
            if req.dimensions is not None:
                vector = l2_normalize(vector[: req.dimensions])
            elif normalize:
                vector = l2_normalize(vector)
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": encode(vector, req.encoding_format),
                }
            )
        return {"object": "list", "data": data, "model": req.model}


ENDPOINT = Embeddings(EmbeddingRequest, EMBEDDINGS_UNSUPPORTED, "embd-")
router = prefill_router(ENDPOINT, "/embeddings", "create_embeddings", "Create embeddings")
