"""Rerank on Qwen3-Reranker: a Qwen3 decoder asked whether the document meets the query, its
score the probability of "yes" against "no" at the answer's position.

The prompt is the model card's: a system turn (judge whether the Document meets the
requirements; answer only "yes" or "no"), a user turn `<Instruct>: {task}\n<Query>: {query}\n
<Document>: {document}`, and an assistant turn opened with an empty think block. The model
card's score is softmax([logit_no, logit_yes])[1] at the last position: sigmoid(logit_yes -
logit_no). Here each document runs as two prefill requests, the prompt followed by "yes" and by
"no", scoring only that last token (prompt_logprobs_last=1); both log-probabilities are the
same position's log-softmax, so their difference is logit_yes - logit_no. The second request
finds the first's prompt in the prefix cache. `usage` counts both requests' prompt tokens.
"""

from __future__ import annotations

import math
from typing import Any

from girandole.api.http.errors import bad_request
from girandole.api.serving.prefill import Prefill
from girandole.api.serving.prompt import off_loop_if_long
from girandole.engine.outputs import RequestOutput
from girandole.engine.protocol import EngineClient

SYSTEM = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query"
    ' and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def answer_ids(engine: EngineClient) -> tuple[int, int]:
    """The ids of "yes" and "no" (one token each in Qwen's vocabulary)."""
    tok = engine.tokenizer
    ids = [tok.encode(word, add_bos=False) for word in ("yes", "no")]
    if any(len(i) != 1 for i in ids):
        raise bad_request("This reranker's tokenizer has no single 'yes' and 'no' tokens", "model")
    return ids[0][0], ids[1][0]


async def yes_no_requests(engine: EngineClient, req: Any) -> list[Prefill]:
    tok = engine.tokenizer
    task = getattr(req, "task", None) or DEFAULT_TASK
    cap = getattr(req, "max_tokens_per_doc", None)
    yes, no = answer_ids(engine)

    def tokenize() -> list[list[int]]:
        head = tok.encode(SYSTEM, add_bos=False)
        tail = tok.encode(ASSISTANT, add_bos=False)
        out = []
        for document in req.documents:
            if cap is not None:  # Cohere's max_tokens_per_doc: the passage's first tokens
                ids = tok.encode(document, add_bos=False, parse_special=False)
                document = tok.decode(ids[:cap], False).rstrip("\ufffd")
            body = f"<Instruct>: {task}\n<Query>: {req.query}\n<Document>: {document}"
            out.append([*head, *tok.encode(body, add_bos=False, parse_special=False), *tail])
        return out

    num_chars = len(req.query) + sum(len(document) for document in req.documents)
    prompts = await off_loop_if_long(num_chars, tokenize)
    limit = engine.max_model_len
    requests = []
    for i, prompt in enumerate(prompts):
        if len(prompt) + 1 >= limit:
            raise bad_request(
                f"documents[{i}] and the query are too long together: {len(prompt) + 1} tokens"
                f" in the reranker's prompt, model maximum context length: {limit}",
                "documents",
            )
        for answer in (yes, no):
            requests.append(Prefill([*prompt, answer], {"prompt_logprobs_last": 1}, score=True))
    return requests


def yes_no_scores(outputs: list[RequestOutput]) -> list[float]:
    """Each document's P(yes) / (P(yes) + P(no)), from its two requests' outputs."""
    scores = []
    for yes, no in zip(outputs[::2], outputs[1::2]):
        diff = _last_logprob(yes) - _last_logprob(no)
        if math.isnan(diff):  # both impossible: no preference
            diff = 0.0
        scores.append(1 / (1 + math.exp(-diff)) if diff >= 0 else 1 - 1 / (1 + math.exp(diff)))
    return scores


def _last_logprob(out: RequestOutput) -> float:
    entry = (out.prompt_logprobs or [None])[-1]
    return entry.logprob if entry is not None and entry.logprob is not None else -math.inf
