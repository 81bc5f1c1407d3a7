"""A client that hangs up, on every streaming surface beyond /v1/completions
(test_api_disconnect.py): chat with a forced tool call, a json_schema grammar, n=3 and logprobs;
Messages (text and a forced tool); Responses (stored, not stored, on a conversation, with MCP
calls); reasoning split from the answer on all three (a tiny Qwen3 whose template thinks). It
hangs up right after the headers, after the first event, or mid-way; or, not streaming, it
gives up (as a client whose read times out) once the engine works on it. After each: the
engine's requests were aborted (not run to max_tokens), their KV blocks are free, the
admission slot is free, the server logged no error, a Responses request was not stored, and
the server answers the next request. A
background response is the exception: its stream's readers hanging up stop nothing (OpenAI's
background mode), until it is cancelled."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from api_helpers import MODEL

pytestmark = pytest.mark.slow

MAX = 2000  # far more tokens than the engine makes before the client hangs up
STORY = "Write a long story about a lighthouse keeper."  # greedy: the model loops, never ends
# a string the grammar keeps open for 4,000 characters: the output cannot end early
LONG = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 4000}},
    "required": ["text"],
    "additionalProperties": False,
}
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": MAX,
    "ignore_eos": True,
}
TOOL = {"type": "function", "function": {"name": "write", "parameters": LONG}}


@dataclass(frozen=True)
class Surface:
    path: str
    body: dict[str, Any]
    choices: int = 1  # engine requests it runs
    responses: bool = False  # a Responses stream: not stored once cut


SURFACES = {
    "chat-tool-required": Surface(
        "/v1/chat/completions", CHAT | {"tools": [TOOL], "tool_choice": "required"}
    ),
    "chat-json-schema": Surface(
        "/v1/chat/completions",
        CHAT
        | {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "long", "schema": LONG},
            }
        },
    ),
    "chat-n3": Surface("/v1/chat/completions", CHAT | {"n": 3}, choices=3),
    "chat-logprobs": Surface("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 5}),
    "messages": Surface(
        "/v1/messages",
        {
            "model": MODEL,
            "max_tokens": MAX,
            "temperature": 0,
            "messages": [{"role": "user", "content": STORY}],
        },
    ),
    "messages-tool": Surface(
        "/v1/messages",
        {
            "model": MODEL,
            "max_tokens": MAX,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"name": "write", "input_schema": LONG}],
            "tool_choice": {"type": "tool", "name": "write"},
        },
    ),
    "responses-store": Surface(
        "/v1/responses",
        {"model": MODEL, "input": STORY, "max_output_tokens": MAX, "temperature": 0},
        responses=True,
    ),
    "responses-no-store": Surface(
        "/v1/responses",
        {
            "model": MODEL,
            "input": STORY,
            "max_output_tokens": MAX,
            "temperature": 0,
            "store": False,
        },
        responses=True,
    ),
}


def small_body(surface: Surface) -> dict[str, Any]:
    """The surface's request, capped to a few tokens and answered whole."""
    body = dict(surface.body, stream=False)
    if surface.path == "/v1/responses":
        body["max_output_tokens"] = 16  # OpenAI's least
    else:
        body["max_tokens"] = 2
    return body


class Watch:
    """What the server is doing around one hang-up: its counters before, its log since."""

    def __init__(self, server) -> None:
        self.server = server
        health = server.wait_idle()
        self.aborted = health["num_aborted_requests"]
        self.kv_blocks = health["engine"]["kv_blocks_used"]
        self.log_from = len(server.log())

    def new_log(self) -> str:
        return self.server.log()[self.log_from :]

    def assert_cleaned_up(self, choices: int, request_id: str, max_tokens: int = MAX) -> dict:
        """The `choices` engine requests were aborted, their blocks and slot freed, the access
        log says so (`request_id` in its line), and nothing was logged as an error."""
        deadline = time.monotonic() + 60
        while True:
            health = self.server.health()
            if (
                health["num_aborted_requests"] >= self.aborted + choices
                and health["engine"]["num_running"] == 0
                and active_requests(self.server) == 0
                and (record := access_record(self.new_log(), request_id)) is not None
            ):
                break
            assert time.monotonic() < deadline, f"not cleaned up: {health}"
            time.sleep(0.1)
        assert health["num_aborted_requests"] == self.aborted + choices, health
        assert health["engine"]["kv_blocks_used"] == self.kv_blocks, health
        assert record["aborted"] is True and record["status"] in (200, 499), record
        assert record["completion_tokens"] < choices * max_tokens, record
        assert_no_errors(self.new_log())
        return record


