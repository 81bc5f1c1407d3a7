"""What one client can make the server hold: a whole response's size (`--max-response-bytes`).

The server serves a tiny random Llama (320 tokens, no keys) with a small response limit, so a
request of a few choices with logprobs and listed sampling masks passes it in a few tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import api_conftest  # noqa: E402

MODEL = "accounts/testing/models/tiny-llama"
RESPONSE_LIMIT = 200_000

# every position lists the whole vocabulary (temperature 1, no top-k/top-p): about 2.4 KB of
# JSON a token, so 4 choices x 32 tokens are far past the limit
HEAVY = {
    "model": MODEL,
    "prompt": "a b c",
    "n": 4,
    "max_tokens": 32,
    "ignore_eos": True,
    "temperature": 1,
    "top_k": 0,
    "top_p": 1,
    "min_p": 0,
    "logprobs": True,
    "top_logprobs": 5,
    "sampling_mask": "non_zero_list",
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    conftest = api_conftest()
    tmp = tmp_path_factory.mktemp("limits")
    model = conftest.write_tiny_llama_for_ops(tmp / "llama")
    srv = conftest.start_server(
        tmp, "--model", str(model), "--model-id", "tiny-llama", "--account", "testing",
        "--kv-cache-gb", "0.02", "--max-response-bytes", str(RESPONSE_LIMIT), api_key=None,
    )  # fmt: skip
    yield srv
    conftest.stop_server(srv)


def post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=120)


def test_a_whole_response_past_the_limit_is_a_400_and_its_generation_stops(small):
    r = post(small, HEAVY)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "--max-response-bytes" in error["message"] and "stream" in error["message"]
    assert str(RESPONSE_LIMIT) in error["message"]
    # its engine requests were aborted, not left to run to max_tokens
    small.wait_idle(timeout=90)
    assert "Traceback" not in small.log()


def test_a_response_within_the_limit_is_whole(small):
    r = post(small, {**HEAVY, "n": 1, "max_tokens": 8})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == 8
    for entry in content:  # the listed mask, written as a JSON list of every token id
        assert (
            entry["sampling_mask"] == list(range(320)) == list(range(entry["sampling_mask_count"]))
        )


def test_the_same_request_streamed_is_not_bounded(small):
    """A stream holds no body: each chunk is written as it comes."""
    positions = 0
    with httpx.stream(
        "POST", small.url + "/v1/completions", json={**HEAVY, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                for entry in (choice.get("logprobs") or {}).get("content", []):
                    assert len(entry["sampling_mask"]) == 320
                    positions += 1
    assert positions == 4 * 32


def test_a_stream_holding_raw_output_past_the_limit_ends_with_an_error_event(small):
    """raw_output repeats every position's logprobs on the finish chunks: held until then."""
    events = []
    body = {**HEAVY, "stream": True, "raw_output": True}
    with httpx.stream("POST", small.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: ") :]))
    assert "--max-response-bytes" in events[-1]["error"]["message"]
    small.wait_idle(timeout=90)


# -- logit_bias ---------------------------------------------------------------------------------


def test_a_logit_bias_of_more_keys_than_tokens_is_refused_before_validating(small):
    """Keys past the vocabulary's size must repeat a token ("1", "01"): a million of them in a
    16 MB body were validated and parsed one by one, holding every stream for seconds."""
    bias = {"0" * k + "1": 1.0 for k in range(2000)}
    r = post(small, {"model": MODEL, "prompt": "a", "max_tokens": 1, "logit_bias": bias})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "logit_bias"
    assert "2000 keys" in error["message"] and "320 tokens" in error["message"]


def test_every_choice_of_n_has_the_whole_logit_bias_and_its_own_seed(small):
    """The choices of a prompt share one SamplingParams' checks (copies differing in seed)."""
    bias = {str(t): -100.0 for t in range(320) if t != 7}
    body = {"model": MODEL, "prompt": "a", "max_tokens": 4, "n": 3, "ignore_eos": True}
    r = post(small, {**body, "logit_bias": bias, "return_token_ids": True, "temperature": 1})
    assert r.status_code == 200, r.text
    assert [c["token_ids"] for c in r.json()["choices"]] == [[7] * 4] * 3
    plain = {**body, "max_tokens": 16, "temperature": 1, "seed": 5, "return_token_ids": True}
    ids = [c["token_ids"] for c in post(small, plain).json()["choices"]]
    assert len({tuple(i) for i in ids}) == 3  # each sample its own seed
    assert ids == [c["token_ids"] for c in post(small, plain).json()["choices"]]  # reproducible


# -- deeply nested JSON -------------------------------------------------------------------------


def nested(depth: int) -> dict:
    value: dict = {"type": "string"}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("depth", [300, 900])
def test_a_tool_schema_nested_past_what_is_written_back_is_a_400(small, depth):
    """Nesting inside a schema where no subschema is (a property named "a" holding an object
    named "a"...): within the JSON parser's depth, it failed only when the tools were written
    for the prompt (pydantic's serializer stops at 255 levels): a 500."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": nested(depth)}}}  # fmt: skip
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = httpx.post(small.url + "/v1/chat/completions", json={**body, "tools": [tool]}, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools.0.function.parameters" and "deeper" in error["message"]
    # a deep schema within the limit still works
    tool["function"]["parameters"]["properties"] = nested(120)
    r = httpx.post(small.url + "/v1/chat/completions", json={**body, "tools": [tool]}, timeout=120)
    assert r.status_code == 200, r.text
