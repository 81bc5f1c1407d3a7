"""Per-replica load gauges for routers in front of girandole (the Gateway API Inference
Extension's model-server signals, named like vLLM's so that llm-d's endpoint picker can be
pointed at them):

    girandole:num_requests_waiting{deployment, replica}   requests queued in the engine
    girandole:num_requests_running{deployment, replica}   requests the engine is running
    girandole:kv_cache_usage_perc{deployment, replica}    KV-cache blocks in use, 0..1
    girandole:lora_adapters{deployment, replica}          LoRA adapters the replica holds
    girandole:requests_total{deployment, replica}         requests a Ray replica took since it
                                                          started (how the load spread)

one series per replica: the server's own model (its deployment, replica "0") and every ready
replica of every managed deployment. They are read when /metrics is scraped, from each engine's
`stats()` (the EngineClient interface), or per replica from `replica_stats()` where one engine
fronts several replicas. The server-wide girandole_* gauges stay as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from girandole.api.state import AppState
    from girandole.deploy.manager import DeploymentManager

logger = logging.getLogger("girandole.api")

LABELS = ["deployment", "replica"]


@dataclass(frozen=True)
class ReplicaLoad:
    deployment: str  # accounts/<a>/deployments/<d>
    replica: str  # the replica's id within its deployment
    stats: Mapping[str, Any]  # EngineClient.stats()


def replica_loads(named_engines: Iterable[tuple[str, str, Any]]) -> list[ReplicaLoad]:
    """The stats of each (deployment, replica, engine). An engine that fronts several replicas
    (the Ray backend's RemoteEngine) gives each one's through `replica_stats()` (replica id ->
    stats); any other engine is one replica. An engine that cannot answer (a replica going away)
    is left out rather than failing the whole scrape."""
    loads = []
    for deployment, replica, engine in named_engines:
        try:
            per_replica = getattr(engine, "replica_stats", None)
            if callable(per_replica):
                for replica_id, stats in sorted(per_replica().items()):
                    loads.append(ReplicaLoad(deployment, str(replica_id), dict(stats)))
            else:
                loads.append(ReplicaLoad(deployment, replica, dict(engine.stats())))
        except Exception:  # noqa: BLE001
            logger.debug("no stats from %s replica %s", deployment, replica, exc_info=True)
    return loads


class ReplicaGauges(Collector):
    def __init__(self, read: Callable[[], list[ReplicaLoad]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(
            "girandole:num_requests_waiting",
            "requests waiting in the replica's engine queue",
            labels=LABELS,
        )
        running = GaugeMetricFamily(
            "girandole:num_requests_running",
            "requests running on the replica's engine",
            labels=LABELS,
        )
        kv_usage = GaugeMetricFamily(
            "girandole:kv_cache_usage_perc",
            "share of the replica's KV-cache blocks in use (0..1)",
            labels=LABELS,
        )
        adapters = GaugeMetricFamily(
            "girandole:lora_adapters",
            "LoRA adapters the replica holds (registered; --max-loras of them resident)",
            labels=LABELS,
        )
        requests = CounterMetricFamily(
            "girandole:requests",
            "requests the replica took since it started (Ray replicas: their port's count)",
            labels=LABELS,
        )
        for load in self.read():
            labels = [load.deployment, load.replica]
            stats = load.stats
            waiting.add_metric(labels, float(stats.get("num_waiting") or 0))
            running.add_metric(labels, float(stats.get("num_running") or 0))
            total = float(stats.get("kv_blocks_total") or 0)
            used = float(stats.get("kv_blocks_used") or 0)
            kv_usage.add_metric(labels, used / total if total else 0.0)
            adapters.add_metric(labels, float(stats.get("lora_adapters") or 0))
            if "num_requests" in stats:
                requests.add_metric(labels, float(stats["num_requests"]))
        yield waiting
        yield running
        yield kv_usage
        yield adapters
        yield requests


def install_replica_gauges(state: AppState, manager: DeploymentManager) -> None:
    """Export the gauges of the server's own engine and of `manager`'s deployments on the
    server's /metrics."""

    def engines() -> Iterator[tuple[str, str, Any]]:
        if state.engine is not None:
            yield state.deployment, "0", state.engine
        for record in manager.reachable(None):
            for i, engine in enumerate(manager.backend.engines(record.name)):
                yield record.name, str(i), engine

    state.ops.metrics.registry.register(ReplicaGauges(lambda: replica_loads(engines())))