def active_requests(server) -> float:
    """The admission slots held (`girandole_requests_active` in /metrics)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(r"^girandole_requests_active (\S+)$", text, re.M)[1])


def access_record(log: str, request_id: str) -> dict | None:
    for line in log.splitlines():
        if request_id in line and '"aborted"' in line:
            return json.loads(line)
    return None


def assert_no_errors(log: str) -> None:
    bad = [
        ln
        for ln in log.splitlines()
        if '"level": "error"' in ln or '"level": "critical"' in ln or "Traceback" in ln
    ]
    assert not bad, "\n".join(bad)


def assert_serves(server, surface: Surface) -> None:
    r = httpx.post(
        server.url + surface.path, json=small_body(surface), headers=server.headers, timeout=120
    )
    assert r.status_code == 200, r.text


def give_up_once(server, path: str, body: dict, request_id: str, working: Callable[[], bool]):
    """POST `body` whole (not streamed) with httpx, and give up on it, as a client whose read
    times out, as soon as `working()` says the server works on it (a fixed read timeout, 3 s,
    was waited out whole when the engine had the request at once, and on a busy machine could
    end before the engine had it)."""

    async def run() -> None:
        headers = server.headers | {"x-request-id": request_id}
        async with httpx.AsyncClient(timeout=120) as client:
            post = asyncio.create_task(client.post(server.url + path, json=body, headers=headers))
            deadline = time.monotonic() + 60
            while not await asyncio.to_thread(working):
                assert not post.done(), post.result().text  # answered: nothing to give up on
                assert time.monotonic() < deadline, "the server never worked on it"
                await asyncio.sleep(0.05)
            post.cancel()  # the connection is closed, its response never read
            try:
                await post
            except asyncio.CancelledError:
                pass
            else:
                raise AssertionError("answered before the client gave up")

    asyncio.run(run())


def engine_runs(server, n: int) -> Callable[[], bool]:
    """Whether the engine runs `n` requests (the server idle before: `Watch`)."""
    return lambda: server.health()["engine"]["num_running"] >= n


def hang_up(server, surface: Surface, when: str) -> tuple[str, str]:
    """Stream the surface's request and hang up `when` ("headers", "first" event, "midway");
    (the response id the headers named, the first event's data)."""
    body = surface.body | {"stream": True}
    first = ""
    with httpx.stream(
        "POST", server.url + surface.path, json=body, headers=server.headers, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        response_id = r.headers["x-request-id"]
        if when != "headers":
            # hold the iterator: leaving a `for` over it would close the connection at once
            lines = r.iter_lines()
            wanted, got = (1 if when == "first" else 20), 0
            while got < wanted:
                line = next(lines)
                if line.startswith("data:"):
                    first = first or line
                    got += 1
        engine = server.health()["engine"]  # still at the engine as it hangs up
        assert engine["num_running"] + engine["num_waiting"] >= 1, engine
    return response_id, first


# Every surface hangs up mid-way (its generator, grammar, tool parser or stored response in
# the middle of its work); the earlier points (before the first event, right after it) go
# through each API's stream set-up, so one surface of each API covers them (the suite's time).
HANG_UPS = [(name, "midway") for name in SURFACES] + [
    (name, when)
    for name in ("chat-tool-required", "messages", "responses-store")
    for when in ("headers", "first")
]


@pytest.mark.parametrize(("name", "when"), HANG_UPS)
def test_streaming_hang_up(server, name, when):
    surface = SURFACES[name]
    watch = Watch(server)
    response_id, first = hang_up(server, surface, when)
    watch.assert_cleaned_up(surface.choices, response_id)
    if surface.responses:
        # a synchronous response cut short is not stored (OpenAI stops it, and GET finds
        # nothing): it is saved only when it ends
        if first:
            assert json.loads(first.removeprefix("data:"))["response"]["id"] == response_id
        got = httpx.get(f"{server.url}/v1/responses/{response_id}", headers=server.headers)
        assert got.status_code == 404, got.text
    assert_serves(server, surface)


def test_hang_up_on_a_conversation_adds_nothing(server):
    """A response on a conversation whose client hangs up: the turn never joins it."""
    created = httpx.post(
        server.url + "/v1/conversations",
        json={"items": [{"type": "message", "role": "user", "content": "Hello"}]},
        headers=server.headers,
    )
    assert created.status_code == 200, created.text
    conversation = created.json()["id"]
    items_url = f"{server.url}/v1/conversations/{conversation}/items"
    before = httpx.get(items_url, headers=server.headers).json()["data"]
    surface = Surface(
        "/v1/responses",
        SURFACES["responses-store"].body | {"conversation": conversation},
        responses=True,
    )
    watch = Watch(server)
    response_id, _ = hang_up(server, surface, "midway")
    watch.assert_cleaned_up(1, response_id)
    assert httpx.get(items_url, headers=server.headers).json()["data"] == before
    assert_serves(server, surface)
    after = httpx.get(items_url, headers=server.headers).json()["data"]
    assert len(after) == len(before) + 2  # the next turn joined: its input and its answer


@pytest.mark.parametrize("name", ["chat-tool-required", "messages-tool", "responses-store"])
def test_non_streaming_client_times_out(server, name):
    surface = SURFACES[name]
    watch = Watch(server)
    rid = f"timeout-{name}-{time.monotonic_ns()}"
    give_up_once(server, surface.path, surface.body, rid, engine_runs(server, surface.choices))
    record = watch.assert_cleaned_up(surface.choices, rid)
    if surface.responses:  # not stored: saved only when it ends
        got = httpx.get(f"{server.url}/v1/responses/{record['request_id']}", headers=server.headers)
        assert record["request_id"].startswith("resp_") and got.status_code == 404, got.text
    assert_serves(server, surface)


@pytest.mark.parametrize("when", ["headers", "midway"])
def test_background_stream_reader_hanging_up_stops_nothing(server, when):
    """`background: true`: the reader of its stream hangs up (right after the headers, or
    mid-way), then a reader of GET ?stream=true&starting_after does too; the response runs on
    (OpenAI's background mode: a dropped stream is picked up again, the response is polled or
    cancelled) until it is cancelled."""
    body = SURFACES["responses-store"].body | {"background": True, "stream": True}
    watch = Watch(server)
    events: list[dict] = []
    with httpx.stream(
        "POST", server.url + "/v1/responses", json=body, headers=server.headers, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        response_id = r.headers["x-request-id"]
        lines = r.iter_lines()
        while when == "midway" and sum(e["type"].endswith("text.delta") for e in events) < 5:
            line = next(lines)
            if line.startswith("data:"):
                events.append(json.loads(line.removeprefix("data:")))
    # created, queued, in_progress: 0 to 2
    last = events[-1]["sequence_number"] if events else 2
    url = f"{server.url}/v1/responses/{response_id}"

    def assert_runs_on() -> None:
        deadline = time.monotonic() + 30
        while httpx.get(url, headers=server.headers).json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # the hang-up noticed, had it stopped anything
        health = server.health()
        assert health["engine"]["num_running"] == 1, health
        assert health["num_aborted_requests"] == watch.aborted, health
        assert httpx.get(url, headers=server.headers).json()["status"] == "in_progress"

    assert_runs_on()
    with httpx.stream(
        "GET",
        url,
        params={"stream": "true", "starting_after": last},
        headers=server.headers,
        timeout=60,
    ) as r:
        assert r.status_code == 200, r.read()
        lines, more = r.iter_lines(), []
        while len(more) < 3:
            line = next(lines)
            if line.startswith("data:"):
                more.append(json.loads(line.removeprefix("data:")))
    assert [e["sequence_number"] for e in more] == [last + 1, last + 2, last + 3]
    assert_runs_on()
    cancelled = httpx.post(url + "/cancel", headers=server.headers, timeout=60)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert 0 < cancelled.json()["usage"]["output_tokens"] < MAX
    watch.assert_cleaned_up(1, response_id)


@pytest.fixture(scope="module")
def mcp():
    from mcp_server import start_mcp_servers

    servers = start_mcp_servers()
    yield servers
    servers.stop()


@pytest.mark.parametrize(
    "until, tool",
    [
        ("response.mcp_call.in_progress", "slow"),  # streamed, while the call runs
        ("response.output_text.delta", "add"),  # streamed, in the round after the call
        (None, "slow"),  # not streamed: given up on while the call runs
    ],
)
def test_hang_up_on_a_response_with_mcp_calls(server, mcp, until, tool):
    """A response that runs an MCP call, cut while the call runs or in the round after it: the
    call's session is closed (its DELETE sent), the engine stops, the slot is freed, nothing
    is logged as an error, nothing is stored."""
    mcp.clear()
    arguments = {"slow": {"seconds": 20}, "add": {}}[tool]
    body = {
        "model": MODEL,
        "input": f"Call {tool} with {json.dumps(arguments)}",
        "stream": until is not None,
        "tools": [{"type": "mcp", "server_label": "calc", "server_url": mcp.http_url}],
        "tool_choice": {"type": "mcp", "server_label": "calc", "name": tool},
        "max_output_tokens": MAX,
        "temperature": 0,
        "max_tool_calls": 1,
    }
    watch = Watch(server)
    if until is None:
        response_id = f"timeout-mcp-{time.monotonic_ns()}"  # found in the access log
        # given up while the call runs (the slow tool takes 20 s)
        give_up_once(server, "/v1/responses", body, response_id,
                     lambda: "tools/call" in mcp.http.rpcs())  # fmt: skip
    else:
        with httpx.stream(
            "POST", server.url + "/v1/responses", json=body, headers=server.headers, timeout=60
        ) as r:
            assert r.status_code == 200, r.read()
            response_id = r.headers["x-request-id"]
            lines = r.iter_lines()
            seen: list[str] = []
            while until not in seen:
                line = next(lines)
                if line.startswith("data:"):
                    seen.append(json.loads(line.removeprefix("data:"))["type"])
            assert "response.mcp_call.in_progress" in seen
    deadline = time.monotonic() + 30
    while True:  # the session the call opened is ended
        record = access_record(watch.new_log(), response_id)
        ended = any(e["method"] == "DELETE" for e in mcp.http.seen)
        if record is not None and ended and active_requests(server) == 0:
            break
        assert time.monotonic() < deadline, (record, [e["method"] for e in mcp.http.seen])
        time.sleep(0.1)
    health = server.wait_idle()
    assert health["engine"]["kv_blocks_used"] == watch.kv_blocks, health
    # the round after the call was aborted; a call cut short leaves no engine request
    assert health["num_aborted_requests"] == watch.aborted + (tool == "add"), health
    assert_no_errors(watch.new_log())
    stored_id = record["request_id"]  # the response's id
    assert stored_id.startswith("resp_"), record
    got = httpx.get(f"{server.url}/v1/responses/{stored_id}", headers=server.headers)
    assert got.status_code == 404, got.text
    assert_serves(server, SURFACES["responses-store"])


QWEN = "accounts/testing/models/tiny-qwen3"
QWEN_MAX = 6000  # the tiny model is fast: more tokens than it makes before the hang-up


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny random Qwen3 whose template thinks: its output is split into reasoning."""
    import importlib.util
    import sys

    from api_helpers import API_KEY, ROOT, api_conftest

    name = "_girandole_root_conftest"  # the model engineer's helpers, as conftest.py loads them
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests/conftest.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    tmp = tmp_path_factory.mktemp("disconnect-qwen")
    conftest = api_conftest()
    model = sys.modules[name].write_tiny_qwen3(tmp / "qwen3")
    srv = conftest.start_server(
        tmp,
        "--model",
        str(model),
        "--model-id",
        "tiny-qwen3",
        "--account",
        "testing",
        "--kv-cache-gb",
        "0.02",
        "--max-model-len",
        "8192",
        "--api-key",
        API_KEY,
        api_key=API_KEY,
    )
    yield srv
    conftest.stop_server(srv)


# the prompt ends inside a <think> block: everything generated is reasoning (greedy, this
# model's output runs on past 500 tokens without an end of turn)
THINKING = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nHm"}]
REASONING = {
    "chat": Surface(
        "/v1/chat/completions",
        {"model": QWEN, "messages": THINKING, "max_tokens": QWEN_MAX, "ignore_eos": True},
    ),
    "messages": Surface(
        "/v1/messages",
        {"model": QWEN, "messages": THINKING, "max_tokens": QWEN_MAX, "temperature": 0},
    ),
    "responses": Surface(
        "/v1/responses",
        {
            "model": QWEN,
            "input": THINKING,
            "max_output_tokens": QWEN_MAX,
            "temperature": 0,
            "reasoning": {"effort": "high"},
        },
        responses=True,
    ),
}


@pytest.mark.parametrize("when", ["headers", "midway"])
@pytest.mark.parametrize("name", REASONING)
def test_hang_up_while_reasoning(qwen, name, when):
    """Reasoning split from the answer (chat's reasoning_content, Messages' thinking block,
    Responses' reasoning item), cut while the model reasons."""
    surface = REASONING[name]
    watch = Watch(qwen)
    response_id, _ = hang_up(qwen, surface, when)
    watch.assert_cleaned_up(1, response_id, QWEN_MAX)
    if surface.responses:
        got = httpx.get(f"{qwen.url}/v1/responses/{response_id}", headers=qwen.headers)
        assert got.status_code == 404, got.text
    assert_serves(qwen, surface)
