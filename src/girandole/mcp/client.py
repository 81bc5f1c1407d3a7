"""A client of one remote MCP server (the Model Context Protocol: JSON-RPC 2.0 over HTTP), for
the tools a Responses request names: `initialize`, `tools/list`, `tools/call`.

Two transports:
- Streamable HTTP (the spec since 2025-03-26): every message is a POST to the server's URL; the
  answer is a JSON body or an SSE stream that carries it; the session id comes back in the
  `Mcp-Session-Id` header and goes with every later message.
- HTTP+SSE (the 2024-11-05 spec; Fireworks' `"type": "sse"` tools): a GET opens an event
  stream whose first `endpoint` event names where to POST; the answers arrive on the stream.
`transport="auto"` tries Streamable HTTP and, when the first POST is refused with 400, 404 or
405, HTTP+SSE on the same URL (the spec's rule for servers of the older transport).

Our own small client, not the `mcp` SDK's: each operation is a plain await under a deadline on
the server's event loop (the SDK runs anyio task groups whose cancel scopes must close in the
task that opened them, which a streamed response's generator is not), and what a server sends
is capped in size (`MAX_MESSAGE_BYTES`), so no server can hang or bloat a request. An error
names the HTTP status, never the body: a URL that is no MCP server tells the client nothing of
what answers there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urljoin

import httpx

from girandole import __version__

PROTOCOL_VERSION = "2025-06-18"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one JSON-RPC message (a tool's output, a tool list)
MAX_LIST_PAGES = 20  # tools/list pages followed (nextCursor)
FALLBACK_STATUSES = (400, 404, 405)  # a POST refused so: the server speaks HTTP+SSE


class McpError(Exception):
    """An MCP server that failed, in the shapes of OpenAI's `mcp_call.error`: `http_error`
    (unreachable, an HTTP error status, a timeout, a reply that is not MCP) or
    `mcp_protocol_error` (a JSON-RPC error answer)."""

    def __init__(self, message: str, kind: str = "http_error", code: int = 502) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"type": self.kind, "code": self.code, "message": self.message}


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of a text/event-stream, one per blank-line-terminated event."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


async def _capped_lines(response: httpx.Response) -> AsyncIterator[str]:
    """A streamed body's lines; an event longer than MAX_MESSAGE_BYTES is an error."""
    pending = 0
    async for line in response.aiter_lines():
        pending = 0 if not line else pending + len(line)
        if pending > MAX_MESSAGE_BYTES:
            raise McpError(f"a message over {MAX_MESSAGE_BYTES} bytes")
        yield line


