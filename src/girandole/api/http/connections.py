"""Connection guard: idle sockets cannot exhaust the server.

uvicorn keeps a connection that never sends a request open for ever, and accepts connections
until the process runs out of file handles: then every client, /health included, is locked out.
The guard, a subclass of uvicorn's httptools protocol:

- closes a connection that has not sent a complete request (head and body) within
  `request_read_timeout` seconds of connecting (or of its previous response: uvicorn's own
  keep-alive timeout covers the idle time between requests);
- caps the connections held at once at `max_connections`: above it, the connection idle the
  longest (connected, no request in progress) is closed to make room, so a new client, which
  sends its request at once, is always served; only when every held connection is busy with a
  request is the newcomer closed;
- `raise_open_file_limit` lifts the soft open-file limit to the hard one at start-up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("girandole.api")


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections(open_file_limit: int) -> int:
    """Leave room under the file limit for the model, the database, logs and the cap's slack."""
    return max(64, min(16_384, open_file_limit - 512))


class ConnectionGuard:
    """The connections of one server: idle ones in the order they became idle."""

    def __init__(self, max_connections: int, request_read_timeout: float) -> None:
        self.max_connections = max_connections
        self.request_read_timeout = request_read_timeout
        self.idle: collections.OrderedDict[GuardedProtocol, None] = collections.OrderedDict()
        self.num_held = 0
        self.num_evicted = 0
        self.num_refused = 0
        self.num_timed_out = 0

    def admit(self, conn: GuardedProtocol) -> bool:
        """A new connection: make room for it if the cap is reached. False: close it."""
        self.num_held += 1
        while self.num_held > self.max_connections:
            if not self.idle:
                self.num_refused += 1
                return False
            oldest, _ = self.idle.popitem(last=False)
            self.num_evicted += 1
            oldest.close_quietly()
        self.idle[conn] = None
        return True

    def protocol_class(self) -> type[GuardedProtocol]:
        """The protocol class for uvicorn.Config(http=...), bound to this guard."""
        return type("GuardedHttpToolsProtocol", (GuardedProtocol,), {"guard": self})


class GuardedProtocol(HttpToolsProtocol):
    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._counted = True
        if not self.guard.admit(self):
            self.close_quietly()
            return
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_timer()
        self.guard.idle.pop(self, None)
        if getattr(self, "_counted", False):
            self._counted = False
            self.guard.num_held -= 1
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.guard.idle.pop(self, None)  # busy: never evicted while a request is in progress
        if self._read_timer is None:
            self._arm_read_timer()  # the next pipelined or keep-alive request

    def on_message_complete(self) -> None:
        self._disarm_read_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.guard.idle[self] = None

    def close_quietly(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _arm_read_timer(self) -> None:
        self._read_timer = self.loop.call_later(
            self.guard.request_read_timeout, self._read_timed_out
        )

    def _disarm_read_timer(self) -> None:
        timer = getattr(self, "_read_timer", None)
        if timer is not None:
            timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        self.guard.num_timed_out += 1
        # A request whose body stopped arriving: its handler sees a disconnect (499).
        self.close_quietly()
