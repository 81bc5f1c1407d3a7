"""POST /v1/embeddings on the real default model, with the real openai client and raw HTTP:
float and base64, dimensions, normalize, every input shape, the same vector whatever the batch,
usage (in the body, the usage row and /metrics), and a 400 naming the field for bad input."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest
from api_helpers import API_KEY, MODEL, post, usage_row

TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "def add(a, b):\n    return a + b",
    "Quantum computers use qubits, which can be in a superposition of states.",
]
TOL = 1e-4
HIDDEN = 640  # Gemma 3 270M


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=server.url + "/inference/v1", max_retries=0)


def embed(server, path: str = "/inference/v1/embeddings", **body) -> httpx.Response:
    return post(server, body, path)


def close(a: list[float], b: list[float], tol: float = TOL) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_openai_client_float_and_base64(client, tokenizer):
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == MODEL
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    assert all(d.object == "embedding" and len(d.embedding) == HIDDEN for d in floats.data)
    assert floats.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)
    assert floats.usage.total_tokens == floats.usage.prompt_tokens
    # the SDK's default asks for base64 and decodes it
    decoded = client.embeddings.create(model=MODEL, input=TEXTS)
    for a, b in zip(floats.data, decoded.data):
        assert close(a.embedding, b.embedding, 1e-6)
    # Fireworks' default: not normalised; distinct texts give distinct vectors
    assert abs(norm(floats.data[0].embedding) - 1) > 0.01
    assert not close(floats.data[0].embedding, floats.data[1].embedding, 1e-2)


def test_base64_is_little_endian_float32(server):
    floats = embed(server, input=TEXTS[0]).json()["data"][0]["embedding"]
    b64 = embed(server, input=TEXTS[0], encoding_format="base64").json()["data"][0]["embedding"]
    raw = base64.b64decode(b64)
    assert len(raw) == 4 * HIDDEN
    assert close(list(struct.unpack(f"<{HIDDEN}f", raw)), floats, 1e-6)


def test_dimensions_truncate_and_renormalise(client):
    full = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    short = client.embeddings.create(
        model=MODEL, input=TEXTS[1], dimensions=64, encoding_format="float"
    )
    vec = full.data[0].embedding[:64]
    expect = [x / norm(vec) for x in vec]
    assert len(short.data[0].embedding) == 64
    assert close(short.data[0].embedding, expect, 1e-5)
    assert abs(norm(short.data[0].embedding) - 1) < 1e-5


def test_normalize(server):
    raw = embed(server, input=TEXTS[2]).json()["data"][0]["embedding"]
    unit = embed(server, input=TEXTS[2], normalize=True).json()["data"][0]["embedding"]
    assert abs(norm(unit) - 1) < 1e-5
    assert close(unit, [x / norm(raw) for x in raw], 1e-5)


def test_same_vector_across_batches_and_input_shapes(server, tokenizer):
    alone = [embed(server, input=t).json()["data"][0]["embedding"] for t in TEXTS]
    batched = embed(server, input=TEXTS * 4).json()["data"]
    assert [d["index"] for d in batched] == list(range(16))
    for i, d in enumerate(batched):
        assert close(d["embedding"], alone[i % 4])
    ids = [tokenizer.encode(t) for t in TEXTS]
    one_ids = embed(server, input=ids[1]).json()["data"][0]["embedding"]
    assert close(one_ids, alone[1])
    for d, ref in zip(embed(server, input=ids).json()["data"], alone):
        assert close(d["embedding"], ref)
    templated = embed(
        server,
        path="/v1/embeddings",
        input=[{"subject": "cat", "place": "mat"}, {"subject": "dog", "place": "rug"}],
        prompt_template="The {subject} sat on the {place}.",
    ).json()["data"]
    assert close(templated[0]["embedding"], alone[0])
    assert not close(templated[1]["embedding"], alone[0], 1e-2)
    one_object = embed(server, input={"text": TEXTS[3]}, prompt_template="{text}").json()["data"][
        0
    ]["embedding"]
    assert close(one_object, alone[3])


def test_usage_row_and_metrics(server, tokenizer):
    r = embed(server, input=TEXTS[:2])
    assert r.status_code == 200
    prompt = sum(len(tokenizer.encode(t)) for t in TEXTS[:2])
    assert r.headers["fireworks-prompt-tokens"] == str(prompt)
    request_id = r.headers["x-request-id"]
    columns = "endpoint, model, status, prompt_tokens, completion_tokens, num_choices"
    rows = usage_row(server, request_id, columns=columns)  # written from a thread, a moment later
    assert rows == [("embeddings", MODEL, 200, prompt, 0, 2)]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'endpoint="embeddings",status="200"' in metrics


def test_no_blocks_kept(server):
    embed(server, input=TEXTS * 8)
    engine = server.wait_idle()["engine"]
    assert engine["kv_blocks_used"] == 0


@pytest.mark.parametrize(
    "body, field",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [1, -2]}, "input"),
        ({"input": [[1, 2], []]}, "input"),
        ({"input": 3}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": [1, 10**9]}, "input"),
        ({"input": "x" * 8 * 40000}, "input"),  # 40,001 tokens: past 32,768 positions
        ({"input": {"text": "hi"}}, "input"),
        ({"input": {"text": "hi"}, "prompt_template": "{other}"}, "input"),
        ({"input": {"text": "hi"}, "prompt_template": "{text.upper}"}, "prompt_template"),
        ({"input": "hi", "prompt_template": "{text}"}, "prompt_template"),
        ({"input": "hi", "dimensions": 0}, "dimensions"),
        ({"input": "hi", "dimensions": 4096}, "dimensions"),
        ({"input": "hi", "dimensions": "8"}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "hi", "normalize": "yes"}, "normalize"),
        ({"input": "hi", "return_logits": [1]}, "return_logits"),
        ({"input": "hi", "temperature": 0.5}, "temperature"),
        ({}, "input"),
    ],
)
def test_bad_input_is_400_naming_the_field(server, body, field):
    r = embed(server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field or field in error["message"], error


def test_unknown_model_is_404(server):
    r = embed(server, model="accounts/fireworks/models/nope", input="hi")
    assert r.status_code == 404


def test_missing_key_is_401(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert r.status_code == 401


def test_many_inputs_are_not_too_long_together(server):
    """The context bounds each input, not their sum: 2048 inputs of 1,100 characters (2.25 M
    in all, above the early refusal's 32,768 tokens x 64 characters, though each is about 70
    tokens) were refused as 'The prompt is too long'. The request now goes on to its own
    checks (here, a bad `dimensions`)."""
    r = embed(server, input=["\n" * 1100] * 2048, dimensions=0)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "dimensions", r.text


def test_one_token_id_input_may_hold_more_ids_than_inputs_a_request_may(server, tokenizer):
    """A token-id list is one input, bounded by the context: 2048, the most inputs a request
    may hold, refused one input of 2049 ids ("List should have at most 2048 items"). The
    request now goes on to its own checks (here, a bad `dimensions`)."""
    ids = (tokenizer.encode(TEXTS[3], add_bos=False) * 200)[:2049]
    r = embed(server, input=ids, dimensions=0)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "dimensions", r.text


def test_token_ids_one_short_of_the_context_are_not_too_long(server, tokenizer):
    """The early refusal counted a token-id input as two items more than it has: 32,767 ids
    (one short of the 32,768 positions: it fits) were 'too long: 32769 or more items'. The
    request now goes on to its own checks (here, a bad `dimensions`); 32,768 ids are too long."""
    word = tokenizer.encode("cat", add_bos=False)[0]
    r = embed(server, input=[word] * 32767, dimensions=0)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "dimensions", r.text
    r = embed(server, input=[word] * 32768)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input" and "32768" in r.json()["error"]["message"]
