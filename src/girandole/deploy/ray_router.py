"""Ray Serve request routers for girandole replicas (they run in the ingress, inside its handles).

PrefixAwareRouter sends a request to the replica that most likely holds its prompt's prefix in
its KV cache, the idea of SGLang's cache-aware router and Ray's PrefixCacheAffinityRouter, on
token blocks instead of text: the ingress hashes the prompt's first blocks (chained, so block i's
hash stands for the whole prefix up to it, as the engine's prefix cache does) and the router
remembers which hashes it sent where. When the replica with the longest match is busier than
the least loaded by `imbalance` requests, load wins (least loaded). Requests with no match go
to the least loaded replica: the one with the fewest requests this router has in flight there
(Ray's queue-length cache lags a burst of requests that arrive together).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PREFIX_BLOCK_TOKENS = 16  # the engine's KV block size
MAX_PREFIX_BLOCKS = 256  # a prompt's first 4,096 tokens decide
MAX_HASHES_PER_REPLICA = 200_000  # least recently sent evicted past it


@dataclass(frozen=True)
class RouteKey:
    """What a router reads of a request (the first argument of the replica's `session`)."""

    request_id: str
    prefix_hashes: tuple[int, ...] = ()
    adapter: str | None = None


def prefix_hashes(prompt: list[int], salt: str | None = None) -> tuple[int, ...]:
    """Chained hashes of the prompt's whole blocks (a salt, e.g. cache_salt, starts the chain)."""
    out = []
    h = hash(("girandole", salt))
    for start in range(
        0, min(len(prompt), PREFIX_BLOCK_TOKENS * MAX_PREFIX_BLOCKS), PREFIX_BLOCK_TOKENS
    ):
        block = prompt[start : start + PREFIX_BLOCK_TOKENS]
        if len(block) < PREFIX_BLOCK_TOKENS:
            break
        h = hash((h, *block))
        out.append(h)
    return tuple(out)


def route_key_of(pending: PendingRequest | None) -> RouteKey | None:
    if pending is None or not pending.args:
        return None
    key = pending.args[0]
    return key if isinstance(key, RouteKey) else None


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 8, **kwargs) -> None:
        self.imbalance = imbalance
        self.sent: dict[str, OrderedDict[int, None]] = {}  # replica id -> hashes sent there
        self.inflight: dict[str, int] = {}  # replica id -> requests routed, not completed
        self._turn = itertools.count()
        self.num_prefix_routed = 0
        self.num_load_routed = 0

    def _match(self, replica_id: str, hashes: tuple[int, ...]) -> int:
        """How many leading blocks of the prompt were sent to this replica before."""
        seen = self.sent.get(replica_id)
        if not seen:
            return 0
        for n in range(len(hashes), 0, -1):  # chained: the longest hash seen is the match
            if hashes[n - 1] in seen:
                return n
        return 0

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.inflight.get(replica.replica_id.unique_id, 0)

    def _by_load(self, replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        """Least loaded first, one replica a rank (Ray takes the first that has room). Ties
        rotate: a burst is chosen before any of it is counted as routed."""
        turn = next(self._turn)
        ordered = sorted(replicas, key=lambda r: r.replica_id.unique_id)
        n = len(ordered)
        ranked = sorted(range(n), key=lambda i: (self._queue_len(ordered[i]), (i - turn) % n))
        return [[ordered[i]] for i in ranked]

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        key = route_key_of(pending_request)
        if len(candidate_replicas) < 2:
            return [candidate_replicas]
        if key is None or not key.prefix_hashes:
            return self._by_load(candidate_replicas)
        scored = [
            (self._match(r.replica_id.unique_id, key.prefix_hashes), r) for r in candidate_replicas
        ]
        best_match, best = max(scored, key=lambda s: (s[0], -self._queue_len(s[1])))
        if best_match == 0:
            self.num_load_routed += 1
            return self._by_load(candidate_replicas)
        least = min(self._queue_len(r) for r in candidate_replicas)
        if self._queue_len(best) - least > self.imbalance:
            self.num_load_routed += 1
            return self._by_load(candidate_replicas)
        self.num_prefix_routed += 1
        return [[best], [r for r in candidate_replicas if r is not best]]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        rid = replica_id.unique_id
        self.inflight[rid] = self.inflight.get(rid, 0) + 1
        key = route_key_of(pending_request)
        if key is None or not key.prefix_hashes:
            return
        seen = self.sent.setdefault(replica_id.unique_id, OrderedDict())
        for h in key.prefix_hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > MAX_HASHES_PER_REPLICA:
            seen.popitem(last=False)

    def on_request_completed(self, replica_id, internal_request_id) -> None:
        rid = replica_id.unique_id
        if self.inflight.get(rid):
            self.inflight[rid] -= 1

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.sent.pop(replica_id.unique_id, None)
        self.inflight.pop(replica_id.unique_id, None)


class RoundRobinRouter(RequestRouter):
    """Each replica in turn, whatever the prompt: the baseline prefix routing is measured on."""

    def initialize_state(self, **kwargs) -> None:
        self._turn = itertools.count()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [[ordered[next(self._turn) % len(ordered)]]]


ROUTERS = {"prefix": PrefixAwareRouter, "round_robin": RoundRobinRouter}
