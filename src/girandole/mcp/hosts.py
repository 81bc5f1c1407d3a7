"""Which hosts the MCP client may reach for a request (`--mcp-allowed-hosts`).

Patterns are fnmatch patterns of `host` or `host:port` (`*.example.com`, `10.0.0.5:9000`). The
bare `*` allows public hosts only: a host that is, or resolves to, a loopback, private,
link-local or otherwise non-global address (the cloud metadata service, the server's own
admin ports, the office network) is reached only when a pattern other than `*` names it. So a
client cannot make the server probe the network it sits in unless its operator said so.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from dataclasses import dataclass

ANY = "*"


def _is_public(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_global
    except ValueError:  # a name, not an address
        return address.rstrip(".").lower() not in ("localhost", "localhost.localdomain")


@dataclass(frozen=True)
class HostPolicy:
    patterns: tuple[str, ...]

    def _named(self, host: str, port: int | None) -> bool:
        """Whether a pattern other than `*` names the host (or host:port)."""
        names = [host] if port is None else [host, f"{host}:{port}"]
        return any(fnmatch.fnmatch(n, p.lower()) for p in self.patterns if p != ANY for n in names)

    def allows_name(self, host: str, port: int | None) -> bool:
        """The check without DNS: named by a pattern, or public under `*` as far as the name
        itself tells (an address literal or `localhost`)."""
        host = host.lower().strip("[]")
        return self._named(host, port) or (ANY in self.patterns and _is_public(host))

    async def allows(self, host: str, port: int | None) -> bool:
        """The check on connecting: under `*` alone, every address the name resolves to must
        be public. A name that does not resolve fails when the connection is made."""
        host = host.lower().strip("[]")
        if self._named(host, port):
            return True
        if not self.allows_name(host, port):
            return False
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port or 443, type=socket.SOCK_STREAM
            )
        except OSError:
            return True
        return all(_is_public(str(info[4][0])) for info in infos)
