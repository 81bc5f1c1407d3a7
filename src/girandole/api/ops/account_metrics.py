"""Fireworks' account metrics: `GET /v1/accounts/{account}/metrics`, Prometheus text of the
account's deployments, for a scraper holding one of the account's keys (Grafana Cloud, an OTel
Collector, a Prometheus with `authorization: {type: Bearer}`).

Fireworks serves recording rules, not raw counters: per-second rates over a one-minute window
(`request_counter_total:sum_by_deployment`, ...), the same rates per histogram bucket
(`latency_overall_ms_bucket:sum_by_deployment{le=...}`: `histogram_quantile` reads them as
they are) and gauges averaged over the deployment's replicas. Every series has the labels
`base_model`, `deployment`, `deployment_account` and `deployment_id`; errors add `http_code`.
Here the window holds the deployment's requests that ended in the last minute (a request counts
once it has named a deployment: a 400 on its body after that is the deployment's error) and is
read when the page is scraped. Fireworks limits the endpoint to 6 scrapes a minute per account
(429 beyond); so does girandole by default (`--metrics-scrapes-per-minute`, 0: no limit).

Not served: `latency_generation_queue_ms` (Fireworks' prefill and generation run apart, with a
queue between; here a sequence decodes in the step after its prefill, so nothing waits there)
and `prefiller_prompt_cache_ttl` (the prefix cache has no time to live; it evicts the least
recently used blocks).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from girandole.api.http.errors import too_many_requests
from girandole.api.ops.ratelimit import Bucket
from girandole.api.ops.replica_gauges import ReplicaLoad

if TYPE_CHECKING:
    from girandole.api.ops.tracking import RequestRecord
    from girandole.api.serving.usage import Usage

WINDOW_S = 60.0
LABELS = ["base_model", "deployment", "deployment_account", "deployment_id"]
LATENCY_BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)
PER_TOKEN_BUCKETS_MS = (1, 2.5, 5, 10, 20, 40, 60, 80, 100, 150, 250, 500, 1000)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)


@dataclass(frozen=True)
class Ended:
    """One request a deployment answered (or refused once it had named the deployment)."""

    time: float  # time.monotonic() when it ended
    status: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    overall_ms: float = 0.0
    ttft_ms: float | None = None
    prefill_queue_ms: float | None = None  # admission queue and the engine's waiting line
    prefill_ms: float | None = None  # first scheduled to first token, on the engine's clock
    per_token_ms: tuple[float, ...] = ()  # each choice's mean time between its tokens
    ran: bool = False  # it reached the engine (token counts describe it)


def ended_of(record: RequestRecord, status: int, duration_s: float, usage: Usage | None) -> Ended:
    """What `record` tells the window; `usage` its `record.usage()`, None if it never reached
    the engine. Engine times are differences on the engine's own clock (a Ray replica's may be
    another machine's)."""
    ttft = record.first_token_time - record.start if record.first_token_time is not None else None
    scheduled = [o for o in record.ends if o.first_scheduled_time is not None]
    first = min(scheduled, key=lambda o: o.first_scheduled_time - o.arrival_time, default=None)
    queue_ms = prefill_ms = None
    if first is not None:
        waited = first.first_scheduled_time - first.arrival_time
        queue_ms = ((record.queue_s or 0.0) + max(0.0, waited)) * 1000
        if first.first_token_time is not None:
            prefill_ms = max(0.0, first.first_token_time - first.first_scheduled_time) * 1000
    per_token = []
    for out in record.ends:
        if out.first_token_time is not None and out.finished_time is not None:
            if out.num_output_tokens > 1:
                gaps = out.num_output_tokens - 1
                per_token.append(max(0.0, out.finished_time - out.first_token_time) * 1000 / gaps)
    return Ended(
        time=time.monotonic(),
        status=status,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        cached_tokens=usage.cached_tokens if usage else 0,
        generated_tokens=usage.completion_tokens if usage else 0,
        overall_ms=duration_s * 1000,
        ttft_ms=ttft * 1000 if ttft is not None else None,
        prefill_queue_ms=queue_ms,
        prefill_ms=prefill_ms,
        per_token_ms=tuple(per_token),
        ran=usage is not None,
    )


