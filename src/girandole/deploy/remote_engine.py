"""RemoteEngine: the EngineClient of a deployment whose replicas run elsewhere (Ray Serve).

The API server (the ingress) keeps everything it does for a local engine: keys, admission,
tokenizing, usage, metrics. Per engine request, `acquire` picks a replica (Ray Serve's request
router: prefix-aware) and leases it; the request then goes to the replica's own port over a
connection shared by all requests to that replica (ReplicaConnection), and its outputs come
back the same way. A replica that dies ends its requests with a 503 naming it.

LoRA adapters loaded onto the deployment are kept here (name -> folder); a request for one
carries the folder, and a replica that does not hold it yet reads it first
(replica_adapters.py). The router prefers replicas that hold it (ray_router.py).

A request whose caller leaves `unread_limit` outputs unread (engine/backpressure.py) is paused
on its replica ("pause": the replica stops reading it, so its engine stops stepping it) until
they are read down to half ("resume").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from girandole.deploy.replica_wire import RemoteError, encode, hello, read_frame
from girandole.engine.backpressure import MAX_UNREAD_OUTPUTS, unread_limit
from girandole.engine.outputs import RequestOutput
from girandole.engine.protocol import AdapterNotLoadedError
from girandole.sampling.compile_pool import CompilePool
from girandole.sampling.grammar import GrammarCache, GrammarSpec
from girandole.sampling.grammar_limits import check_grammar_size
from girandole.sampling.params import SamplingParams

logger = logging.getLogger("girandole.deploy")
_ids = itertools.count()

# A replica sends its stats every second (replica_server.STATS_PERIOD_S) on each connection: one
# silent this long is hung (a stopped process, a wedged accelerator). Ray's health checks take
# about 100 s (3 failed checks of 30 s, then the graceful stop) to replace it, and its streams
# stalled all that time; the ingress ends them with a 503 instead.
REPLICA_SILENCE_S = 15.0


class ReplicaLost(RuntimeError):
    """The replica serving a request stopped (or could not be reached) mid-request."""


def replica_lost_error(message: str) -> Exception:
    from girandole.api.http.errors import APIError

    return APIError(503, message, type="service_unavailable", code="UNAVAILABLE")


def stopped_error() -> Exception:
    """A request cut off because this server stopped the deployment's engine (a delete, a scale
    to zero, a restart): said as the embedded backend says it, not as a lost replica."""
    from girandole.api.http.errors import APIError
    from girandole.engine.async_engine import STOPPED_MESSAGE

    return APIError(503, STOPPED_MESSAGE, type="service_unavailable", code="UNAVAILABLE")


class ReplicaLease(Protocol):
    """A replica chosen for one request, held until `release` (Ray counts it as ongoing)."""

    host: str
    port: int
    token: str
    replica_id: str

    def release(self) -> None: ...


Acquire = Callable[[list[int], str, dict[str, Any]], Awaitable[ReplicaLease]]


@dataclass
class ReplicaAddress:
    """Where a replica listens, for a connection that no request leased (its stats alone)."""

    host: str
    port: int
    token: str
    replica_id: str

    def release(self) -> None:
        return None


@dataclass
class _Stream:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    limit: int = MAX_UNREAD_OUTPUTS  # unread items that pause the request on its replica
    received: int = 0
    read: int = 0
    paused: bool = False


@dataclass
class _Call:
    """One request on a leased replica."""

    request_id: str
    lease: ReplicaLease
    conn: ReplicaConnection | None = None
    stream: _Stream = field(default_factory=_Stream)
    finished: bool = False


class ReplicaConnection:
    """One TCP connection to a replica's port, shared by every request sent to it."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        replica_id: str,
        silence_s: float = REPLICA_SILENCE_S,
        on_closed: Callable[[ReplicaConnection], None] | None = None,
    ) -> None:
        self.host, self.port, self.token, self.replica_id = host, port, token, replica_id
        self.silence_s = silence_s
        self.on_closed = on_closed  # told once the connection is gone
        self.streams: dict[str, _Stream] = {}
        self.stats: dict[str, float] = {}
        self.closed = False
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None

    async def open(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(hello(self.token))
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error = "the connection closed"
        try:
            while True:
                try:
                    message = await asyncio.wait_for(read_frame(reader), self.silence_s)
                except TimeoutError:
                    error = f"it sent nothing for {self.silence_s:g} s: hung"
                    logger.warning(
                        "replica %s sent nothing for %g s: hung; closing its connection",
                        self.replica_id,
                        self.silence_s,
                    )
                    if self._writer is not None:
                        self._writer.close()
                    break
                if message[0] == "out":
                    for request_id, item in message[1]:
                        stream = self.streams.get(request_id)
                        if stream is not None:
                            stream.queue.put_nowait(item)
                            stream.received += 1
                            if not stream.paused and stream.received - stream.read >= stream.limit:
                                stream.paused = True
                                self._tell(("pause", request_id))
                elif message[0] == "stats":
                    self.stats = message[1]
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except asyncio.CancelledError:
            error = "the ingress closed the connection"
        finally:
            self.closed = True
            # the replica's end closed (its process stopped): the socket stayed open on this
            # side, one file descriptor for good per replica that ever went away
            if self._writer is not None:
                self._writer.close()
            lost = ReplicaLost(f"replica {self.replica_id} stopped ({error})")
            for stream in self.streams.values():
                stream.queue.put_nowait(lost)
            if self.on_closed is not None:
                self.on_closed(self)

    def send(self, message: Any) -> None:
        if self.closed or self._writer is None or self._writer.is_closing():
            raise ReplicaLost(f"replica {self.replica_id} is not reachable")
        self._writer.write(encode(message))

    def _tell(self, message: Any) -> None:
        """Send, where a lost replica is reported by its streams (from `_read`) anyway."""
        with contextlib.suppress(ReplicaLost):
            self.send(message)

    def read_one(self, request_id: str, stream: _Stream) -> None:
        """The caller took one of the request's items: resume it on its replica once half of
        what paused it is read."""
        stream.read += 1
        if stream.paused and stream.received - stream.read <= stream.limit // 2:
            stream.paused = False
            self._tell(("resume", request_id))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()


class RemoteEngine:
    """EngineClient over leased replicas (see the module docstring)."""

    def __init__(
        self,
        model_config: Any,
        tokenizer: Any,
        max_model_len: int,
        acquire: Acquire,
        grammar_compile_timeout: float = 10.0,
        name: str = "",
        described: dict[str, Any] | None = None,
    ) -> None:
        self._model_config = model_config
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self.acquire = acquire
        self.name = name
        self.connections: dict[tuple[str, int], ReplicaConnection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future] = {}
        self._where: dict[str, ReplicaConnection] = {}  # request id -> its replica
        self.adapters: dict[str, str] = {}  # the deployment's LoRA adapters: name -> folder
        self.replica_silence_s = REPLICA_SILENCE_S  # then a replica's connection is hung
        self.grammars = GrammarCache(tokenizer, model_config.vocab_size)
        self.grammar_pool = CompilePool(num_threads=1, timeout=grammar_compile_timeout)
        self.stopped = False  # shut down: the deployment was deleted, scaled to zero or restarted
        # The replica that described the deployment (its address, and its stats then): stats()
        # said {} until a request opened a connection (a /health of a --ray server showed no
        # engine until its model had served); now its stats, and a connection to it for more
        # (its /metrics series too).
        self._described = described
        self._watch: asyncio.Task | None = None

    @property
    def model_config(self) -> Any:
        return self._model_config

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def _forget(self, conn: ReplicaConnection) -> None:
        """A replica's connection closed: out of the table (replicas come and go for weeks;
        each one gone stayed in it)."""
        key = (conn.host, conn.port)
        if self.connections.get(key) is conn:
            del self.connections[key]

    async def _connection(self, lease: ReplicaLease) -> ReplicaConnection:
        key = (lease.host, lease.port)
        conn = self.connections.get(key)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._connecting[key] = future
        try:
            conn = ReplicaConnection(
                lease.host, lease.port, lease.token, lease.replica_id, self.replica_silence_s,
                on_closed=self._forget,
            )  # fmt: skip
            await conn.open()
            self.connections[key] = conn
            future.set_result(conn)
            return conn
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self._connecting.pop(key, None)

    @contextlib.asynccontextmanager
    async def _on_replica(
        self, prompt: list[int], request_id: str, kwargs: dict[str, Any]
    ) -> AsyncIterator[_Call]:
        """Lease a replica for one request and open its stream there; on exit the stream
        closes (an abort when it did not finish) and the lease is released."""
        if request_id in self._where:
            raise ValueError(f"request id already in use: {request_id}")
        if self.stopped:
            raise stopped_error()
        try:
            lease = await self.acquire(prompt, request_id, kwargs)
        except ReplicaLost as exc:
            raise (stopped_error() if self.stopped else replica_lost_error(str(exc))) from None
        call = _Call(request_id, lease)
        try:
            try:
                call.conn = await self._connection(lease)
            except OSError as exc:
                raise replica_lost_error(
                    f"replica {lease.replica_id} is not reachable at"
                    f" {lease.host}:{lease.port}: {exc}"
                ) from None
            call.conn.streams[request_id] = call.stream
            self._where[request_id] = call.conn
            yield call
        except ReplicaLost as exc:
            raise (stopped_error() if self.stopped else replica_lost_error(str(exc))) from None
        finally:
            self._where.pop(request_id, None)
            if call.conn is not None:
                call.conn.streams.pop(request_id, None)
                if not call.finished:
                    with contextlib.suppress(ReplicaLost):
                        call.conn.send(("abort", request_id))
            lease.release()

    async def _next(self, call: _Call) -> Any:
        """The request's next item from its replica; errors raised as the API reports them."""
        item = await call.stream.queue.get()
        replica = call.lease.replica_id
        if isinstance(item, ReplicaLost) and self.stopped:
            # before: "replica ... stopped (the ingress closed the connection): ... retry it
            # (another replica serves it)", for a deployment just deleted
            raise stopped_error()
        if isinstance(item, RemoteError):
            if item.kind == "value":
                raise ValueError(item.message)
            raise replica_lost_error(f"the engine of replica {replica} failed: {item.message}")
        if isinstance(item, ReplicaLost):
            raise replica_lost_error(
                f"{item}: the request was cut off; retry it (another replica serves it)"
            )
        return item

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        params.validate()
        adapter = kwargs.get("adapter")
        if adapter is not None:
            path = self.adapters.get(adapter)
            if path is None:
                raise AdapterNotLoadedError(
                    f"LoRA adapter {adapter!r} is not loaded on this deployment"
                )
            kwargs["adapter_path"] = path  # the replica reads it if it does not hold it yet
        request_id = request_id or f"remote-{next(_ids)}"
        prompt = list(prompt_token_ids)
        async with self._on_replica(prompt, request_id, kwargs) as call:
            call.stream.limit = unread_limit(params)
            call.conn.send(("add", request_id, prompt, params, kwargs))
            while not call.finished:
                item = await self._next(call)
                call.conn.read_one(request_id, call.stream)
                call.finished = item.finished
                yield item

    # -- LoRA adapters: the deployment's, read by each replica on first use ------------------

    async def load_lora(self, name: str, path: str) -> None:
        """Add adapter `name` (folder `path`) to the deployment: one replica reads and checks
        it now (ValueError when it does not fit), the others on their first request for it
        (replica_adapters.py says why)."""
        request_id = f"lora-{next(_ids)}"
        async with self._on_replica([], request_id, {"adapter": name}) as call:
            call.conn.send(("lora", request_id, name, path))
            await self._next(call)  # AdapterLoaded
            call.finished = True
        self.adapters[name] = path

    def unload_lora(self, name: str) -> bool:
        """New requests can no longer name `name`; every replica connected (each that may hold
        it: a replica reads an adapter only for a request sent from here) drops it."""
        if self.adapters.pop(name, None) is None:
            return False
        for conn in self.connections.values():
            with contextlib.suppress(ReplicaLost):
                conn.send(("unload", name))
        return True

    def lora_names(self) -> list[str]:
        return sorted(self.adapters)

    def abort(self, request_id: str) -> None:
        conn = self._where.get(request_id)
        if conn is not None:
            with contextlib.suppress(ReplicaLost):
                conn.send(("abort", request_id))

    async def compile_grammar(self, spec: GrammarSpec) -> Any:
        """Compiled here to answer a bad grammar with a 400 before any replica is asked; the
        replica compiles it again (its own cache)."""
        check_grammar_size(spec)
        if (hit := self.grammars.cached(spec)) is not None:  # not queued behind other compiles
            return hit
        return await self.grammar_pool.run(
            lambda: self.grammars.compile(spec), spec.kind.replace("_", " ")
        )

    def replica_stats(self) -> dict[str, dict[str, float]]:
        """The last stats each connected replica reported (replica id -> stats); the replica
        that described the deployment's, as it did, until its connection reports."""
        replicas = {c.replica_id: dict(c.stats) for c in self.connections.values() if not c.closed}
        described = self._described
        if described is not None:
            if replicas.get(described["replica_id"]) or self._watch_ended(described):
                self._described = None  # live numbers from here, or the replica is gone
            else:
                self._watch_described(described)
                replicas[described["replica_id"]] = dict(described.get("stats") or {})
        return replicas

    def stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for stats in self.replica_stats().values():
            for key, value in stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def _watch_ended(self, described: dict[str, Any]) -> bool:
        """The watch of the describing replica is over and no connection to it is open: it
        failed, timed out, or the replica went away (its connection closed) before a read of
        the stats saw it report. Before, its start-up stats then stayed in stats() for good
        (on /health, beside the live ones of the replicas that took the requests)."""
        watch = self._watch
        if watch is None or not watch.done():
            return False
        conn = self.connections.get((described["host"], described["port"]))
        return conn is None or conn.closed

    def _watch_described(self, described: dict[str, Any]) -> None:
        """Connect to the replica that described the deployment, whose stats then come every
        second (on the event loop, where stats() is read for /health and /metrics)."""
        if self._watch is not None or self.stopped:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # read off the loop: the next read on it connects
            return
        address = ReplicaAddress(
            described["host"], described["port"], described["token"], described["replica_id"]
        )

        async def watch() -> None:
            try:
                # bounded: a connect to a node gone away may hang for minutes (TCP's timeout)
                async with asyncio.timeout(self.replica_silence_s):
                    await asyncio.shield(self._connection(address))
            except Exception:  # noqa: BLE001 - gone already: its description is no news
                self._described = None

        self._watch = loop.create_task(watch())

    def seconds_stalled(self) -> float:
        return 0.0  # each replica's health is Ray Serve's to check (check_health)

    def shutdown(self) -> None:
        self.stopped = True
        self._described = None
        self.grammar_pool.close()
        for conn in list(self.connections.values()):
            with contextlib.suppress(Exception):
                conn.close()
        self.connections.clear()
