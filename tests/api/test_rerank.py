"""POST /v1/rerank on the real default model: Fireworks' shape (`data` sorted by
`relevance_score`, `top_n`, `return_documents`, `task`, usage), Cohere's on /v2/rerank, the
ordering on a small labelled set (against the cosine of the server's own embeddings), and a
400 naming the field for bad input."""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest
from api_helpers import MODEL, post, usage_row
from rerank_set import SET

TASK = "Given a web search query, retrieve relevant passages that answer the query"


def rerank(server, path: str = "/inference/v1/rerank", **body):
    return post(server, body, path)


def reciprocal_rank(scores: list[float]) -> float:
    """Scores of (relevant, distractors...): 1 / the relevant one's rank (ties count against)."""
    return 1 / (1 + sum(1 for s in scores[1:] if s >= scores[0]))


def rerank_scores(server, query: str, docs: list[str], **extra) -> list[float]:
    r = rerank(server, query=query, documents=docs, **extra)
    assert r.status_code == 200, r.text
    by_index = {d["index"]: d["relevance_score"] for d in r.json()["data"]}
    return [by_index[i] for i in range(len(docs))]


def cosine_scores(server, query: str, docs: list[str]) -> list[float]:
    r = post(server, {"input": [query, *docs], "normalize": True}, "/v1/embeddings")
    vecs = [d["embedding"] for d in r.json()["data"]]
    return [sum(a * b for a, b in zip(vecs[0], v)) for v in vecs[1:]]


def test_fireworks_shape(server, tokenizer):
    query, relevant, others = SET[0]
    docs = [others[0], relevant, others[1], others[2]]
    r = rerank(server, query=query, documents=docs)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    data = body["data"]
    assert sorted(d["index"] for d in data) == [0, 1, 2, 3]
    scores = [d["relevance_score"] for d in data]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert data[0]["index"] == 1 and data[0]["document"] == relevant
    assert all(d["document"] == docs[d["index"]] for d in data)
    assert (
        body["usage"]["prompt_tokens"]
        == body["usage"]["total_tokens"]
        > 4 * len(tokenizer.encode(query, add_bos=False))
    )
    top = rerank(server, query=query, documents=docs, top_n=2, return_documents=False).json()
    assert [d["index"] for d in top["data"]] == [d["index"] for d in data[:2]]
    assert all("document" not in d for d in top["data"])
    for a, b in zip(top["data"], data):
        assert math.isclose(a["relevance_score"], b["relevance_score"], rel_tol=1e-5)


def test_model_may_be_null_and_v1_path(server):
    r = rerank(server, path="/v1/rerank", model=None, query="hi", documents=["hello", "bye"])
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL


def test_cohere_shape_on_v2(server):
    query, relevant, others = SET[1]
    docs = [*others, relevant]
    r = rerank(server, path="/v2/rerank", query=query, documents=docs, top_n=2,
               return_documents=True)  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0] == {
        "index": 3,
        "relevance_score": body["results"][0]["relevance_score"],
        "document": {"text": relevant},
    }
    assert len(body["results"]) == 2 and body["id"].startswith("rerank-")
    assert body["meta"]["billed_units"]["input_tokens"] > 0


def test_ordering_on_labelled_set(server):
    """Query likelihood (the server's scorer) against the cosine of its own embeddings."""
    ranks = {"rerank": [], "rerank+task": [], "cosine": []}
    for query, relevant, others in SET:
        docs = [relevant, *others]
        ranks["rerank"].append(reciprocal_rank(rerank_scores(server, query, docs)))
        ranks["rerank+task"].append(reciprocal_rank(rerank_scores(server, query, docs, task=TASK)))
        ranks["cosine"].append(reciprocal_rank(cosine_scores(server, query, docs)))
    mrr = {k: sum(v) / len(v) for k, v in ranks.items()}
    print("MRR on the labelled set:", mrr)
    assert mrr["rerank"] >= 0.95, mrr
    assert mrr["rerank+task"] >= 0.9, mrr
    assert mrr["rerank"] > mrr["cosine"], mrr


