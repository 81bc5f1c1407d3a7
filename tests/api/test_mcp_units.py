"""The MCP client (`girandole.mcp.client`) against a real MCP server (`mcp_server.py`) over both
transports, its deadline and its errors; which hosts a request may name
(`--mcp-allowed-hosts`); and how MCP items become chat messages. No model."""

from __future__ import annotations

import asyncio

import pytest
from loopback import free_port
from mcp_server import start_mcp_servers
from pydantic import ValidationError

from girandole.api.http.errors import APIError
from girandole.api.responses.convert import chat_messages
from girandole.api.responses.mcp import McpToolbox
from girandole.api.responses.schema import ResponsesRequest
from girandole.api.settings import ServerSettings
from girandole.mcp.client import McpClient, McpError, result_text
from girandole.mcp.hosts import HostPolicy


@pytest.fixture(scope="module")
def mcp():
    servers = start_mcp_servers()
    yield servers
    servers.stop()


@pytest.mark.parametrize("transport", ["auto", "sse"])
def test_list_and_call_over_both_transports(mcp, transport):
    url = mcp.http_url if transport == "auto" else mcp.sse_url

    async def main():
        async with McpClient(url, timeout=10, transport=transport) as client:
            names = sorted(t["name"] for t in await client.list_tools())
            return names, await client.call_tool("add", {"a": 2, "b": 3})

    names, result = asyncio.run(main())
    assert names == ["add", "boom", "dotted.name", "slow"]
    assert result_text(result["content"]) == "5" and not result["isError"]


def test_deadline_and_errors(mcp):
    async def slow():
        async with McpClient(mcp.http_url, timeout=0.5) as client:
            await client.call_tool("slow", {"seconds": 5})

    with pytest.raises(McpError) as timed_out:
        asyncio.run(slow())
    assert timed_out.value.body()["code"] == 504 and "timed out" in timed_out.value.message

    async def bad_arguments():
        async with McpClient(mcp.http_url, timeout=5) as client:
            return await client.call_tool("add", {"a": "x"})

    assert asyncio.run(bad_arguments())["isError"]  # the tool's own error, not the client's
    for url, code in ((f"http://127.0.0.1:{free_port()}/mcp", 502),
                      (mcp.http_url.replace("/mcp", "/nothing"), 404)):  # fmt: skip
        with pytest.raises(McpError) as failed:
            asyncio.run(McpClient(url, timeout=5).open())
        assert failed.value.body()["type"] == "http_error" and failed.value.code == code


def test_names_resolving_to_private_addresses():
    """Under `*`, a name is checked on connecting by the addresses it resolves to."""
    policy = HostPolicy(("*",))
    assert policy.allows_name("localhost.example", None)  # nothing known without DNS
    assert not asyncio.run(policy.allows("localhost", 80))
    assert asyncio.run(HostPolicy(("*", "localhost")).allows("localhost", 80))


def test_hosts_checked_on_every_request(mcp):
    """Redirects (and an SSE endpoint) are followed only to hosts the client may reach."""
    slash = mcp.http_url + "/"  # Starlette redirects it to /mcp

    async def listed(allowed):  # allowed: (host, port) -> awaitable bool
        async with McpClient(slash, timeout=5, allowed=allowed) as client:
            return len(await client.list_tools())

    assert asyncio.run(listed(HostPolicy(("127.0.0.1",)).allows)) == 4
    with pytest.raises(McpError) as refused:
        asyncio.run(listed(HostPolicy(("*",)).allows))  # a loopback address: not public
    assert refused.value.code == 403 and "may not reach" in refused.value.message


def test_result_text():
    parts = [{"type": "text", "text": "a"}, {"type": "image", "data": "..", "mimeType": "x/y"}]
    assert result_text(parts) == 'a\n{"type": "image", "data": "..", "mimeType": "x/y"}'


