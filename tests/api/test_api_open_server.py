"""A server without keys (open), on a tiny model that always stops on EOS at once: start-up,
EOS counting, ignore_eos, context-length truncation, body-size limit, 2025 usage placement,
its accounts."""

from __future__ import annotations

import fireworks
import httpx
from api_helpers import sse_events

MODEL = "accounts/testing/models/tiny-eos"
CONTEXT = 64


def complete(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, timeout=60)


def test_health_is_200_when_ready(open_server):
    # this model loads in a blink: /health may never have been seen answering 503
    codes = open_server.health_codes
    assert codes[-1] == 200 and all(code == 503 for code in codes[:-1])
    assert open_server.health()["status"] == "ready"


def test_open_server_warns_at_start_up_and_needs_no_key(open_server):
    assert "no API keys configured" in open_server.log()
    assert complete(open_server, prompt="hello", max_tokens=1).status_code == 200
    r = httpx.get(open_server.url + "/v1/models", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == MODEL
    assert r.json()["data"][0]["context_length"] == CONTEXT


def test_eos_is_counted_but_not_shown(open_server):
    body = complete(open_server, prompt="hello", temperature=0).json()
    assert body["choices"][0] == {
        "index": 0, "text": "", "logprobs": None, "finish_reason": "stop",
    }  # fmt: skip
    assert body["usage"]["completion_tokens"] == 1
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] - 1
    body = complete(open_server, prompt=["a", "b"], n=3, temperature=0).json()
    assert body["usage"]["completion_tokens"] == 6
    assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * 6


def test_ignore_eos(open_server):
    body = complete(open_server, prompt="hello", temperature=0, max_tokens=5, ignore_eos=True)
    body = body.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_context_length_exceeded_behavior(open_server):
    prompt = [1] + [5] * (CONTEXT - 5)  # room for 4 tokens
    body = complete(open_server, prompt=prompt, max_tokens=50, ignore_eos=True, temperature=0)
    body = body.json()
    assert body["usage"] == {
        "prompt_tokens": CONTEXT - 4, "completion_tokens": 4, "total_tokens": CONTEXT,
        "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip
    assert body["choices"][0]["finish_reason"] == "length"
    r = complete(open_server, prompt=prompt, max_tokens=5, context_length_exceeded_behavior="error")
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    r = complete(open_server, prompt=prompt, max_tokens=4, context_length_exceeded_behavior="error")
    assert r.status_code == 200
    r = complete(open_server, prompt=[1] * CONTEXT)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        f"The prompt is too long: {CONTEXT}, model maximum context length: {CONTEXT}"
    )


def test_body_over_the_limit_is_413(open_server):
    big = {"model": MODEL, "prompt": "x" * 70_000}
    r = httpx.post(open_server.url + "/v1/completions", json=big)
    assert r.status_code == 413
    assert "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while reading
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}'

    r = httpx.post(open_server.url + "/v1/completions", content=chunks())
    assert r.status_code == 413
    assert complete(open_server, prompt="still serving", max_tokens=1).status_code == 200


def test_usage_on_each_finish_chunk_when_configured(open_server):
    events = sse_events(
        open_server, {"model": MODEL, "prompt": ["a", "b"], "n": 2, "temperature": 0}
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(len(c["choices"]) == 1 for c in chunks)  # no separate usage chunk
    finishes = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(c["choices"][0]["index"] for c in finishes) == [0, 1, 2, 3]
    running = [c["usage"]["completion_tokens"] for c in finishes]
    assert running == [1, 2, 3, 4]  # running total over the choices
    assert all(c["usage"] is None for c in chunks if not c["choices"][0]["finish_reason"])


def test_an_open_server_serves_every_account(open_server):
    fw = fireworks.Fireworks(
        api_key="anything", account_id="testing", base_url=open_server.url, max_retries=0
    )
    assert [a.name for a in fw.accounts.list()] == ["accounts/testing"]  # its --account
    assert fw.accounts.get(account_id="elsewhere").name == "accounts/elsewhere"
