"""What one client can make the server hold: a whole response's size (`--max-response-bytes`).

The server serves a tiny random Llama (320 tokens, no keys) with a small response limit, so a
request of a few choices with logprobs and listed sampling masks passes it in a few tokens;
another has a limit of a few words, for Anthropic's Messages and OpenAI's Responses (no `n`, no
sampling masks: only their text and logprobs grow). A Responses response also holds what its MCP
servers answer (the test MCP server's `long_text` tool: about 550 KB).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import api_conftest, named_events  # noqa: E402
from mcp_server import start_mcp_servers  # noqa: E402

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


def limited_server(tmp_path_factory, name: str, max_response_bytes: int):
    """A tiny Llama server whose responses may hold at most `max_response_bytes`."""
    conftest = api_conftest()
    tmp = tmp_path_factory.mktemp(name)
    model = conftest.write_tiny_llama_for_ops(tmp / "llama")
    srv = conftest.start_server(
        tmp, "--model", str(model), "--model-id", "tiny-llama", "--account", "testing",
        "--kv-cache-gb", "0.02", "--max-response-bytes", str(max_response_bytes),
        "--mcp-allowed-hosts", "127.0.0.1", api_key=None,  # the MCP test servers (mcp_server.py)
    )  # fmt: skip
    yield srv
    conftest.stop_server(srv)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    yield from limited_server(tmp_path_factory, "limits", RESPONSE_LIMIT)


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
    message = events[-1]["error"]["message"]
    assert "--max-response-bytes" in message and "raw_output" in message
    small.wait_idle(timeout=90)


# -- Messages and Responses ---------------------------------------------------------------------

WORDS_LIMIT = 100  # bytes: a few words of text, less than one token's top_logprobs


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    yield from limited_server(tmp_path_factory, "words", WORDS_LIMIT)


def openai_client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


# greedy: the random model does not end its turn (about a character a token)
CHAT = {"model": MODEL, "temperature": 0}
# the SDK has no temperature argument any more: sent as extra_body
MESSAGE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
           "extra_body": {"temperature": 0}}  # fmt: skip
LOGPROBS = {**CHAT, "input": "hi", "top_logprobs": 5, "include": ["message.output_text.logprobs"]}


def test_a_whole_message_past_the_limit_is_anthropics_400_and_a_stream_is_not_bounded(words):
    client = anthropic.Anthropic(base_url=words.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(**MESSAGE, max_tokens=400)
    error = caught.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    message = error["error"]["message"]
    assert f"limit of {WORDS_LIMIT} bytes" in message and "--max-response-bytes" in message
    assert "stream" in message and "(max_tokens)" in message and "choices (n)" not in message
    words.wait_idle(timeout=90)  # its generation was stopped
    within = client.messages.create(**MESSAGE, max_tokens=8)
    assert within.stop_reason == "max_tokens" and within.usage.output_tokens == 8
    # a stream holds no body: the same request streams whole
    with client.messages.stream(**MESSAGE, max_tokens=160) as stream:
        streamed = stream.get_final_message()
    assert streamed.usage.output_tokens == 160
    assert len(streamed.content[0].text.encode()) > WORDS_LIMIT


def test_a_response_past_the_limit_is_a_400_and_is_not_stored(words):
    client = openai_client(words)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**LOGPROBS, max_output_tokens=64, store=True)
    message = caught.value.message
    assert f"limit of {WORDS_LIMIT} bytes" in message and "--max-response-bytes" in message
    assert "max_output_tokens" in message and "top_logprobs" in message
    response_id = caught.value.response.json()["request_id"]  # the response's id
    assert response_id.startswith("resp_")
    with pytest.raises(openai.NotFoundError):  # nothing stored, not even a part of it
        client.responses.retrieve(response_id)
    words.wait_idle(timeout=90)
    within = client.responses.create(**CHAT, input="hi", max_output_tokens=4, store=True)
    assert within.status == "incomplete" and within.usage.output_tokens == 4
    assert client.responses.retrieve(within.id).output_text == within.output_text


def test_a_streamed_response_past_the_limit_ends_with_an_error_event_and_is_not_stored(words):
    """Its response.completed event would repeat the whole response: held as a body is."""
    events = named_events(words, "/v1/responses", {**LOGPROBS, "max_output_tokens": 64,
                                                   "stream": True})  # fmt: skip
    name, error = events[-1]
    assert name == "error" and "--max-response-bytes" in error["message"], events[-1]
    assert "response.completed" not in [name for name, _ in events]
    response_id = events[0][1]["response"]["id"]
    r = httpx.get(f"{words.url}/v1/responses/{response_id}", timeout=30)
    assert r.status_code == 404, r.text
    words.wait_idle(timeout=90)


def test_a_background_response_past_the_limit_fails_keeping_no_output(words):
    client = openai_client(words)
    queued = client.responses.create(**LOGPROBS, max_output_tokens=64, background=True)
    deadline = time.monotonic() + 90
    while (r := client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, r.status
        time.sleep(0.05)
    assert r.status == "failed" and r.error.code == "invalid_prompt"
    assert "--max-response-bytes" in r.error.message and "top_logprobs" in r.error.message
    assert r.output == []  # none of it kept: a half would be read back as if whole
    assert r.usage.output_tokens < 64  # its generation stopped where it passed the limit


def test_a_response_with_logprobs_within_the_limit_is_whole(small):
    r = openai_client(small).responses.create(**LOGPROBS, max_output_tokens=8)
    assert r.status == "incomplete" and r.usage.output_tokens == 8
    (part,) = r.output[-1].content
    assert len(part.logprobs) == 8 and all(len(e.top_logprobs) == 5 for e in part.logprobs)


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


@pytest.fixture(scope="module")
def flood_mcp():
    servers = start_mcp_servers(flood=True)
    yield servers
    servers.stop()


def long_text_call(mcp, **tool) -> dict:
    """A response whose MCP call answers about 550 KB of text: past RESPONSE_LIMIT by itself
    (the model's own output, a forced call of a bounded argument, is far within it)."""
    server = {"type": "mcp", "server_label": "calc", "server_url": mcp.http_url, **tool}
    return {**CHAT, "input": "Describe a lighthouse.", "tools": [server], "max_tool_calls": 1,
            "tool_choice": {"type": "mcp", "server_label": "calc", "name": "long_text"},
            "max_output_tokens": 200}  # fmt: skip


def assert_mcp_result_too_large(message: str) -> None:
    assert f"limit of {RESPONSE_LIMIT} bytes" in message and "--max-response-bytes" in message
    assert "MCP" in message and "max_tool_calls" in message  # counted as the result came


def test_an_mcp_result_past_the_limit_is_a_400_and_is_not_stored(small, flood_mcp):
    client = openai_client(small)
    flood_mcp.clear()
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**long_text_call(flood_mcp), store=True)
    assert "tools/call" in flood_mcp.http.rpcs()  # the call ran: its result is what is too large
    assert_mcp_result_too_large(caught.value.message)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(caught.value.response.json()["request_id"])
    # streamed: its response.completed would hold the result; an error event ends it instead
    events = named_events(small, "/v1/responses", {**long_text_call(flood_mcp), "stream": True})
    names = [name for name, _ in events]
    assert "response.mcp_call.in_progress" in names and "response.completed" not in names
    name, error = events[-1]
    assert name == "error", names
    assert_mcp_result_too_large(error["message"])
    small.wait_idle(timeout=90)  # no later round was started


def test_mcp_tool_lists_count_toward_the_limit(words, flood_mcp):
    """What the response holds before its first round (an `mcp_list_tools` item per server,
    calls the client approved) is counted too: a tool list is more than WORDS_LIMIT alone."""
    tool = {"type": "mcp", "server_label": "calc", "server_url": flood_mcp.http_url}
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(words).responses.create(**CHAT, input="hi", tools=[tool],
                                              max_output_tokens=1)  # fmt: skip
    message = caught.value.message
    assert f"limit of {WORDS_LIMIT} bytes" in message and "MCP" in message
    words.wait_idle(timeout=90)
