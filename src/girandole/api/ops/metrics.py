"""Prometheus metrics, served at `GET /metrics` (text exposition format).

Counters and histograms are updated as requests run; engine and queue gauges are read from
`AsyncEngine.stats()` and the admission queue when the page is scraped. Each app has its own
registry, so several servers can live in one process (the tests do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class _EngineCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        s = self.read()

        def gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=float(value or 0))

        yield gauge("girandole_ready", "1 when the model is loaded and not draining", s["ready"])
        yield gauge("girandole_draining", "1 while shutting down", s["draining"])
        yield gauge("girandole_requests_active", "HTTP inference requests admitted", s["active"])
        yield gauge("girandole_requests_queued", "HTTP inference requests queued", s["queued"])
        engine = s.get("engine") or {}
        yield gauge(
            "girandole_num_requests_running", "engine requests running", engine.get("num_running")
        )
        yield gauge(
            "girandole_num_requests_waiting", "engine requests waiting", engine.get("num_waiting")
        )
        total = float(engine.get("kv_blocks_total") or 0)
        used = float(engine.get("kv_blocks_used") or 0)
        yield gauge("girandole_kv_cache_blocks_total", "KV cache blocks", total)
        yield gauge("girandole_kv_cache_blocks_used", "KV cache blocks in use", used)
        yield gauge(
            "girandole_kv_cache_usage_ratio",
            "share of KV blocks in use",
            used / total if total else 0,
        )
        queries = float(engine.get("prefix_cache_queries") or 0)
        hits = float(engine.get("prefix_cache_hits") or 0)
        yield CounterMetricFamily(
            "girandole_prefix_cache_queries", "prefix cache lookups (blocks)", value=queries
        )
        yield CounterMetricFamily(
            "girandole_prefix_cache_hits", "prefix cache hits (blocks)", value=hits
        )
        yield gauge(
            "girandole_prefix_cache_hit_rate",
            "prefix cache hits / queries",
            hits / queries if queries else 0,
        )
        yield gauge(  # fewer than the cores while other processes hold some (cpu_threads.py)
            "girandole_engine_threads",
            "CPU threads the engine runs on (0 on a GPU; summed over replicas)",
            engine.get("threads"),
        )
        yield CounterMetricFamily(
            "girandole_num_preemptions",
            "engine preemptions",
            value=float(engine.get("num_preemptions") or 0),
        )


class Metrics:
    def __init__(self, read_gauges: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "girandole_requests",
            "HTTP requests by route and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("girandole_prompt_tokens", "prompt tokens in", registry=r)
        self.cached_tokens = Counter(
            "girandole_cached_prompt_tokens",
            "prompt tokens served from the prefix cache",
            registry=r,
        )
        self.completion_tokens = Counter(
            "girandole_completion_tokens", "completion tokens out", registry=r
        )
        self.aborted = Counter(
            "girandole_aborted_requests", "inference requests aborted (client gone)", registry=r
        )
        self.rate_limited = Counter(
            "girandole_rate_limited_requests",
            "requests refused by rate limits or the queue",
            registry=r,
        )
        self.ttft = Histogram(
            "girandole_time_to_first_token_seconds",
            "arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "girandole_inter_token_latency_seconds",
            "time between tokens of a choice",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "girandole_queue_seconds",
            "time waiting in the admission queue",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "girandole_request_duration_seconds",
            "inference request duration",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(read_gauges))

    def render(self) -> bytes:
        return generate_latest(self.registry)
