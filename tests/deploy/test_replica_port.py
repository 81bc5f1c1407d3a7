"""The token path without Ray: a ReplicaServer around a real engine, a RemoteEngine leasing it.
Outputs equal the local engine's; bad input is a ValueError; aborts free the replica's slots; a
connection without the token is closed; a replica that stops, or hangs, ends requests with a
503."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

import pytest

from girandole import SamplingParams
from girandole.api.http.errors import APIError
from girandole.deploy.remote_engine import RemoteEngine
from girandole.deploy.replica_server import ReplicaServer
from girandole.deploy.replica_wire import encode
from girandole.engine.async_engine import AsyncEngine, EngineConfig


@dataclass
class Lease:
    host: str
    port: int
    token: str
    replica_id: str = "r0"
    released: int = 0

    def release(self) -> None:
        self.released += 1


@pytest.fixture(scope="module")
def replica(tiny_llama_dir):
    engine = AsyncEngine(
        EngineConfig(
            model=str(tiny_llama_dir),
            mode="reference",
            device="cpu",
            block_size=4,
            kv_cache_gb=0.01,
        )
    )
    server = ReplicaServer(engine).start()
    yield server
    server.stop()
    engine.shutdown()


def remote_of(server: ReplicaServer, leases: list) -> RemoteEngine:
    engine = server.engine

    async def acquire(prompt, request_id, kwargs):
        lease = Lease(server.host, server.port, server.token)
        leases.append(lease)
        return lease

    return RemoteEngine(engine.model_config, engine.tokenizer, engine.max_model_len, acquire)


async def run(engine, prompt, params, rid):
    outs = []
    async for out in engine.generate(prompt, params, rid):
        outs.append(out)
    return outs


def test_outputs_equal_the_local_engine(replica):
    leases: list = []
    remote = remote_of(replica, leases)
    prompt = replica.engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2)

    async def both():
        local = await run(replica.engine, prompt, params, "local-1")
        many = await asyncio.gather(*(run(remote, prompt, params, f"r-{i}") for i in range(4)))
        return local, many, len(remote.connections)  # while the loop (and its socket) lives

    local, many, connections = asyncio.run(both())
    want = [t for o in local for t in o.new_token_ids]
    for outs in many:
        assert [t for o in outs for t in o.new_token_ids] == want
        assert "".join(o.new_text for o in outs) == "".join(o.new_text for o in local)
        assert outs[-1].finished and outs[-1].finish_reason == local[-1].finish_reason
        assert len(outs[-1].logprobs or []) == len(local[-1].logprobs or [])
    assert [lease.released for lease in leases] == [1, 1, 1, 1]
    assert connections == 1  # one connection carries every request
    remote.shutdown()


def test_bad_input_is_a_value_error(replica):
    remote = remote_of(replica, [])
    vocab = replica.engine.model_config.vocab_size

    async def bad():
        with pytest.raises(ValueError, match="out of range"):
            await run(remote, [vocab + 5], SamplingParams(max_tokens=2), "bad-1")

    asyncio.run(bad())
    remote.shutdown()


def test_abort_frees_the_replica(replica):
    leases: list = []
    remote = remote_of(replica, leases)
    prompt = replica.engine.tokenizer.encode("Hello")

    async def cut():
        gen = remote.generate(prompt, SamplingParams(max_tokens=10_000, ignore_eos=True), "long")
        await gen.__anext__()
        await gen.aclose()  # the client went away
        for _ in range(100):
            stats = replica.engine.stats()
            if stats["num_running"] == 0 and stats["num_waiting"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(cut())
    assert leases[0].released == 1
    remote.shutdown()


def test_a_request_whose_caller_stops_reading_is_paused_on_its_replica(replica):
    # before: the replica streamed the whole answer to the ingress, which held it in memory
    # while the client read nothing (engine/backpressure.py)
    remote = remote_of(replica, [])
    engine = replica.engine
    prompt = engine.tokenizer.encode("Once upon a time")
    # a sampling mask: 4 unread outputs pause a request (64 without), so the test is short
    params = SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, logprobs=0, sampling_mask="count"
    )

    async def main():
        want = [t for o in await run(engine, prompt, params, "bp-local") for t in o.new_token_ids]
        gen = remote.generate(prompt, params, "bp-remote")
        got = list((await anext(gen)).new_token_ids)  # then nothing is read for a while
        for _ in range(1000):
            if engine.stats()["num_paused"] == 1:
                break
            await asyncio.sleep(0.02)
        made = engine.engine.seqs["bp-remote"].num_output_tokens
        await asyncio.sleep(0.3)
        assert engine.stats()["num_paused"] == 1
        assert engine.engine.seqs["bp-remote"].num_output_tokens == made < params.max_tokens
        async for out in gen:  # read: it goes on, and ends as the local engine's
            got += out.new_token_ids
        assert got == want and engine.stats()["num_paused"] == 0

    asyncio.run(main())
    remote.shutdown()


def test_a_connection_without_the_token_is_closed(replica):
    with socket.create_connection((replica.host, replica.port), timeout=5) as sock:
        sock.sendall(encode(("hello", "not-the-token")))
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed without a frame


def test_a_replica_stopped_during_a_hello_closes_that_connection(replica, caplog):
    """Before: the hello's wait was cancelled with the connection still open (the ingress saw
    no end of a replica gone, and kept its stats on /health), and asyncio logged the cancel."""
    server = ReplicaServer(replica.engine).start()
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        time.sleep(0.1)  # accepted: its hello awaited
        server.stop()
        sock.settimeout(5)
        assert sock.recv(100) == b""
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_connection_accepted_as_the_replica_stops_is_closed(replica):
    """Before: a connection the replica's loop accepted as it stopped stayed open (its task was
    cancelled before it started; or asyncio made its transport after the server closed, which
    failed with the socket open), so the ingress kept that replica's connection and stats (a
    test failed on a loaded machine, where the stop raced the accept). Each stop here races."""
    from girandole.deploy.replica_wire import hello

    for _ in range(10):
        server = ReplicaServer(replica.engine).start()
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(hello(server.token))
            server.stop()  # at once: the accept may be under way
            sock.settimeout(5)
            deadline = time.monotonic() + 10  # a served connection left open sends stats forever
            try:
                while sock.recv(4096):  # stats frames if it was served, then the end
                    assert time.monotonic() < deadline, "the stopped replica's connection is open"
            except ConnectionResetError:
                pass  # not accepted before its listening socket closed: reset, also an end
        assert not server._thread.is_alive()  # the stop ended the replica's loop


def test_a_connection_that_sends_no_hello_is_closed(replica, monkeypatch, caplog):
    import girandole.deploy.replica_server as replica_server

    monkeypatch.setattr(replica_server, "HELLO_TIMEOUT_S", 0.2)
    with socket.create_connection((replica.host, replica.port), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(100) == b""
    assert "sent no hello" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_hung_replica_ends_its_requests_with_a_503(replica, caplog):
    # before: a replica that went silent (a stopped process, a wedged accelerator) held its
    # streams until Ray's health checks replaced it, about 100 s later
    remote = remote_of(replica, [])
    remote.replica_silence_s = 1.0
    prompt = replica.engine.tokenizer.encode("Hello")

    async def hang():
        gen = remote.generate(prompt, SamplingParams(max_tokens=10_000, ignore_eos=True), "hung")
        await gen.__anext__()
        replica.loop.call_soon_threadsafe(time.sleep, 4)  # the replica's port: silent for 4 s
        start = time.monotonic()
        with pytest.raises(APIError) as info:
            async for _ in gen:
                pass
        return info.value, time.monotonic() - start

    error, waited = asyncio.run(asyncio.wait_for(hang(), 10))
    assert error.status_code == 503, error.message
    assert "replica r0 stopped (it sent nothing for 1 s: hung)" in error.message
    # the ingress's log line (it read "replica r0 it sent nothing ...")
    assert "replica r0 sent nothing for 1 s: hung; closing its connection" in caplog.text
    assert waited < 3.5
    remote.shutdown()
    deadline = time.monotonic() + 15  # awake again, the replica drops the request
    while replica.engine.stats()["num_running"] or replica.engine.stats()["num_waiting"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_stopped_replica_ends_requests_with_a_503(tiny_llama_dir):
    engine = AsyncEngine(
        EngineConfig(model=str(tiny_llama_dir), mode="reference", device="cpu", kv_cache_gb=0.01)
    )
    server = ReplicaServer(engine).start()
    remote = remote_of(server, [])
    prompt = engine.tokenizer.encode("Hello")

    async def cut():
        gen = remote.generate(prompt, SamplingParams(max_tokens=10_000, ignore_eos=True), "x")
        await gen.__anext__()
        for conn in remote.connections.values():  # the replica's side of the socket goes away
            conn._writer.transport.abort()  # type: ignore[union-attr]
        with pytest.raises(APIError) as info:
            async for _ in gen:
                pass
        return info.value

    error = asyncio.run(cut())
    assert error.status_code == 503 and "replica r0 stopped" in error.message
    remote.shutdown()
    server.stop()
    engine.shutdown()


def test_a_replica_that_went_away_leaves_no_connection_or_socket(replica):
    """A replica that stopped (its end of the socket closed) left its connection in the
    ingress's table and its socket open on this side: one file descriptor and one entry for
    good per replica gone (30 replicas: 9 -> 39 fds). Both go as the connection ends.

    The sockets are found by the replicas' ports, not by counting the process's descriptors:
    under xdist other threads of the worker open and close files meanwhile (CI once saw 38 for
    37). And awaited: a closed transport lets its descriptor go on a later turn of the loop."""
    import os

    engine = replica.engine
    prompt = engine.tokenizer.encode("Hello")

    def sockets_to(ports: set[int]) -> list[int]:
        """This process's descriptors that are TCP sockets whose peer is one of `ports`."""
        inodes = set()
        for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
            if not os.path.exists(table):
                continue
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if int(cols[2].rsplit(":", 1)[1], 16) in ports:
                        inodes.add(cols[9])
        ours = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                ours.append(int(fd))
        return ours

    async def cycle() -> None:
        current: dict[str, ReplicaServer] = {}
        ports: set[int] = set()

        async def acquire(prompt, request_id, kwargs):
            server = current["server"]
            return Lease(server.host, server.port, server.token, f"r{server.port}")

        remote = RemoteEngine(engine.model_config, engine.tokenizer, engine.max_model_len, acquire)
        for i in range(5):
            current["server"] = ReplicaServer(engine).start()
            ports.add(current["server"].port)
            await run(remote, prompt, SamplingParams(max_tokens=2), f"gone-{i}")
            assert sockets_to({current["server"].port})  # the check sees a live connection
            await asyncio.to_thread(current["server"].stop)
            for _ in range(500):  # until the ingress has read the end of the stream (10 s)
                if not remote.connections:
                    break
                await asyncio.sleep(0.02)
        assert remote.connections == {}
        for _ in range(500):  # and let the closed transports' descriptors go (10 s)
            if not sockets_to(ports):
                break
            await asyncio.sleep(0.02)
        assert sockets_to(ports) == []

    asyncio.run(cycle())


