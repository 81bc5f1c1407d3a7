"""The embedded backend: each deployment's replica is an AsyncEngine of this process.

At most one replica per deployment (more replicas need more processes: the Ray backend).
Several models run side by side while their estimated memory (weights on disk plus the KV cache)
fits a budget; past it, starting a replica is refused with a message saying what holds memory.
Engines load and stop on threads of their own, so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from girandole.deploy.backend import Backend, ReplicaListener, ReplicaSpec, ReplicaStats
from girandole.engine.protocol import stall_error
from girandole.registry.deployments import DeploymentError, Hardware, invalid

logger = logging.getLogger("girandole.deploy")

MEMORY_ENV = "GIRANDOLE_DEPLOYMENT_MEMORY_GB"
_WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth")


def weights_bytes(model: str | None) -> int:
    """The size of a model's weight files; 0 when not on disk yet (a repo id)."""
    if model is None:
        from girandole.model.default import default_model_path

        path = default_model_path()
    else:
        path = Path(model)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    return 0


def replica_bytes(spec: ReplicaSpec) -> int:
    kv = int(spec.kv_cache_gb * (1 << 30))
    draft = spec.options.draft_model  # a draft model has its weights and a KV cache as large
    return weights_bytes(spec.model) + kv + (weights_bytes(draft) + kv if draft else 0)


def default_budget_bytes() -> int:
    """GIRANDOLE_DEPLOYMENT_MEMORY_GB, else half of the GPU's memory or of this machine's RAM."""
    value = os.environ.get(MEMORY_ENV)
    if value:
        return int(float(value) * (1 << 30))
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass
class Replica:
    spec: ReplicaSpec
    reserved_bytes: int
    state: str = "initializing"  # initializing, ready, failed
    engine: Any = None
    error: str | None = None
    last_used: float = field(default_factory=time.time)


class EmbeddedBackend(Backend):
    name = "embedded"

    def __init__(
        self,
        hardware: Hardware,
        budget_bytes: int,
        in_use: Callable[[], int] = lambda: 0,
        listener: ReplicaListener | None = None,
    ) -> None:
        self.hardware = hardware
        self.budget_bytes = budget_bytes
        self._in_use = in_use  # memory held outside this backend (the server's own model)
        self._in_use_bytes: int | None = None
        self.listener = listener
        self._replicas: dict[str, Replica] = {}
        self._lock = threading.Lock()

    def in_use_bytes(self) -> int:
        if self._in_use_bytes is None:
            self._in_use_bytes = self._in_use()
        return self._in_use_bytes

    def check_replica_count(self, n: int, param: str) -> None:
        if n > 1:
            raise invalid(
                f"{param} {n}: the embedded backend runs at most one replica of a deployment;"
                " start the server with Ray (girandole serve --ray) to run more",
                param,
            )

    def scale(self, spec: ReplicaSpec, n: int, record: Any = None, *, manual: bool = True) -> None:
        self.check_replica_count(n, "replicaCount")
        with self._lock:
            replica = self._replicas.get(spec.deployment)
            if n == 0 or (
                replica is not None and (replica.spec != spec or replica.state == "failed")
            ):
                if replica is not None:
                    self._stop(self._replicas.pop(spec.deployment))
                    replica = None
            if n == 0 or replica is not None:
                return
            needed = replica_bytes(spec)
            used = self.in_use_bytes() + sum(
                r.reserved_bytes for r in self._replicas.values() if r.state != "failed"
            )
            if used + needed > self.budget_bytes:
                raise DeploymentError(
                    400,
                    f"Not enough memory for a replica of {spec.deployment}: it needs about"
                    f" {_gib(needed)}, {_gib(used)} of the {_gib(self.budget_bytes)} budget is"
                    f" held by {self._holders()}; scale another deployment to zero or raise"
                    f" {MEMORY_ENV}",
                    param="replicaCount",
                    code="RESOURCE_EXHAUSTED",
                )
            replica = Replica(spec, needed)
            self._replicas[spec.deployment] = replica
        threading.Thread(
            target=self._load, args=(replica,), name="girandole-replica-load", daemon=True
        ).start()

    def replace_stalled(self, limit_s: float) -> dict[str, str]:
        """A replica whose engine died (or is stuck) kept the deployment READY while every
        request to it failed: it is replaced as Ray Serve replaces one failing its health check.
        The new replica takes the old one's share of the budget (the same spec: the same size)."""
        replaced: dict[str, str] = {}
        with self._lock:
            for deployment, replica in list(self._replicas.items()):
                if replica.state != "ready":
                    continue
                why = stall_error(replica.engine, limit_s)
                if why is None:
                    continue
                fresh = Replica(replica.spec, replica.reserved_bytes)
                self._replicas[deployment] = fresh
                stale, replica.engine = replica.engine, None
                replaced[deployment] = why
                threading.Thread(
                    target=self._load,
                    args=(fresh, stale),
                    name="girandole-replica-load",
                    daemon=True,
                ).start()
        return replaced

    def _holders(self) -> str:
        names = [f"{d} ({_gib(r.reserved_bytes)})" for d, r in self._replicas.items()]
        if self.in_use_bytes():
            names.insert(0, f"the server's own model ({_gib(self.in_use_bytes())})")
        return ", ".join(names) or "nothing"

    def _load(self, replica: Replica, stale: Any = None) -> None:
        """Start the replica's engine; `stale`, the engine it replaces, is stopped first (its
        requests end with a 503, its memory is freed before the new one loads)."""
        if stale is not None:
            try:
                stale.shutdown()
            except Exception:  # noqa: BLE001 - the new replica starts all the same
                logger.exception(
                    "stopping the replaced replica of %s failed", replica.spec.deployment
                )
        spec = replica.spec
        error = None
        try:
            engine = spec.start_engine()
        except Exception as exc:  # noqa: BLE001 - the deployment's status reports it
            logger.exception("a replica of %s failed to start", spec.deployment)
            error = f"{type(exc).__name__}: {exc}"
            engine = None
        with self._lock:
            current = self._replicas.get(spec.deployment) is replica
            if current:
                replica.engine = engine
                replica.state = "ready" if engine is not None else "failed"
                replica.error = error
                replica.last_used = time.time()
        if not current:  # scaled down (or restarted) while it loaded
            if engine is not None:
                engine.shutdown()
            return
        if self.listener is not None:
            self.listener(spec.deployment, error)

    def _stop(self, replica: Replica) -> None:
        """Stop a replica taken out of the table (its engine's thread is joined off the loop)."""
        engine, replica.engine = replica.engine, None
        if engine is not None:
            threading.Thread(
                target=engine.shutdown, name="girandole-replica-stop", daemon=True
            ).start()

    def stats(self, deployment: str) -> ReplicaStats:
        replica = self._replicas.get(deployment)
        if replica is None or replica.state == "failed":
            return ReplicaStats()
        if replica.state == "ready":
            return ReplicaStats(ready=1)
        return ReplicaStats(initializing=1)

    def engines(self, deployment: str) -> list[Any]:
        replica = self._replicas.get(deployment)
        if replica is None or replica.state != "ready":
            return []
        return [replica.engine]

    def idle_since(self, deployment: str) -> float | None:
        replica = self._replicas.get(deployment)
        return replica.last_used if replica is not None and replica.state == "ready" else None

    def touch(self, deployment: str) -> None:
        replica = self._replicas.get(deployment)
        if replica is not None:
            replica.last_used = time.time()

    def shutdown(self) -> None:
        with self._lock:
            replicas, self._replicas = list(self._replicas.values()), {}
        for replica in replicas:
            if replica.engine is not None:
                replica.engine.shutdown()


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