@dataclass(frozen=True)
class DeploymentLoad:
    """A deployment of the account, for one scrape: its names and its replicas' stats."""

    name: str  # accounts/<a>/deployments/<d>
    base_model: str
    replicas: Sequence[ReplicaLoad]


class AccountMetrics:
    """The last minute of each deployment's ended requests, and each account's scrape allowance."""

    def __init__(self, scrapes_per_minute: int = 6, window_s: float = WINDOW_S) -> None:
        self.scrapes_per_minute = scrapes_per_minute
        self.window_s = window_s
        self._ended: dict[str, deque[Ended]] = {}
        self._scrapes: dict[str, Bucket] = {}
        # (deployment, replica) -> (steps, step seconds) at the last scrape: forward time is
        # the mean step time since then
        self._steps: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()  # requests end on the loop; batch work in threads too

    def record(self, deployment: str, ended: Ended) -> None:
        with self._lock:
            window = self._ended.setdefault(deployment, deque())
            window.append(ended)
            self._trim(window, ended.time)

    def _trim(self, window: deque[Ended], now: float) -> None:
        while window and window[0].time < now - self.window_s:
            window.popleft()

    def admit_scrape(self, account: str) -> None:
        """Take one of `account`'s scrapes for this minute; 429 with Retry-After past them."""
        if self.scrapes_per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            bucket = self._scrapes.get(account)
            if bucket is None or bucket.limit != self.scrapes_per_minute:
                bucket = self._scrapes[account] = Bucket(self.scrapes_per_minute)
            bucket.refill(now)
            if bucket.level >= 1.0:
                bucket.level -= 1.0
                return
            wait = bucket.seconds_until(1.0)
        retry = max(1, math.ceil(wait))
        error = too_many_requests(
            f"Metrics of account {account} may be read {self.scrapes_per_minute} times a minute"
            f" (they cover the last minute: scrape every 60 s). Retry after {retry} s."
        )
        error.headers["Retry-After"] = str(retry)
        error.headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        raise error

    def render(self, deployments: Iterable[DeploymentLoad]) -> bytes:
        now = time.monotonic()
        rows = []
        with self._lock:
            for d in deployments:
                window = self._ended.get(d.name, deque())
                self._trim(window, now)
                rows.append((d, list(window), self._forward_times(d)))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Page(rows, self.window_s))
        return generate_latest(registry)

    def _forward_times(self, d: DeploymentLoad) -> list[float]:
        """Each replica's mean step time (seconds) since the last scrape (since it started, at
        the first); replicas that took no step since are left out."""
        times = []
        for r in d.replicas:
            steps = float(r.stats.get("num_steps") or 0)
            seconds = float(r.stats.get("step_seconds") or 0)
            key = (d.name, r.replica)
            last_steps, last_seconds = self._steps.get(key, (0.0, 0.0))
            if steps < last_steps:  # a new replica under the same id
                last_steps, last_seconds = 0.0, 0.0
            self._steps[key] = (steps, seconds)
            if steps > last_steps:
                times.append((seconds - last_seconds) / (steps - last_steps))
        return times