@pytest.mark.parametrize(
    "body, field",
    [
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q"}, "documents"),
        ({"documents": ["d"]}, "query"),
        ({"query": "", "documents": ["d"]}, "query"),
        ({"query": "q", "documents": ["d", ""]}, "documents"),
        ({"query": "q", "documents": "d"}, "documents"),
        ({"query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["d"], "return_documents": "no"}, "return_documents"),
        ({"query": "q", "documents": ["d"], "task": ""}, "task"),
        ({"query": "q", "documents": ["d"], "rank_fields": ["x"]}, "rank_fields"),
        ({"query": "q", "documents": ["x " * 200000]}, "documents"),
    ],
)
def test_bad_input_is_400_naming_the_field(server, body, field):
    r = rerank(server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field or field in error["message"], error


def test_max_tokens_per_doc_cuts_the_passage_not_the_instruction(server, tokenizer):
    """Cohere's `max_tokens_per_doc` cuts the document: the instruction and "Question:" after it
    stay (it used to cut the whole scoring prompt, so a capped document was scored without them,
    and at 1 token every document scored the same, on BOS alone)."""
    query, relevant, others = SET[1]
    filler = " Some unrelated words follow here." * 30
    cap = len(tokenizer.encode(relevant, add_bos=False))
    r = rerank(server, path="/v2/rerank", query=query, documents=[relevant + filler, others[0]],
               max_tokens_per_doc=cap)  # fmt: skip
    assert r.status_code == 200, r.text
    capped = {d["index"]: d["relevance_score"] for d in r.json()["results"]}
    uncut = rerank_scores(server, query, [relevant, others[0]])
    assert math.isclose(capped[0], uncut[0], rel_tol=1e-3), (capped, uncut)
    assert math.isclose(capped[1], uncut[1], rel_tol=1e-3), (capped, uncut)
    r = rerank(server, path="/v2/rerank", query=query, documents=[relevant, *others],
               max_tokens_per_doc=1)  # fmt: skip
    assert r.status_code == 200, r.text
    assert len({d["relevance_score"] for d in r.json()["results"]}) > 1, r.json()


def test_query_too_long_names_the_query(server):
    """A query longer than the context alone is the query's fault, not the documents' (the 400
    said `documents[0] and the query are too long together`, param `documents`)."""
    r = rerank(server, query="q " * 40000, documents=["d"])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "query" and "documents" not in error["message"], error


def test_many_documents_are_not_too_long_together(server):
    """Each document is scored alone with the query: 1024 documents of 2,100 characters (2.15 M
    in all, above the early refusal's 32,768 tokens x 64 characters, though each is about 70
    tokens) were refused as 'The prompt is too long'. The request now goes on to its own checks
    (here, a bad `top_n`)."""
    r = rerank(server, query="q", documents=["\n" * 2100] * 1024, top_n=0)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "top_n", r.text


def test_cohere_shape_has_its_usage_row(server):
    """/v2/rerank was labelled 'other', not an inference endpoint: it wrote no usage row (its
    key's tokens went unrecorded) and /metrics counted it under endpoint="other"."""
    r = rerank(server, path="/v2/rerank", query="q", documents=["a", "b"])
    assert r.status_code == 200, r.text
    request_id, billed = r.json()["id"], r.json()["meta"]["billed_units"]["input_tokens"]
    columns = "endpoint, model, status, prompt_tokens, completion_tokens, num_choices"
    rows = usage_row(server, request_id, columns=columns)
    assert rows == [("rerank", MODEL, 200, billed, 0, 2)]
    assert 'endpoint="rerank",status="200"' in httpx.get(server.url + "/metrics").text


def test_the_server_answers_while_a_large_rerank_is_tokenized(server):
    """A rerank's documents (up to the 16 MB body limit) were tokenized on the event loop: every
    other request, streams included, waited seconds for them. They are tokenized beside it
    now: a request sent once the body is uploaded is answered first. (The last document is too
    long, so the request ends with a 400 once every document is tokenized.)"""
    documents = ["word " * 2800] * 500 + ["x " * 40000]
    body = json.dumps({"model": MODEL, "query": "q", "documents": documents}).encode()
    uploaded = threading.Event()
    done: dict = {}

    def chunks():
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]
        uploaded.set()

    def send() -> None:
        headers = {**server.headers, "Content-Type": "application/json"}
        r = httpx.post(server.url + "/v1/rerank", content=chunks(), headers=headers, timeout=120)
        done["at"], done["response"] = time.monotonic(), r

    thread = threading.Thread(target=send)
    thread.start()
    assert uploaded.wait(60)
    assert httpx.get(server.url + "/health", timeout=60).status_code == 200
    answered = time.monotonic()
    thread.join()
    assert done["response"].status_code == 400, done["response"].text
    assert done["response"].json()["error"]["param"] == "documents"
    assert answered < done["at"], "/health waited for the rerank's documents to be tokenized"
