"""A real MCP server for the tests (the `mcp` SDK's MCPServer, served by uvicorn in a thread on
127.0.0.1): the same tools over Streamable HTTP (`/mcp`) and over HTTP+SSE (`/sse`), each
transport on a port of its own, every HTTP request it gets recorded (method, headers, the
JSON-RPC method) so that tests can see what girandole sent."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

import uvicorn
from loopback import serve_in_thread
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations
from pydantic import Field


def make_server(flood: bool = False) -> MCPServer:
    """The test tools; `flood`: also one whose answer overflows any context window, and one
    answering about 550 KB to a short argument."""
    logging.getLogger("mcp").setLevel(logging.WARNING)  # a line per session otherwise
    srv = MCPServer("girandole-tests")

    @srv.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @srv.tool()
    def boom(x: str) -> str:
        """Always fails."""
        raise ValueError(f"boom: {x}")

    @srv.tool()
    async def slow(seconds: float) -> str:
        """Sleeps, then answers."""
        await asyncio.sleep(min(seconds, 30))
        return "awake"

    if flood:

        @srv.tool(name="flood")
        def flood_tool(text: str) -> str:
            """Answers more text than any context window holds."""
            return "lighthouse " * 50_000

        @srv.tool(name="long_text")
        def long_text(word: Annotated[str, Field(max_length=8)]) -> str:
            """Answers about 550 KB of text (its argument bounded: a forced call stays short)."""
            return f"{word} " * 50_000

    @srv.tool(name="dotted.name")
    def dotted() -> str:
        """A tool whose name is not a function name."""
        return "x"

    return srv


class Recorder:
    """ASGI middleware: every HTTP request's method, headers and JSON-RPC method."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []
        self.hold_deletes: threading.Event | None = None  # a session's end waits until it is set
        self.held = 0  # session ends waiting for it now

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        entry: dict[str, Any] = {"method": scope["method"], "headers": headers, "rpc": None}
        self.seen.append(entry)
        held = self.hold_deletes
        if scope["method"] == "DELETE" and held is not None:
            self.held += 1
            try:
                await asyncio.to_thread(held.wait, 30)
            finally:
                self.held -= 1

        async def recorded() -> Any:
            message = await receive()
            if message["type"] == "http.request" and message.get("body"):
                try:
                    entry["rpc"] = json.loads(message["body"]).get("method")
                except ValueError:
                    pass
            return message

        await self.app(scope, recorded, send)

    def rpcs(self) -> list[str]:
        return [e["rpc"] for e in self.seen if e["rpc"]]


@dataclass
class McpServers:
    http_url: str
    sse_url: str
    http: Recorder
    sse: Recorder
    _servers: list[uvicorn.Server] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def clear(self) -> None:
        self.http.seen.clear()
        self.sse.seen.clear()

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        for thread in self._threads:
            thread.join(10)


def start_mcp_servers(flood: bool = False) -> McpServers:
    """Both transports of the test tools, up and answering."""
    srv = make_server(flood)
    http, sse = Recorder(srv.streamable_http_app()), Recorder(srv.sse_app())
    started = [serve_in_thread(app) for app in (http, sse)]
    servers = McpServers(started[0][2] + "/mcp", started[1][2] + "/sse", http, sse)
    for server, thread, _ in started:
        servers._servers.append(server)
        servers._threads.append(thread)
    return servers
