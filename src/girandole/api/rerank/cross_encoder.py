"""Rerank on a cross-encoder (BertForSequenceClassification, XLM-RoBERTa's: bge-reranker,
ms-marco MiniLM): the encoder reads the query and a document together, framed as its tokenizer
frames a pair (`[CLS] query [SEP] document [SEP]`, the document's tokens of type 1), and its
one-label head gives a relevance logit; `relevance_score` is sigmoid(logit), in (0, 1), as
sentence-transformers' CrossEncoder and Fireworks' rerankers report it.

A pair longer than the model's positions is a 400 naming the document (Cohere's
`max_tokens_per_doc` cuts the document first); nothing is truncated silently.
"""

from __future__ import annotations

import math
from typing import Any

from girandole.api.http.errors import bad_request
from girandole.api.serving.prefill import Prefill
from girandole.api.serving.prompt import off_loop_if_long
from girandole.engine.pooling import PoolingParams
from girandole.engine.protocol import EngineClient
from girandole.tokenizer.framing import pair_frame

POOLING = PoolingParams("cls")  # the head reads the first token's state


async def cross_encoder_requests(engine: EngineClient, req: Any) -> list[Prefill]:
    tok = engine.tokenizer
    cap = getattr(req, "max_tokens_per_doc", None)

    def tokenize() -> tuple[list[int], list[list[int]]]:
        docs = [tok.encode(document, add_bos=False) for document in req.documents]
        return tok.encode(req.query, add_bos=False), [d[:cap] if cap else d for d in docs]

    num_chars = len(req.query) + sum(len(document) for document in req.documents)
    query, docs = await off_loop_if_long(num_chars, tokenize)
    if not query:
        raise bad_request("The query is empty after tokenization", "query")
    frame = pair_frame(tok.hf)
    limit = engine.max_model_len
    if len(query) + frame.num_special >= limit:
        raise bad_request(
            f"The query is too long: {len(query)} tokens, this model reads at most {limit}"
            " with a document and its special tokens (max_position_embeddings)",
            "query",
        )
    out = []
    for i, doc in enumerate(docs):
        ids, types = frame.join(query, doc)
        if len(ids) > limit:
            raise bad_request(
                f"documents[{i}] and the query are too long together: {len(ids)} tokens with"
                f" the model's special tokens, this model reads at most {limit}"
                " (max_position_embeddings)",
                "documents",
            )
        out.append(Prefill(ids, {"pooling": POOLING, "token_type_ids": types}))
    return out


def pair_relevance(logits: list[float]) -> float:
    """sigmoid of the pair's relevance logit."""
    x = logits[0]
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
