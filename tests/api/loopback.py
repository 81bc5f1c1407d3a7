"""Loopback ports for the tests' servers, chosen so that nothing else takes them first.

A port from bind(port 0) is in the kernel's ephemeral range: between the check and the server's
own bind, any client connection in the suite may take it as its source port (CI once lost an MCP
server that way: "address already in use"). So:
- `free_port()` hands out ports below the ephemeral range, for servers in other processes;
- `serve_in_thread()` binds the socket itself and gives it to uvicorn: no gap at all.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import uvicorn

_LOW, _HIGH = 20000, 32768  # below Linux's default ephemeral range (32768-60999)


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _HIGH


def free_port() -> int:
    """A loopback port nothing listens on, outside the range the kernel gives client sockets."""
    high = min(_HIGH, _ephemeral_floor())
    for _ in range(200):
        port = random.randrange(_LOW, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_LOW}-{high}")


def bound_socket() -> socket.socket:
    """A listening-ready loopback socket on a port of the kernel's choosing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def serve_in_thread(app, log_level: str = "warning", timeout: float = 30):
    """`app` on uvicorn in a daemon thread, on a socket bound here. Returns (server, thread, url)
    once it answers; stop it with `server.should_exit = True` and `thread.join()`."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"