class _Page(Collector):
    def __init__(
        self, rows: list[tuple[DeploymentLoad, list[Ended], list[float]]], window_s: float
    ):
        self.rows = rows
        self.window_s = window_s

    def collect(self) -> Iterator[GaugeMetricFamily]:
        def family(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*LABELS, *extra])

        per_s = 1.0 / self.window_s
        requests = family("request_counter_total:sum_by_deployment", "requests a second")
        errors = family(
            "requests_error_total:sum_by_deployment", "error answers a second", ["http_code"]
        )
        cached = family(
            "tokens_cached_prompt_total:sum_by_deployment",
            "prompt tokens a second served from the prefix cache",
        )
        prompt = family("tokens_prompt_total:sum_by_deployment", "prompt tokens a second")
        histograms = [
            ("latency_overall_ms", "end-to-end request latency", LATENCY_BUCKETS_MS,
             lambda e: [e.overall_ms]),
            ("latency_to_first_token_ms", "time to first token", LATENCY_BUCKETS_MS,
             lambda e: [e.ttft_ms] if e.ttft_ms is not None else []),
            ("latency_prefill_queue_ms", "arrival to the engine's first step of it",
             LATENCY_BUCKETS_MS,
             lambda e: [e.prefill_queue_ms] if e.prefill_queue_ms is not None else []),
            ("latency_prefill_ms", "prompt processing: first step to first token",
             LATENCY_BUCKETS_MS, lambda e: [e.prefill_ms] if e.prefill_ms is not None else []),
            ("latency_generation_per_token_ms", "time per generated token, each choice",
             PER_TOKEN_BUCKETS_MS, lambda e: list(e.per_token_ms)),
            ("tokens_generated_per_request", "generated tokens per request", TOKEN_BUCKETS,
             lambda e: [e.generated_tokens] if e.ran else []),
            ("tokens_prompt_per_request", "prompt tokens per request", TOKEN_BUCKETS,
             lambda e: [e.prompt_tokens] if e.ran else []),
        ]  # fmt: skip
        buckets = {
            name: family(f"{name}_bucket:sum_by_deployment", f"{doc}: a second, by bucket", ["le"])
            for name, doc, _, _ in histograms
        }
        kv_blocks = family(
            "generator_kv_blocks_fraction:avg_by_deployment", "KV cache blocks in use (0..1)"
        )
        kv_slots = family(
            "generator_kv_slots_fraction:avg_by_deployment",
            "sequence slots in use (running / --max-num-seqs, 0..1)",
        )
        forward = family(
            "generator_model_forward_time:avg_by_deployment",
            "seconds per engine step (model forward and sampling) since the last scrape",
        )
        concurrent = family(
            "requests_coordinator_concurrent_count:avg_by_deployment",
            "requests running or waiting in a replica's engine",
        )
        for d, ended, forward_times in self.rows:
            labels = _labels(d)
            requests.add_metric(labels, len(ended) * per_s)
            codes: dict[int, int] = {}
            for e in ended:
                if e.status >= 400:
                    codes[e.status] = codes.get(e.status, 0) + 1
            for code, count in sorted(codes.items()):
                errors.add_metric([*labels, str(code)], count * per_s)
            cached.add_metric(labels, sum(e.cached_tokens for e in ended) * per_s)
            prompt.add_metric(labels, sum(e.prompt_tokens for e in ended) * per_s)
            for name, _, bounds, values_of in histograms:
                values = sorted(v for e in ended for v in values_of(e))
                for bound in [*bounds, math.inf]:
                    count = bisect.bisect_right(values, bound)
                    le = "+Inf" if bound == math.inf else f"{bound:g}"
                    buckets[name].add_metric([*labels, le], count * per_s)
            replicas = [r.stats for r in d.replicas]
            if replicas:
                kv_blocks.add_metric(labels, _mean(_share(s, "kv_blocks_used", "kv_blocks_total")
                                                   for s in replicas))  # fmt: skip
                kv_slots.add_metric(labels, _mean(_share(s, "num_running", "max_num_seqs")
                                                  for s in replicas))  # fmt: skip
                concurrent.add_metric(
                    labels,
                    _mean(float(s.get("num_running") or 0) + float(s.get("num_waiting") or 0)
                          for s in replicas),
                )  # fmt: skip
            if forward_times:
                forward.add_metric(labels, _mean(forward_times))
        yield requests
        yield errors
        yield cached
        yield prompt
        yield from buckets.values()
        yield kv_blocks
        yield kv_slots
        yield forward
        yield concurrent


def _labels(d: DeploymentLoad) -> list[str]:
    parts = d.name.split("/")  # accounts/<a>/deployments/<d>
    return [d.base_model, d.name, parts[1], parts[-1]]


def _share(stats: Any, used: str, total: str) -> float:
    whole = float(stats.get(total) or 0)
    return float(stats.get(used) or 0) / whole if whole else 0.0


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