@pytest.mark.parametrize(
    "patterns, url, ok",
    [
        (["*"], "https://mcp.example.com/x", True),
        (["*"], "http://10.0.0.1:9/x", False),  # `*` is public hosts only
        (["*"], "http://169.254.169.254/x", False),
        (["*"], "http://[::1]:8000/x", False),
        (["*"], "http://localhost:8000/x", False),
        (["*", "10.0.0.1"], "http://10.0.0.1:9/x", True),  # named: allowed
        (["*.example.com"], "https://api.example.com/mcp", True),
        (["*.example.com"], "https://example.org/mcp", False),
        (["127.0.0.1:8000"], "http://127.0.0.1:8000/mcp", True),
        (["127.0.0.1:8000"], "http://127.0.0.1:8001/mcp", False),
        (["localhost"], "http://LOCALHOST:5/mcp", True),
        ([], "http://localhost/mcp", False),
        (["*"], "http://[::1/mcp", False),  # urlsplit raises on it: was a 500
        (["*"], "http://example.com:99999/mcp", False),
    ],
)  # fmt: skip
def test_allowed_hosts(patterns, url, ok):
    req = ResponsesRequest.model_validate(
        {"model": "m", "input": "x", "tools": [{"type": "mcp", "server_url": url}]}
    )
    settings = ServerSettings(mcp_allowed_hosts=patterns)
    if ok:
        assert McpToolbox.of(req, settings) is not None
        return
    with pytest.raises(APIError) as refused:
        McpToolbox.of(req, settings)
    assert refused.value.status_code == 400
    assert refused.value.param == ("tools.0.server_url" if patterns else "tools.0.type")


def _call(
    item_id: str, name: str, output: str | None = None, error: dict | str | None = None
) -> dict:
    return {"type": "mcp_call", "id": item_id, "server_label": "s", "name": name,
            "arguments": "{}", "output": output, "error": error}  # fmt: skip


def test_chat_messages_of_mcp_items():
    """One round's calls are one assistant turn, their results after it; a reasoning item
    starts the next round's turn; lists and approvals are not turns; an error is the result."""
    error = {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": "bad"}]}
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "mcp_list_tools", "id": "l", "server_label": "s", "tools": []},
        _call("c1", "a", "1"),
        _call("c2", "b", error=error),
        {
            "type": "reasoning",
            "id": "r",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "hm"}],
        },  # fmt: skip
        _call("c3", "a", "3"),
        {
            "type": "mcp_approval_request",
            "id": "p",
            "server_label": "s",
            "name": "a",
            "arguments": "{}",
        },  # fmt: skip
    ]
    out = chat_messages(None, items)
    assert [(m["role"], [c["id"] for c in m.get("tool_calls", [])]) for m in out] == [
        ("user", []), ("assistant", ["c1", "c2"]), ("tool", []), ("tool", []),
        ("assistant", ["c3"]), ("tool", []),
    ]  # fmt: skip
    assert [m["content"] for m in out if m["role"] == "tool"] == ["1", "Error: bad", "3"]
    assert out[4]["reasoning_content"] == "hm"


def test_mcp_call_item_sent_back_with_a_string_error():
    """An `mcp_call` item whose `error` is a plain message (older openai SDKs type it a string)
    is read as that message; it was a 500 (error_text took it for OpenAI's error object). An
    error neither a string nor an object is a 400 naming it."""
    user = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]}
    out = chat_messages(None, [user, _call("c1", "a", error="boom")])
    assert out[-1] == {"role": "tool", "tool_call_id": "c1", "content": "Error: boom"}
    item = {"type": "mcp_call", "server_label": "s", "name": "a", "arguments": "{}"}
    ResponsesRequest.model_validate({"model": "m", "input": [item | {"error": "boom"}]})
    with pytest.raises(ValidationError) as refused:
        ResponsesRequest.model_validate({"model": "m", "input": [item | {"error": 5}]})
    assert "error" in str(refused.value)