def test_the_describing_replicas_stats_go_with_it(replica):
    """The stats a replica gave when it described the deployment stand in for it until its
    connection reports. Before: when it went away after that connection opened and before a read
    saw it report, they stayed in stats() (on /health) for good, beside the live stats of the
    replicas that took the requests."""
    engine = replica.engine
    prompt = engine.tokenizer.encode("Hello")
    first = ReplicaServer(engine).start()
    described = {"host": first.host, "port": first.port, "token": first.token,
                 "replica_id": "first", "stats": {**engine.stats(), "num_requests": 0}}  # fmt: skip

    async def acquire(prompt, request_id, kwargs):
        return Lease(replica.host, replica.port, replica.token)  # every request: another one

    remote = RemoteEngine(
        engine.model_config, engine.tokenizer, engine.max_model_len, acquire, described=described
    )

    async def scenario() -> tuple[dict, dict]:
        at_start = remote.replica_stats()  # its description; the watch connects to it
        await remote._watch
        await asyncio.to_thread(first.stop)
        for _ in range(500):  # until the ingress has read the end of the stream (10 s)
            if (first.host, first.port) not in remote.connections:
                break
            await asyncio.sleep(0.02)
        await run(remote, prompt, SamplingParams(max_tokens=2), "elsewhere")
        return at_start, remote.replica_stats()

    try:
        at_start, later = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        remote.shutdown()
    assert set(at_start) == {"first"} and at_start["first"]["num_requests"] == 0
    assert set(later) == {"r0"}, later  # the replica that served; the one gone, gone


