"""A client that hangs up aborts its engine requests and frees their KV blocks, streaming or not."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from api_helpers import MODEL

pytestmark = pytest.mark.slow

LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}


def wait_for_aborts(server, before: int, expected: int, timeout: float = 60) -> dict:
    """Wait until `expected` more requests were counted aborted, then until the engine is idle
    with no KV block held (`Server.wait_idle`): a leaked block fails there."""
    deadline = time.monotonic() + timeout
    while (body := server.health())["num_aborted_requests"] < before + expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"requests not aborted: {body}")
        time.sleep(0.1)
    return server.wait_idle(max(deadline - time.monotonic(), 1.0))


def test_streaming_disconnect_aborts(server):
    before = server.wait_idle()["num_aborted_requests"]
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**LONG, "stream": True, "n": 2},
        headers=server.headers, timeout=60,
    ) as r:  # fmt: skip
        assert r.status_code == 200
        # Hold the line iterator: breaking out of a `for` over iter_lines() closes the generator,
        # and with it httpx's connection, before the health check below.
        lines = r.iter_lines()
        got = 0
        while got < 3:
            got += next(lines).startswith("data: ")
        engine = server.health()["engine"]
        assert engine["num_running"] + engine["num_waiting"] >= 1  # still in the engine
    wait_for_aborts(server, before, 2)


def test_non_streaming_disconnect_aborts(server):
    before = server.wait_idle()["num_aborted_requests"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG, headers=server.headers, timeout=3)
    wait_for_aborts(server, before, 1)
    # the server keeps serving
    r = httpx.post(
        server.url + "/v1/completions", json={**LONG, "max_tokens": 1}, headers=server.headers
    )
    assert r.status_code == 200


def test_disconnect_during_prefill_aborts(server):
    """A client that hangs up while its long prompt is still being prefilled: the request ends
    before its first token and its KV blocks are freed."""
    before = server.wait_idle()["num_aborted_requests"]
    rid = f"prefill-hangup-{time.monotonic_ns()}"
    prompt = "word " * 10000  # ~10k tokens: seconds of prefill on a CPU
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 5},
            headers={**server.headers, "x-request-id": rid},
            timeout=1.0,
        )
    wait_for_aborts(server, before, 1)
    deadline = time.monotonic() + 10
    while True:  # the access-log line of that request
        lines = [ln for ln in server.log().splitlines() if rid in ln and '"aborted"' in ln]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    record = json.loads(lines[0])
    assert record["aborted"] is True and record["completion_tokens"] == 0
    assert record["prompt_tokens"] > 5000
