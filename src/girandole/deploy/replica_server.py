"""ReplicaServer: a replica's own port, where the ingress sends engine requests and reads their
outputs straight from the engine, with no Ray hop per token (docs/deployments.md measures why).

It runs an event loop on a thread of its own beside the engine's, so Ray's replica loop is never
on the token path. Each connection multiplexes many requests (replica_wire.py); outputs of one
engine step leave in one frame. A connection that closes aborts its requests. The ingress
may ask it to stop reading a request's outputs ("pause": its client does not read them) and to
go on ("resume"); the engine pauses a request whose outputs are not read
(engine/backpressure.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

from girandole.deploy.replica_adapters import ReplicaAdapters
from girandole.deploy.replica_wire import (
    AdapterLoaded,
    RemoteError,
    encode,
    read_frame,
    read_hello,
)

logger = logging.getLogger("girandole.deploy")

# Called on the server's loop when a request ends (finished, aborted or its connection lost).
RequestEnded = Callable[[str], None]
STATS_PERIOD_S = 1.0
HELLO_TIMEOUT_S = 10.0  # a connection that sends no hello in this long is closed
# A stop cancels the loop's tasks in rounds of at most this long, this many times
SHUTDOWN_ROUNDS = 3
SHUTDOWN_ROUND_S = 2.0


def remote_error(exc: BaseException) -> RemoteError:
    if isinstance(exc, ValueError):
        return RemoteError("value", str(exc))
    if type(exc).__name__ in ("EngineDeadError", "EngineStoppedError"):
        return RemoteError("dead", str(exc))
    return RemoteError("internal", f"{type(exc).__name__}: {exc}")


class _Connection:
    def __init__(self, server: ReplicaServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self.tasks: dict[str, asyncio.Task] = {}
        self.flowing: dict[str, asyncio.Event] = {}  # cleared while the ingress paused a request
        self.pending: list[tuple[str, Any]] = []
        self.flush_scheduled = False

    def send(self, request_id: str, item: Any) -> None:
        """Queue an output; everything queued in this loop iteration leaves in one frame."""
        self.pending.append((request_id, item))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.pending and not self.writer.is_closing():
            self.writer.write(encode(("out", self.pending)))
        self.pending = []

    async def run_request(
        self, request_id: str, prompt: list[int], params: Any, kwargs: dict
    ) -> None:
        try:
            path = kwargs.pop("adapter_path", None)
            if path is not None:  # an adapter of the deployment, read here on first use
                await self.server.adapters.ensure(kwargs["adapter"], path)
            flowing = self.flowing[request_id] = asyncio.Event()
            flowing.set()
            async for out in self.server.engine.generate(prompt, params, request_id, **kwargs):
                self.server.num_generated_tokens += len(out.new_token_ids)
                self.send(request_id, out)
                await flowing.wait()
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - the ingress reports it to the client
            self.send(request_id, remote_error(exc))
        finally:
            self.tasks.pop(request_id, None)
            self.flowing.pop(request_id, None)
            self.server.request_ended(request_id)

    def set_flowing(self, request_id: str, flowing: bool) -> None:
        event = self.flowing.get(request_id)
        if event is None:
            return
        if flowing:
            event.set()
        else:
            event.clear()

    async def load_adapter(self, request_id: str, name: str, path: str) -> None:
        """The ingress loads an adapter onto the deployment: this replica reads and checks it."""
        try:
            await self.server.adapters.ensure(name, path)
            self.send(request_id, AdapterLoaded(name))
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - a 400 (does not fit) or 503 at the ingress
            self.send(request_id, remote_error(exc))
        finally:
            self.tasks.pop(request_id, None)
            self.server.request_ended(request_id)

    def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()  # the engine aborts a request whose stream is closed


class ReplicaServer:
    def __init__(self, engine: Any, host: str = "127.0.0.1") -> None:
        self.engine = engine
        self.adapters = ReplicaAdapters(engine)
        self.host = host
        self.port = 0
        self.token = secrets.token_hex(16)
        self.on_request_ended: RequestEnded | None = None
        self.num_connections = 0
        self.active: set[str] = set()  # request ids running on the port
        # totals since start, for the rates the autoscaler reads
        self.num_requests = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        # every accepted connection's writer until its socket is closed: a stop closes them all,
        # also those whose _serve task had not started (a task cancelled before its first step
        # never runs its `finally`)
        self._writers: set[asyncio.StreamWriter] = set()
        self._connections: set[asyncio.Task] = set()  # the loop keeps only weak references
        self._stopping = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="girandole-replica", daemon=True)

    def start(self, timeout: float = 30.0) -> ReplicaServer:
        self._thread.start()
        if not self._ready.wait(timeout) or self._server is None:
            raise RuntimeError("the replica's port did not open")
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException:
            self._ready.set()  # start() reports that the port did not open
            raise
        # ready once the loop runs: before, a stop() called between ready and run_forever found
        # the loop not running and did nothing (the replica went on serving)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        # stopped: end the connections' tasks on this loop before closing it, and any a task
        # started while it ended (a few rounds: a task that outlives them is left to the loop)
        for _ in range(SHUTDOWN_ROUNDS):
            if not (tasks := asyncio.all_tasks(self.loop)):
                break
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.wait(tasks, timeout=SHUTDOWN_ROUND_S))
        for writer in list(self._writers):  # accepted just before the stop: never served
            writer.close()
        self.loop.run_until_complete(asyncio.sleep(0))  # the transports' close runs on the loop
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def is_active(self, request_id: str) -> bool:
        return request_id in self.active

    def request_ended(self, request_id: str) -> None:
        self.active.discard(request_id)
        if self.on_request_ended is not None:
            self.on_request_ended(request_id)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection accepted (called on the loop, at once): its writer is known from here,
        so a stop closes it even before its task runs. Before: a connection accepted as the
        replica stopped (its task cancelled before it started) stayed open, and the ingress
        kept that replica's connection and stats."""
        if self._stopping:
            writer.close()
            return
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                greeted = await asyncio.wait_for(read_hello(reader, self.token), HELLO_TIMEOUT_S)
            except (ConnectionError, asyncio.IncompleteReadError):
                return  # the peer went before its hello
            except TimeoutError:
                logger.warning("a connection to the replica's port sent no hello: closed")
                return
            if not greeted:
                logger.warning("a connection to the replica's port without its token: closed")
                return
            if self._stopping:
                # Python 3.11's wait_for returns a result that came with the stop's cancel (the
                # cancel lost): the connection then went on being served (its stats reporter a
                # task the stop never saw), and the stop never ended
                return
            await self._serve_greeted(reader, writer)
        except asyncio.CancelledError:
            pass  # the replica stops
        finally:
            # Before: a replica stopped while a connection waited for its hello left that
            # socket open (the ingress saw no end of it, and kept the replica's stats).
            writer.close()
            self._writers.discard(writer)

    async def _serve_greeted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if writer.is_closing():
            return
        conn = _Connection(self, writer)
        self.num_connections += 1
        reporter = asyncio.create_task(self._report_stats(writer))
        try:
            while True:
                message = await read_frame(reader)
                if message[0] == "add":
                    _, request_id, prompt, params, kwargs = message
                    if request_id in conn.tasks:
                        conn.send(request_id, RemoteError("value", f"duplicate id {request_id}"))
                        continue
                    self.active.add(request_id)
                    self.num_requests += 1
                    self.num_prompt_tokens += len(prompt)
                    conn.tasks[request_id] = asyncio.create_task(
                        conn.run_request(request_id, prompt, params, kwargs)
                    )
                elif message[0] == "abort":
                    task = conn.tasks.get(message[1])
                    if task is not None:
                        task.cancel()
                elif message[0] in ("pause", "resume"):
                    conn.set_flowing(message[1], message[0] == "resume")
                elif message[0] == "lora":
                    _, request_id, name, path = message
                    self.active.add(request_id)
                    conn.tasks[request_id] = asyncio.create_task(
                        conn.load_adapter(request_id, name, path)
                    )
                elif message[0] == "unload":
                    self.adapters.unload(message[1])
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the peer went away, or the replica stops
        except Exception:  # noqa: BLE001 - a broken peer must not take the replica down
            logger.exception("the replica's connection failed")
        finally:
            self.num_connections -= 1
            reporter.cancel()
            conn.close()

    async def _report_stats(self, writer: asyncio.StreamWriter) -> None:
        """The engine's stats every second, and the requests this replica took since it started:
        the ingress's gauges of this replica (and how the load spread over the replicas)."""
        while not writer.is_closing():
            stats = {**self.engine.stats(), "num_requests": self.num_requests}
            writer.write(encode(("stats", stats)))
            await asyncio.sleep(STATS_PERIOD_S)

    def stop(self) -> None:
        loop = self.loop
        if loop is None or not loop.is_running():
            return

        async def close() -> None:
            self._stopping = True  # a connection accepted from here is closed at once
            if self._server is not None:
                # No new accepts, then let one accepted already reach _accept before the server
                # closes: asyncio makes its transport a step later (a task of its own), and one
                # made after Server.close() fails (the server's assert) with its socket open.
                for sock in self._server.sockets:
                    loop.remove_reader(sock.fileno())
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                self._server.close()
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        self._thread.join(5)