class _Session:
    """A Serve `session` call (DeploymentResponseGenerator): yields where to send the request,
    or, like a call routed to a stopped replica, never answers."""

    def __init__(self, where: dict | None) -> None:
        self.where = where
        self.hung = where is None
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self.hung:
            await asyncio.Event().wait()  # a stopped process never answers
        where, self.where = self.where, None
        if where is None:
            raise StopAsyncIteration  # the session ends with the request
        return where

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """The deployment's Serve handle: `handle.options(stream=True).session.remote(key)`."""

    def __init__(self, where: dict | None) -> None:
        self.where = where
        self.sessions: list[_Session] = []
        self.session = self

    def options(self, **_):
        return self

    def remote(self, key) -> _Session:
        self.sessions.append(_Session(dict(self.where) if self.where else None))
        return self.sessions[-1]


def test_a_replica_that_accepts_nothing_answers_new_requests_with_a_503(replica):
    # before: a hung replica (SIGSTOP) held every new request in acquire, awaiting the first
    # item of its `session` call, until Ray gave up on it (~100 s), forever if no replacement
    # started; now the wait is bounded (the server's --queue-timeout) and the call cancelled
    from girandole.deploy.backend import ReplicaStats
    from girandole.deploy.ray_backend import ScalingPolicy, _App, acquirer

    name = "accounts/acme/deployments/hung"
    engine = replica.engine
    prompt = engine.tokenizer.encode("Hello")
    params = SamplingParams(temperature=0, max_tokens=3)

    def remote_over(handle: _Handle) -> RemoteEngine:
        app = _App(None, ScalingPolicy(), 1, handle=handle, stats=ReplicaStats(ready=1))
        acquire = acquirer(name, app, timeout=0.5)
        return RemoteEngine(
            engine.model_config, engine.tokenizer, engine.max_model_len, acquire, name=name
        )

    hung = _Handle(None)
    remote = remote_over(hung)

    async def new_requests():
        start = time.monotonic()
        with pytest.raises(APIError) as info:
            await run(remote, prompt, params, "new-1")
        waited = time.monotonic() - start
        left = asyncio.create_task(run(remote, prompt, params, "new-2"))  # its client leaves
        await asyncio.sleep(0.1)
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        return info.value, waited

    error, waited = asyncio.run(asyncio.wait_for(new_requests(), 10))
    assert error.status_code == 503 and error.code == "UNAVAILABLE", error.message
    assert f"no replica of deployment {name} accepted the request within 0.5 s" in error.message
    assert "(1 ready, 0 starting)" in error.message
    assert 0.5 <= waited < 3
    assert [s.cancelled for s in hung.sessions] == [True, True]  # neither waits in Ray's queue
    remote.shutdown()

    # a replica that answers: the same acquire serves the request, the session drains
    serving = _Handle(
        {"host": replica.host, "port": replica.port, "token": replica.token, "replica_id": "r0"}
    )
    remote = remote_over(serving)

    async def served():
        outs = await run(remote, prompt, params, "ok-1")
        await asyncio.sleep(0.1)  # the lease's release drains the session
        return outs

    outs = asyncio.run(asyncio.wait_for(served(), 30))
    assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 3
    assert [s.cancelled for s in serving.sessions] == [False]
    remote.shutdown()