def _message(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise McpError("the server sent a message that is not JSON") from None


class McpClient:
    """One session with one MCP server. Use `async with`, or `open()` and `close()`."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
        transport: Literal["auto", "sse"] = "auto",
        allowed: Callable[[str, int | None], Awaitable[bool]] | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.transport = transport
        self.allowed = allowed  # which hosts (and ports) it may reach: redirects, SSE endpoints
        self._http = httpx.AsyncClient(
            headers=headers or {},
            timeout=timeout,
            follow_redirects=True,
            event_hooks={"request": [self._check_host]},
        )
        self._ids = 0
        self._session_id: str | None = None
        self._protocol: str | None = None
        self._opened = False
        # HTTP+SSE: the stream, its reader, where to POST, and the answers awaited by id
        self._stream: httpx.Response | None = None
        self._reader: asyncio.Task[None] | None = None
        self._endpoint: asyncio.Future[str] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}

    async def _check_host(self, request: httpx.Request) -> None:
        """Every request (a redirect's, the SSE endpoint's too) goes to a host it may reach."""
        if self.allowed is not None and not await self.allowed(request.url.host, request.url.port):
            raise McpError(
                f"the server sent this client to {request.url.host}, a host it may not reach",
                code=403,
            )

    async def __aenter__(self) -> McpClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the operations ----------------------------------------------------------------------

    async def open(self) -> dict[str, Any]:
        """Connect and initialize the session: the server's `initialize` result."""
        params = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "girandole", "version": __version__},
        }
        async with self._deadline("initialize"):
            if self.transport == "sse":
                await self._open_sse()
            result = await self._request("initialize", params, first=True)
            if not isinstance(result, dict):
                raise McpError("the server's initialize result is not an object")
            self._protocol = str(result.get("protocolVersion") or PROTOCOL_VERSION)
            await self._notify("notifications/initialized")
        self._opened = True
        return result

    async def list_tools(self) -> list[dict[str, Any]]:
        """The server's tools (`name`, `description`, `inputSchema`, `annotations`, ...)."""
        tools: list[dict[str, Any]] = []
        cursor = None
        async with self._deadline("tools/list"):
            for _ in range(MAX_LIST_PAGES):
                result = await self._request("tools/list", {"cursor": cursor} if cursor else {})
                page = result.get("tools") if isinstance(result, dict) else None
                if not isinstance(page, list):
                    raise McpError("the server's tools/list result has no tool list")
                tools += [t for t in page if isinstance(t, dict) and isinstance(t.get("name"), str)]
                cursor = result.get("nextCursor")
                if not cursor:
                    break
        return tools

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """A `tools/call` result: `content` parts, `isError`, maybe `structuredContent`."""
        async with self._deadline(f"tools/call {name}"):
            result = await self._request("tools/call", {"name": name, "arguments": arguments})
        if not isinstance(result, dict):
            raise McpError("the server's tools/call result is not an object")
        return result

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._stream is not None:
            await self._stream.aclose()
        elif self._session_id is not None and self._opened:
            try:  # Streamable HTTP: end the session (a server may refuse with 405: fine)
                async with asyncio.timeout(min(self.timeout, 5.0)):
                    await self._http.delete(self.url, headers=self._session_headers())
            except (httpx.HTTPError, TimeoutError):
                pass
        await self._http.aclose()

    # -- JSON-RPC ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _deadline(self, what: str) -> AsyncIterator[None]:
        """An operation under the client's timeout; transport failures as McpError."""
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except TimeoutError:
            raise McpError(f"{what} timed out after {self.timeout:g} s", code=504) from None
        except httpx.HTTPError as exc:
            raise McpError(f"{what} failed: {type(exc).__name__}: {exc}") from None

    async def _request(self, method: str, params: dict[str, Any], first: bool = False) -> Any:
        self._ids += 1
        message = {"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params}
        if self._stream is not None:
            answer = await self._sse_request(message)
        else:
            answer = await self._post(message, first)
            if answer is None and self._stream is not None:  # fell back to HTTP+SSE
                answer = await self._sse_request(message)
        if not isinstance(answer, dict):
            raise McpError(f"no answer to {method}")
        error = answer.get("error")
        if error is not None:
            error = error if isinstance(error, dict) else {}
            code = error.get("code")
            raise McpError(
                str(error.get("message") or "error"),
                "mcp_protocol_error",
                code if isinstance(code, int) else -32603,
            )
        return answer.get("result")

    async def _notify(self, method: str) -> None:
        message = {"jsonrpc": "2.0", "method": method}
        if self._stream is not None:
            await self._sse_post(message)
        else:
            await self._post(message)

    # -- Streamable HTTP ---------------------------------------------------------------------

    def _session_headers(self) -> dict[str, str]:
        headers = {}
        if self._session_id is not None:
            headers["mcp-session-id"] = self._session_id
        if self._protocol is not None:
            headers["mcp-protocol-version"] = self._protocol
        return headers

    async def _post(self, message: dict[str, Any], first: bool = False) -> Any:
        """POST one message; its answer (None for a notification, or when the server turned
        out to speak HTTP+SSE and the stream is now open)."""
        headers = {"accept": "application/json, text/event-stream"} | self._session_headers()
        request = self._http.build_request("POST", self.url, json=message, headers=headers)
        response = await self._http.send(request, stream=True)
        try:
            if first and self.transport == "auto" and response.status_code in FALLBACK_STATUSES:
                await response.aclose()
                await self._open_sse()
                return None
            if response.status_code >= 400:
                raise McpError(
                    f"HTTP {response.status_code} from the server", code=response.status_code
                )
            if first:
                self._session_id = response.headers.get("mcp-session-id")
            if "id" not in message or response.status_code == 202:
                return None
            kind = response.headers.get("content-type", "")
            if kind.startswith("text/event-stream"):
                async for _, data in sse_events(_capped_lines(response)):
                    answer = _message(data)
                    if isinstance(answer, dict) and answer.get("id") == message["id"]:
                        return answer
                return None
            body = await self._read_capped(response)
            answer = _message(body.decode(errors="replace"))
            if isinstance(answer, list):  # a batch: ours is in it
                answer = next((a for a in answer if a.get("id") == message["id"]), None)
            return answer
        finally:
            await response.aclose()

    @staticmethod
    async def _read_capped(response: httpx.Response) -> bytes:
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_MESSAGE_BYTES:
                raise McpError(f"a message over {MAX_MESSAGE_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- HTTP+SSE ----------------------------------------------------------------------------

    async def _open_sse(self) -> None:
        loop = asyncio.get_running_loop()
        self._endpoint = loop.create_future()
        request = self._http.build_request("GET", self.url, headers={"accept": "text/event-stream"})
        response = await self._http.send(request, stream=True)
        if response.status_code >= 400:
            await response.aclose()
            raise McpError(
                f"HTTP {response.status_code} from the server", code=response.status_code
            )
        self._stream = response
        self._reader = asyncio.create_task(self._read_stream(response))
        await self._endpoint

    async def _read_stream(self, response: httpx.Response) -> None:
        """Route what the stream carries: the endpoint to POST to, then answers by id."""
        assert self._endpoint is not None
        failure: McpError = McpError("the server closed its event stream")
        try:
            async for event, data in sse_events(_capped_lines(response)):
                if event == "endpoint":
                    if not self._endpoint.done():
                        self._endpoint.set_result(urljoin(self.url, data.strip()))
                    continue
                try:
                    answer = json.loads(data)
                except ValueError:
                    continue
                if isinstance(answer, dict) and "id" in answer and "method" not in answer:
                    waiting = self._pending.pop(answer["id"], None)
                    if waiting is not None and not waiting.done():
                        waiting.set_result(answer)
        except McpError as exc:
            failure = exc
        except httpx.HTTPError as exc:
            failure = McpError(f"the event stream failed: {exc}")
        for waiting in [self._endpoint, *self._pending.values()]:
            if not waiting.done():
                waiting.set_exception(failure)

    async def _sse_post(self, message: dict[str, Any]) -> None:
        assert self._endpoint is not None
        endpoint = await self._endpoint
        response = await self._http.post(endpoint, json=message)
        if response.status_code >= 400:
            raise McpError(
                f"HTTP {response.status_code} from the server", code=response.status_code
            )

    async def _sse_request(self, message: dict[str, Any]) -> Any:
        waiting: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = waiting
        try:
            await self._sse_post(message)
            return await waiting
        finally:
            self._pending.pop(message["id"], None)


def result_text(content: Any) -> str:
    """A tool result's content as one string: text parts as they are, other parts as JSON."""
    if not isinstance(content, list):
        return json.dumps(content)
    texts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        else:
            texts.append(json.dumps(part))
    return "\n".join(texts)


def error_text(error: dict[str, Any]) -> str:
    """What the model reads of a failed call."""
    if error.get("type") == "mcp_tool_execution_error":
        return "Error: " + result_text(error.get("content"))
    return f"Error: {error.get('message', 'the call did not run')}"
