"""A client that hangs up aborts its engine requests and frees their KV blocks, streaming or not."""

from __future__ import annotations

import time

import httpx
import pytest
from api_helpers import MODEL

pytestmark = pytest.mark.slow

LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}


def wait_for_aborts(server, before: int, expected: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = server.health()
        if body["num_aborted_requests"] >= before + expected and body["engine"]["num_running"] == 0:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"requests not aborted: {body}")
        time.sleep(0.1)


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
    body = wait_for_aborts(server, before, 2)
    assert body["engine"]["kv_blocks_used"] == 0


def test_non_streaming_disconnect_aborts(server):
    before = server.wait_idle()["num_aborted_requests"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG, headers=server.headers, timeout=3)
    body = wait_for_aborts(server, before, 1)
    assert body["engine"]["kv_blocks_used"] == 0
    # the server keeps serving
    r = httpx.post(
        server.url + "/v1/completions", json={**LONG, "max_tokens": 1}, headers=server.headers
    )
    assert r.status_code == 200
