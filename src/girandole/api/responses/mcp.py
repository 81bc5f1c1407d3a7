"""The remote MCP servers of a Responses request (`tools` entries of type `mcp`, or Fireworks'
`sse`): this server lists their tools, offers them to the model as functions, and runs the calls
the model makes to them in the response's tool loop (`shape.py`), as Fireworks and OpenAI do.

- Listing: an `mcp_list_tools` item per server leads the output, unless the conversation
  already holds one for its label: then those tools are used and the server is not asked again
  (OpenAI's rule). A server that cannot be listed is a 424 naming it (OpenAI's status).
- `server_label`: names the server in items (default: the URL's host). `allowed_tools`: names,
  or `{"tool_names", "read_only"}` (read_only: the tools annotated `readOnlyHint`). Tools whose
  names are not function names (`[a-zA-Z0-9_-]{1,64}`) are not offered.
- `require_approval`: absent is `never` here, as Fireworks' examples run calls without asking
  (OpenAI's default is `always`). `always`, or `{"always": filter, "never": filter}`: such a
  call is an `mcp_approval_request` item that ends the response; the client answers with an
  `mcp_approval_response` item (and `previous_response_id`), and an approved call runs first
  in that next response.
- A call: an `mcp_call` item with `output` (the result's text parts, other parts as JSON) or
  `error` in OpenAI's shapes (`mcp_tool_execution_error` with the result's content,
  `mcp_protocol_error`, `http_error`); the model reads the output or the error's text. The item
  also carries Fireworks' `mcp: {name, arguments}`.
- `headers` and `authorization` (a bearer token) go to the server with every message.
- The server's operator decides which hosts may be named (`--mcp-allowed-hosts`, default any
  public host: `girandole.mcp.hosts`; empty: MCP tools are a 400) and how long one operation
  may take (`--mcp-timeout`).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from girandole.api.chat.schema import MAX_TOOLS
from girandole.api.http.errors import APIError, bad_request
from girandole.api.responses.convert import new_id
from girandole.api.responses.schema import (
    FunctionTool,
    McpApprovalFilter,
    McpTool,
    McpToolFilter,
    ResponsesRequest,
)
from girandole.api.settings import ServerSettings
from girandole.mcp.client import McpClient, McpError, result_text
from girandole.mcp.hosts import HostPolicy

FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # chat's tool names


def _matches(flt: McpToolFilter | None, tool: dict[str, Any]) -> bool:
    """Whether a tool passes a filter (None: none given, every tool does)."""
    if flt is None:
        return False
    if flt.tool_names is not None and tool["name"] not in flt.tool_names:
        return False
    if flt.read_only is not None:
        hints = tool.get("annotations") or {}
        if bool(hints.get("readOnlyHint")) != flt.read_only:
            return False
    return flt.tool_names is not None or flt.read_only is not None


@dataclass
class McpServer:
    """One `mcp` tool entry of the request."""

    index: int  # in the request's tools
    label: str
    url: str
    transport: Literal["auto", "sse"]
    headers: dict[str, str]
    allowed: list[str] | McpToolFilter | None
    approval: Literal["always", "never"] | McpApprovalFilter
    tools: list[dict[str, Any]] = field(default_factory=list)  # MCP's shape (`inputSchema`)
    client: McpClient | None = None

    def allows(self, tool: dict[str, Any]) -> bool:
        if self.allowed is None:
            return True
        if isinstance(self.allowed, list):
            return tool["name"] in self.allowed
        return _matches(self.allowed, tool) or self.allowed == McpToolFilter()

    def needs_approval(self, name: str) -> bool:
        if isinstance(self.approval, str):
            return self.approval == "always"
        tool = next((t for t in self.tools if t["name"] == name), {"name": name})
        if _matches(self.approval.never, tool):
            return False
        return _matches(self.approval.always, tool)

    def listed_item(self) -> dict[str, Any]:
        """The `mcp_list_tools` output item of the tools offered."""
        tools = [{"name": t["name"], "description": t.get("description"),
                  "input_schema": t.get("inputSchema") or {"type": "object"},
                  "annotations": t.get("annotations")} for t in self.tools]  # fmt: skip
        return {"id": new_id("mcpl"), "type": "mcp_list_tools", "server_label": self.label,
                "tools": tools}  # fmt: skip


def call_item(server: McpServer, name: str, arguments: str) -> dict[str, Any]:
    """An `mcp_call` output item before it has run."""
    return {"id": new_id("mcp"), "type": "mcp_call", "server_label": server.label, "name": name,
            "arguments": arguments, "output": None, "error": None, "status": "in_progress",
            "approval_request_id": None, "mcp": {"name": name, "arguments": arguments}}  # fmt: skip


def approval_item(server: McpServer, name: str, arguments: str) -> dict[str, Any]:
    return {"id": new_id("mcpr"), "type": "mcp_approval_request", "server_label": server.label,
            "name": name, "arguments": arguments}  # fmt: skip


def _checked_host(url: str | None, where: str, hosts: HostPolicy) -> str:
    """A tool's server_url's host, once the URL is one this server may connect to (a 400)."""
    if not url:
        raise bad_request(f"Field required, field: '{where}.server_url'", f"{where}.server_url")
    try:  # a malformed URL ("http://[::1") or port ("http://h:99999"): -1, a 400 below
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = urlsplit(""), -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise bad_request(
            f"server_url must be an http or https URL, field: '{where}.server_url'",
            f"{where}.server_url",
        )
    if not hosts.patterns:
        raise bad_request(
            f"MCP tools are turned off on this server (--mcp-allowed-hosts), field: '{where}.type'",
            f"{where}.type",
        )
    if not hosts.allows_name(parts.hostname, port):
        raise bad_request(
            f"This server may not connect to the MCP server at '{parts.hostname}'"
            " (--mcp-allowed-hosts: `*` allows public hosts, others must be named),"
            f" field: '{where}.server_url'",
            f"{where}.server_url",
        )
    return parts.hostname


class McpToolbox:
    """The request's MCP servers, their tools, and the calls run on them."""

    def __init__(self, servers: list[McpServer], timeout: float, hosts: HostPolicy) -> None:
        self.servers = servers
        self.timeout = timeout
        self.hosts = hosts  # --mcp-allowed-hosts

    @classmethod
    def of(cls, req: ResponsesRequest, settings: ServerSettings) -> McpToolbox | None:
        """The request's MCP servers (None: it names none); a 400 for one it may not name."""
        servers: list[McpServer] = []
        hosts = HostPolicy(tuple(settings.mcp_allowed_hosts))
        for i, tool in enumerate(req.tools or []):
            if not isinstance(tool, McpTool):
                continue
            where = f"tools.{i}"
            for unsupported in ("connector_id", "tunnel_id"):
                if getattr(tool, unsupported) is not None:
                    raise bad_request(
                        f"MCP {unsupported.split('_')[0]}s are not available on this server:"
                        f" give server_url, field: '{where}.{unsupported}'",
                        f"{where}.{unsupported}",
                    )
            host = _checked_host(tool.server_url, where, hosts)
            label = tool.server_label or host
            if any(s.label == label for s in servers):
                raise bad_request(
                    f"Two MCP tools have the server_label '{label}': labels must differ,"
                    f" field: '{where}.server_label'",
                    f"{where}.server_label",
                )
            headers = dict(tool.headers or {})
            if tool.authorization:
                headers["authorization"] = f"Bearer {tool.authorization}"
            servers.append(McpServer(
                i, label, tool.server_url or "", "sse" if tool.type == "sse" else "auto", headers,
                tool.allowed_tools, tool.require_approval or "never",
            ))  # fmt: skip
        return cls(servers, settings.mcp_timeout, hosts) if servers else None

    # -- tools -------------------------------------------------------------------------------

    async def list_tools(
        self, items: list[dict[str, Any]], functions: list[FunctionTool]
    ) -> list[dict[str, Any]]:
        """List every server's tools (those the conversation listed before: from its item);
        the new `mcp_list_tools` items. A server that fails is a 424."""
        listed = {i["server_label"]: i for i in items if i.get("type") == "mcp_list_tools"}
        new_items = []

        async def fetch(server: McpServer) -> list[dict[str, Any]]:
            try:
                async with self._client(server) as client:
                    return await client.list_tools()
            except McpError as exc:
                raise APIError(
                    424,
                    f"Error retrieving tool list from MCP server: '{server.label}'. {exc.message}",
                    type="external_connector_error",
                    code="failed_dependency",
                    param=f"tools.{server.index}",
                ) from None

        fresh = [s for s in self.servers if s.label not in listed]
        found = await asyncio.gather(*(fetch(s) for s in fresh))
        for server, tools in zip(fresh, found, strict=True):
            server.tools = [t for t in tools if server.allows(t) and FUNCTION_NAME.match(t["name"])]
            new_items.append(server.listed_item())
        for server in self.servers:
            if server.label in listed:
                server.tools = [
                    {"name": t["name"], "description": t.get("description"),
                     "inputSchema": t.get("input_schema"), "annotations": t.get("annotations")}
                    for t in listed[server.label]["tools"]
                    if server.allows(t) and FUNCTION_NAME.match(t["name"])
                ]  # fmt: skip
        self._check_names(functions)
        return new_items

    def _check_names(self, functions: list[FunctionTool]) -> None:
        seen = {f.name: "a function tool" for f in functions}
        for server in self.servers:
            for tool in server.tools:
                if tool["name"] in seen:
                    raise bad_request(
                        f"The MCP server '{server.label}' lists a tool '{tool['name']}' that"
                        f" {seen[tool['name']]} of this request also names: narrow it with"
                        f" allowed_tools, field: 'tools.{server.index}.allowed_tools'",
                        f"tools.{server.index}.allowed_tools",
                    )
                seen[tool["name"]] = f"the MCP server '{server.label}'"
        if len(seen) > MAX_TOOLS:
            raise bad_request(
                f"The request's tools come to {len(seen)} with the MCP servers' tools, more than"
                f" {MAX_TOOLS}: narrow them with allowed_tools, field: 'tools'",
                "tools",
            )

    def functions(self) -> list[dict[str, Any]]:
        """The servers' tools as chat's function tools."""
        return [
            {"type": "function", "function": {
                "name": t["name"],
                "description": t.get("description") or "",
                "parameters": t.get("inputSchema") or {"type": "object", "properties": {}},
            }}
            for s in self.servers for t in s.tools
        ]  # fmt: skip

    def server_of(self, name: str | None) -> McpServer | None:
        """The server whose tool `name` is (None: a function tool's call, for the client)."""
        return next((s for s in self.servers for t in s.tools if t["name"] == name), None)

    def server_labelled(self, label: str) -> McpServer | None:
        return next((s for s in self.servers if s.label == label), None)

    # -- calls -------------------------------------------------------------------------------

    async def run(self, item: dict[str, Any]) -> None:
        """Run an `mcp_call` item's call; its `output` or `error`, and `status`, are set."""
        server = self.server_labelled(item["server_label"])
        assert server is not None
        try:
            arguments = json.loads(item["arguments"] or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            error: dict[str, Any] = {
                "type": "mcp_protocol_error",
                "code": -32602,
                "message": "The arguments the model wrote are not a JSON object",
            }
            item.update(error=error, status="failed")
            return
        try:
            if server.client is None:  # one session per server for the whole response
                client = self._client(server)
                try:
                    await client.open()
                except McpError:
                    await client.close()
                    raise
                server.client = client
            result = await server.client.call_tool(item["name"], arguments)
        except McpError as exc:
            item.update(error=exc.body(), status="failed")
            return
        if result.get("isError"):
            error = {"type": "mcp_tool_execution_error", "content": result.get("content")}
            item.update(error=error, status="failed")
            return
        item.update(output=result_text(result.get("content", [])), status="completed")

    async def close(self) -> None:
        """End the sessions opened for calls."""
        clients = [s.client for s in self.servers if s.client is not None]
        for server in self.servers:
            server.client = None
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    def _client(self, server: McpServer) -> McpClient:
        return McpClient(
            server.url, server.headers, self.timeout, server.transport, self.hosts.allows
        )
