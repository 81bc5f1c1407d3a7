"""POST /v1/rerank (also under /inference/v1): Fireworks' rerank; POST /v2/rerank: Cohere's.

Each document is one prefill-only engine request scored by query likelihood
(girandole.api.rerank.scoring), batched in the engine's steps with everything else; on a
reranker (a cross-encoder: girandole.api.rerank.cross_encoder), each (query, document) pair is
one input of the encoder, scored by sigmoid(logit); on Qwen3-Reranker, P(yes) against P(no)
(girandole.api.rerank.yes_no).

Fireworks' response: `{"object": "list", "model", "data": [{"index", "relevance_score",
"document"}], "usage"}`, `data` sorted by `relevance_score`, highest first, cut to `top_n`;
`document` (the text) unless `return_documents` is false. Cohere's (`/v2/rerank`, for Cohere-
and vLLM-style clients): `{"id", "results": [{"index", "relevance_score", "document":
{"text"}}], "meta": {"billed_units": {"input_tokens"}}}`, documents only when asked for.
"""

from __future__ import annotations

from typing import Any

from girandole.api.http.errors import bad_request
from girandole.api.ops.server_ops import min_tokens
from girandole.api.rerank.cross_encoder import cross_encoder_requests, pair_relevance
from girandole.api.rerank.schema import CohereRerankRequest, RerankRequest
from girandole.api.rerank.scoring import document_prompt, query_tokens, relevance
from girandole.api.rerank.yes_no import yes_no_requests, yes_no_scores
from girandole.api.serving.prefill import Prefill, PrefillEndpoint, prefill_router
from girandole.api.serving.prompt import off_loop_if_long
from girandole.engine.outputs import RequestOutput
from girandole.engine.protocol import EngineClient


class Rerank(PrefillEndpoint):
    prompt_field = "documents"  # each document (with the query) is a prompt

    def prompt_fields(self, data: dict[str, Any]) -> dict[str, Any]:
        """The query and the longest document: each document is scored alone, so the context
        bounds each one with the query, not the documents' sum."""
        docs = data.get("documents")
        if isinstance(docs, list) and docs:
            docs = max(docs, key=min_tokens)
        return {"query": data.get("query"), "documents": docs}

    async def requests(self, engine: EngineClient, req: Any) -> list[Prefill]:
        embedding = engine.model_config.embedding
        if embedding is not None and embedding.task == "cross-encoder":
            return await cross_encoder_requests(engine, req)
        if embedding is not None and embedding.task == "yes-no":
            return await yes_no_requests(engine, req)
        if embedding is not None:
            name = req.model or "The server's model"
            raise bad_request(
                f"{name} is an embedding model: rerank needs a reranker (a cross-encoder) or an"
                " LLM",
                "model",
            )
        tok = engine.tokenizer
        task, cap = getattr(req, "task", None), getattr(req, "max_tokens_per_doc", None)

        def tokenize() -> tuple[list[int], list[list[int]]]:
            heads = [document_prompt(tok, document, task, cap) for document in req.documents]
            return query_tokens(tok, req.query), heads

        # up to the body limit of text (16 MB: seconds of tokenizing), in a thread when long:
        # on the event loop it stalled every other request, streams included
        num_chars = len(req.query) + sum(len(document) for document in req.documents)
        query, heads = await off_loop_if_long(num_chars, tokenize)
        if not query:
            raise bad_request("The query is empty after tokenization", "query")
        limit = engine.max_model_len
        if len(query) >= limit:
            raise bad_request(
                f"The query is too long: {len(query)} tokens, model maximum context length:"
                f" {limit}",
                "query",
            )
        out = []
        for i, head in enumerate(heads):
            if len(head) + len(query) >= limit:
                raise bad_request(
                    f"documents[{i}] and the query are too long together:"
                    f" {len(head) + len(query)} tokens, model maximum context length: {limit}",
                    "documents",
                )
            kwargs = {"prompt_logprobs_last": len(query)}  # only the query is scored
            out.append(Prefill(head + query, kwargs, score=True))
        return out

    def ranked(
        self, engine: EngineClient, req: Any, outputs: list[RequestOutput]
    ) -> list[tuple[int, float]]:
        """(document index, relevance score), best first, cut to top_n."""
        embedding = engine.model_config.embedding
        if embedding is not None and embedding.task == "cross-encoder":
            scores = [(i, pair_relevance(out.embedding or [0.0])) for i, out in enumerate(outputs)]
        elif embedding is not None and embedding.task == "yes-no":
            scores = list(enumerate(yes_no_scores(outputs)))
        else:
            num_query = len(query_tokens(engine.tokenizer, req.query))
            scores = [
                (i, relevance(out.prompt_logprobs or [], num_query))
                for i, out in enumerate(outputs)
            ]
        scores.sort(key=lambda s: -s[1])
        return scores[: req.top_n] if req.top_n is not None else scores

    def respond(
        self, engine: EngineClient, req: RerankRequest, outputs: list[RequestOutput]
    ) -> dict[str, Any]:
        data = []
        for index, score in self.ranked(engine, req, outputs):
            entry: dict[str, Any] = {"index": index, "relevance_score": score}
            if req.return_documents is not False:
                entry["document"] = req.documents[index]
            data.append(entry)
        return {"object": "list", "model": req.model, "data": data}


class CohereRerank(Rerank):
    def respond(
        self, engine: EngineClient, req: CohereRerankRequest, outputs: list[RequestOutput]
    ) -> dict[str, Any]:
        results = []
        for index, score in self.ranked(engine, req, outputs):
            entry: dict[str, Any] = {"index": index, "relevance_score": score}
            if req.return_documents:
                entry["document"] = {"text": req.documents[index]}
            results.append(entry)
        return {"results": results}

    def usage_fields(self, request_id: str, prompt_tokens: int) -> dict[str, Any]:
        return {"id": request_id, "meta": {"billed_units": {"input_tokens": prompt_tokens}}}


ENDPOINT = Rerank(RerankRequest, {}, "rerank-")
router = prefill_router(ENDPOINT, "/rerank", "rerank", "Rerank documents by relevance to a query")
COHERE_ENDPOINT = CohereRerank(CohereRerankRequest, {}, "rerank-")
cohere_router = prefill_router(
    COHERE_ENDPOINT, "/v2/rerank", "rerank_cohere", "Rerank documents (Cohere's v2 shape)"
)
