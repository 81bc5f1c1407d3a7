"""Connection guard: idle sockets cannot exhaust the server.

uvicorn keeps a connection that never sends a request open for ever, and accepts connections
until the process runs out of file handles: then every client, /health included, is locked out.
The guard, a subclass of uvicorn's httptools protocol:

- closes a connection that has not sent a complete request (head and body) within
  `request_read_timeout` seconds of connecting (or of its previous response: uvicorn's own
  keep-alive timeout covers the idle time between requests), plus one second for every
  `MIN_BODY_RATE` bytes of body received (Apache mod_reqtimeout's MinRate): an upload that keeps
  flowing (a 500 MB dataset over a 100 Mbit/s link takes 40 s) is never cut at the timeout,
  one that dribbles or stalls still is;
- answers 431 to a request head (request line and headers) above `MAX_HEAD_BYTES`: uvicorn and
  httptools keep a head in memory however long it grows (a client sending tiny headers fast
  made the process grow about 500 MB a second until the read timeout);
- aborts a connection whose client stops reading its response for `response_write_timeout`
  seconds (the socket's buffers full): a stream never read otherwise holds its admission slots
  and its buffered output for as long as the client keeps the socket open; the handler then
  sees a disconnect, which frees them;
- answers a request httptools cannot parse with a Fireworks error body (uvicorn's is text);
- refuses (400) a request with a body that asks to switch protocols (`Connection: Upgrade`,
  as `curl --http2` sends): httptools stops parsing at its head, so the app saw it with an
  empty body (a create with defaults, or a misleading "body is empty"); the server upgrades to
  nothing (`ws="none"`), so one without a body is served as plain HTTP/1.1;
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
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from girandole.api.http.errors import APIError

logger = logging.getLogger("girandole.api")

# A request line and headers above this are refused (nginx's default allows 32 KiB in all)
MAX_HEAD_BYTES = 64 * 1024


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


# A request's read deadline moves on by a second for every this many body bytes received.
MIN_BODY_RATE = 64 * 1024


class ConnectionGuard:
    """The connections of one server: idle ones in the order they became idle."""

    def __init__(
        self,
        max_connections: int,
        request_read_timeout: float,
        response_write_timeout: float = 60.0,
        max_head_bytes: int = MAX_HEAD_BYTES,
    ) -> None:
        self.max_connections = max_connections
        self.request_read_timeout = request_read_timeout
        self.response_write_timeout = response_write_timeout
        self.max_head_bytes = max_head_bytes
        self.idle: collections.OrderedDict[GuardedProtocol, None] = collections.OrderedDict()
        self.num_held = 0
        self.num_evicted = 0
        self.num_refused = 0
        self.num_timed_out = 0
        self.num_write_timed_out = 0
        self.num_heads_too_large = 0

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
        self._write_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # the bytes arriving belong to a request head
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes of the head so far: a blank line may span reads
        self._counted = True
        if not self.guard.admit(self):
            self.close_quietly()
            return
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_timer()
        self._disarm_write_timer()
        self.guard.idle.pop(self, None)
        if getattr(self, "_counted", False):
            self._counted = False
            self.guard.num_held -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            # Count the head's own bytes, before httptools parses them: a head that ends within
            # this read (a whole 100 KB head arrives in one) is held to the limit too, and a
            # body in the same read is not counted. A head ends at its first blank line.
            seen = self._head_tail + data
            ends = [i + len(m) for m in (b"\r\n\r\n", b"\n\n") if (i := seen.find(m)) >= 0]
            self._head_bytes += max(0, min(ends) - len(self._head_tail)) if ends else len(data)
            self._head_tail = seen[-3:]
        too_large = self._in_head and self._head_bytes > self.guard.max_head_bytes
        if not too_large:
            super().data_received(data)
        elif not self.transport.is_closing():
            self.guard.num_heads_too_large += 1
            self._refuse(
                431,
                f"The request line and headers are larger than the server's limit of"
                f" {self.guard.max_head_bytes} bytes",
                "REQUEST_HEADER_FIELDS_TOO_LARGE",
            )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request httptools cannot parse: text there, ours in shape."""
        self._refuse(
            400,
            f"Malformed HTTP request: {msg} The request line or a header (Content-Length,"
            " Transfer-Encoding) could not be parsed",
            "invalid_request_error",
        )

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._head_tail = b""
        if self.parser.should_upgrade() and self._has_body():
            self._upgrade_refused = True  # httptools skips the body: the app never sees it
            self._refuse(
                400,
                "A request with a body cannot ask to upgrade the connection: this server speaks"
                " HTTP/1.1 only; send it without 'Connection: Upgrade'",
                "invalid_request_error",
            )
            return
        super().on_headers_complete()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return True
        return False

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if not getattr(self, "_upgrade_refused", False):
            super().on_body(body)

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's warning names a missing WebSocket library: here no upgrade is supported."""
        logger.debug("ignored a request's Upgrade header")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.guard.idle.pop(self, None)  # busy: never evicted while a request is in progress
        if self._read_timer is None:
            self._arm_read_timer()  # the next pipelined or keep-alive request

    def on_message_complete(self) -> None:
        if getattr(self, "_upgrade_refused", False):
            return
        self._disarm_read_timer()
        self._in_head = True  # what follows is the next (pipelined or kept-alive) request
        self._head_bytes = 0
        self._head_tail = b""
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.guard.idle[self] = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None and self.guard.response_write_timeout > 0:
            self._write_timer = self.loop.call_later(
                self.guard.response_write_timeout, self._write_timed_out
            )

    def resume_writing(self) -> None:
        self._disarm_write_timer()  # the client reads again
        super().resume_writing()

    def _disarm_write_timer(self) -> None:
        self._disarm("_write_timer")

    def _disarm(self, name: str) -> None:
        """Cancel the timer in attribute `name`, if armed (connection_made may not have run)."""
        timer = getattr(self, name, None)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if self.transport.is_closing():
            return
        self.guard.num_write_timed_out += 1
        logger.warning(
            "closing a connection whose client read nothing for %g s",
            self.guard.response_write_timeout,
        )
        # abort, not close: close() would wait for the unread buffer to drain, for ever
        self.transport.abort()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer a request the app never sees (a Fireworks error body), and close."""
        body = APIError(status, message, code=code).response().body
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        logger.warning("refused a request: %s", message)
        self._disarm_read_timer()
        if not self.transport.is_closing():
            self.transport.write(head.encode("ascii") + body)
            self.transport.close()

    def close_quietly(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _arm_read_timer(self) -> None:
        self._read_started = self.loop.time()
        self._body_bytes = 0
        self._read_timer = self.loop.call_later(
            self.guard.request_read_timeout, self._read_timed_out
        )

    def _disarm_read_timer(self) -> None:
        self._disarm("_read_timer")

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        allowed = self.guard.request_read_timeout + self._body_bytes / MIN_BODY_RATE
        left = self._read_started + allowed - self.loop.time()
        if left > 0:  # the body keeps arriving fast enough: its deadline moved on
            self._read_timer = self.loop.call_later(left, self._read_timed_out)
            return
        self.guard.num_timed_out += 1
        # A request whose body stopped arriving: its handler sees a disconnect (499).
        self.close_quietly()
