"""GirandoleReplica: one replica of a deployment on Ray Serve, a girandole engine with its own
port (ReplicaServer).

Ray Serve places it, health-checks it, scales it and routes to it; tokens never cross Ray. A
request's `session` is the routing decision: Ray's request router picks this replica, the call
yields the port's address (and its secret) to the ingress, and stays open until the request ends
on the port, so Ray's count of ongoing requests (what its autoscaler and routers read) is the
real one. Two Ray messages per request, none per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from ray import serve

from girandole.deploy.ray_router import RouteKey
from girandole.engine.protocol import stall_error

logger = logging.getLogger("girandole.deploy")

# A session whose request never reached the port (the ingress went away) ends after this.
SESSION_START_TIMEOUT_S = 60.0
DEFAULT_STALL_S = 60.0  # the server's --engine-stall-seconds, unless the config says
# A `keep` call ends by itself after this; the ingress renews it sooner (KEEP_RENEW_S)
KEEP_S = 60.0


def _renice_threads(nice: int) -> None:
    """Every thread of this process at `nice` (on Linux a nice value is per thread)."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


class GirandoleReplica:
    def __init__(self, config: dict[str, Any]) -> None:
        import ray
        import torch

        from girandole.deploy.replica_server import ReplicaServer

        # Ray starts workers niced (worker_niceness) to keep its own daemons responsive; a
        # replica is the work itself, so all its threads run at the normal priority where they
        # may: the engine (started below, it inherits this thread's) and Ray's own threads of
        # this process, whose `session` calls are on every request's path (niced, they waited
        # for the engine's steps under load: TTFT p50 at 16 clients was 1.3x the embedded one).
        _renice_threads(0)
        threads = config.get("threads") or len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, int(threads)))
        spec = config["spec"]  # deploy.backend.ReplicaSpec
        self.stall_s = float(config.get("stall_s", DEFAULT_STALL_S))
        self.engine = spec.start_engine()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.server = ReplicaServer(self.engine, host=ray.util.get_node_ip_address()).start()
        self.server.on_request_ended = self._request_ended
        self._sessions: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
        self._last_rates: tuple[float, tuple[int, int, int]] = (time.monotonic(), (0, 0, 0))
        logger.info(
            "replica %s of %s serving on %s:%d",
            self.replica_id,
            spec.deployment,
            self.server.host,
            self.server.port,
        )

    def _request_ended(self, request_id: str) -> None:
        entry = self._sessions.get(request_id)
        if entry is not None:
            loop, event = entry
            loop.call_soon_threadsafe(event.set)

    def address(self) -> dict[str, Any]:
        return {
            "host": self.server.host,
            "port": self.server.port,
            "token": self.server.token,
            "replica_id": self.replica_id,
        }

    async def session(self, key: RouteKey):
        """Yield where to send the request, then hold until it ends on the port."""
        event = asyncio.Event()
        self._sessions[key.request_id] = (asyncio.get_running_loop(), event)
        try:
            yield self.address()
            while not event.is_set():
                try:
                    await asyncio.wait_for(event.wait(), SESSION_START_TIMEOUT_S)
                except TimeoutError:
                    if not self.server.is_active(key.request_id):
                        return
        finally:
            self._sessions.pop(key.request_id, None)

    async def describe(self) -> dict[str, Any]:
        """What the ingress needs besides the tokenizer: the model's config and context, and
        the engine's stats now (what the ingress shows until its connection reports)."""
        return {
            "model_config": self.engine.model_config,
            "max_model_len": self.engine.max_model_len,
            "stats": {**self.engine.stats(), "num_requests": self.server.num_requests},
            **self.address(),
        }

    async def keep(self) -> None:
        """Open while requests for the deployment wait in the ingress's admission queue
        (RayBackend.keep_up): an ongoing request to Serve's autoscaler, which then does not
        scale the deployment to zero under them. It ends by itself, so that an ingress gone
        without cancelling it keeps nothing up for long."""
        await asyncio.sleep(KEEP_S)

    async def ping(self) -> bool:
        """A request that only wakes the deployment (Ray scales it from zero to serve it)."""
        return True

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Rates since the last report, per second: what loadTargets' rate targets compare with
        (ray_policy.py)."""
        now = time.monotonic()
        server = self.server
        totals = (server.num_requests, server.num_generated_tokens, server.num_prompt_tokens)
        last_time, last = self._last_rates
        self._last_rates = (now, totals)
        dt = max(now - last_time, 1e-3)
        names = ("requests_per_second", "tokens_generated_per_second", "prompt_tokens_per_second")
        return {name: (total - before) / dt for name, total, before in zip(names, totals, last)}

    def record_routing_stats(self) -> dict[str, Any]:
        """The engine's load, and the LoRA adapters this replica holds (the router prefers a
        replica that holds a request's adapter)."""
        return {**self.engine.stats(), "adapters": self.engine.lora_names()}

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose check fails: its engine loop died, or is stuck
        (work waiting and no step finished for the server's --engine-stall-seconds)."""
        error = stall_error(self.engine, self.stall_s)
        if error is not None:
            raise RuntimeError(error)

    def __del__(self) -> None:
        server, engine = getattr(self, "server", None), getattr(self, "engine", None)
        if server is not None:
            server.stop()
        if engine is not None:
            engine.shutdown()
