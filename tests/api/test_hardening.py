"""Hostile clients: idle sockets, slow heads and bodies, oversized work per request. Each test
failed before the fix it covers. The server: a tiny model that stops at once, keys required, a
small connection cap and a short read timeout."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from conftest import start_server, stop_server, write_eos_model

KEY = "hardening-key"
MODEL = "accounts/testing/models/tiny-eos"
MAX_CONNECTIONS = 40
READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guarded")
    model = write_eos_model(tmp / "eos-model")
    srv = start_server(
        tmp, "--model", str(model), "--model-id", "tiny-eos", "--account", "testing",
        "--kv-cache-gb", "0.01", "--max-model-len", "64", "--api-key", KEY,
        "--max-connections", str(MAX_CONNECTIONS),
        "--request-read-timeout", str(READ_TIMEOUT),
        api_key=KEY,
    )  # fmt: skip
    yield srv
    stop_server(srv)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


def _closed_by_server(s: socket.socket, wait: float) -> bool:
    """True when the server closed the socket (EOF or reset) within `wait` seconds."""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _complete(server) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
        headers=server.headers,
        timeout=30,
    )


def test_idle_sockets_beyond_the_cap_are_closed_and_clients_still_served(guarded):
    idle = [_connect(guarded.port) for _ in range(3 * MAX_CONNECTIONS)]
    try:
        # a new client is served while the idle ones hold more than the cap
        assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
        assert _complete(guarded).status_code == 200
        closed = sum(_closed_by_server(s, 0.05) for s in idle)
        assert closed >= 2 * MAX_CONNECTIONS - 2, closed  # the oldest idle ones made room
    finally:
        for s in idle:
            s.close()


def test_a_socket_that_sends_nothing_is_closed_after_the_read_timeout(guarded):
    with _connect(guarded.port) as s:
        assert _closed_by_server(s, READ_TIMEOUT + 3)


def test_a_slow_request_head_is_closed_after_the_read_timeout(guarded):
    with _connect(guarded.port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(READ_TIMEOUT / 2)
        s.sendall(b"X-Slow: 1\r\n")  # still dribbling: the deadline is the whole request's
        assert _closed_by_server(s, READ_TIMEOUT + 3)


def test_keep_alive_connections_stay_usable(guarded):
    with httpx.Client(base_url=guarded.url, headers=guarded.headers, timeout=30) as client:
        for _ in range(3):
            r = client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}
            )
            assert r.status_code == 200


def test_open_file_limit_is_raised_to_the_hard_limit(guarded):
    limits = open(f"/proc/{guarded.process.pid}/limits").read()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line
