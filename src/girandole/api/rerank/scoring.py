"""How a document is scored against a query: query likelihood.

The model reads the document, then an instruction, then the query; the score is the query
tokens' mean log-probability, so a document from which the model finds the query likely ranks
high (UPR: Sachan et al. 2022, "Improving Passage Retrieval with Zero-Shot Question
Generation"). It needs no model trained for ranking: a base model's next-token prediction is
the judgement. `relevance_score` is exp(mean log-probability), the query tokens' geometric mean
probability, in (0, 1].

Chosen by measurement on the labelled set of tests/api/test_rerank.py (12 queries, one relevant
passage among four each): query likelihood ranked every relevant passage first (MRR 1.0), the
cosine of mean-pooled embeddings (girandole.engine.pooling) reached MRR 0.86-0.92 and the last
position's 0.92-0.96, with the default model.

A request's `task` replaces the default instruction (with Fireworks' example task, "Given a
web search query, retrieve relevant passages that answer the query", MRR 1.0 on the same set).
"""

from __future__ import annotations

import math

from girandole.tokenizer.tokenizer import Tokenizer

DEFAULT_TASK = "Please write a question based on this passage."


def document_prompt(
    tokenizer: Tokenizer, document: str, task: str | None, max_doc_tokens: int | None = None
) -> list[int]:
    """The tokens before the query: BOS (as the model says), the passage and the instruction.
    `max_doc_tokens` (Cohere's `max_tokens_per_doc`) cuts the passage to its first tokens; the
    instruction after it stays whole."""
    if max_doc_tokens is not None:
        ids = tokenizer.encode(document, add_bos=False)
        if len(ids) > max_doc_tokens:
            document = tokenizer.decode(ids[:max_doc_tokens], False).rstrip("\ufffd")
    return list(tokenizer.encode(f"Passage: {document}\n{task or DEFAULT_TASK}\nQuestion:"))


def query_tokens(tokenizer: Tokenizer, query: str) -> list[int]:
    return list(tokenizer.encode(" " + query, add_bos=False))


def relevance(prompt_logprobs: list, num_query_tokens: int) -> float:
    """exp(mean log-probability) of the prompt's last `num_query_tokens` tokens."""
    scored = [r.logprob for r in prompt_logprobs[-num_query_tokens:]]
    return math.exp(math.fsum(scored) / len(scored))
