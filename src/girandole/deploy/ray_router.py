"""Ray Serve request routers for girandole replicas (they run in the ingress, inside its handles).

PrefixAwareRouter sends a request to the replica that most likely holds its prompt's prefix in
its KV cache, the idea of SGLang's cache-aware router and Ray's PrefixCacheAffinityRouter, on
token blocks instead of text: the ingress hashes the prompt's first blocks (chained, so block i's
hash stands for the whole prefix up to it, as the engine's prefix cache does) and the router
remembers which hashes it sent where. When the replica with the longest match is busier than
the least loaded by `imbalance` requests, load wins (least loaded). Requests with no match go
to the least loaded replica: the one with the fewest requests this router has in flight there
(Ray's queue-length cache lags a burst of requests that arrive together).

A request for a LoRA adapter goes first to a replica that holds the adapter (the ones it reports
in its routing stats, and those this router sent it to), unless that replica is busier than the
least loaded by `imbalance`; among those, prefix then load decide. A replica without the adapter
reads it on the request (replica_adapters.py): routing never fails for want of one.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PREFIX_BLOCK_TOKENS = 16  # the engine's KV block size
MAX_PREFIX_BLOCKS = 256  # a prompt's first 4,096 tokens decide
MAX_HASHES_PER_REPLICA = 200_000  # least recently sent evicted past it

# Before sending a request Ray asks the chosen replica its queue length, unless it has a recent
# one, and passes over a replica that does not answer within 0.1 s (its default; longer only when
# no replica answered). A replica that answers late is never cached, so on a loaded host (2 CPUs,
# the other replica busy generating) an idle replica lost every request to the busy one, whose
# length each answer refreshed: six concurrent streams all went to one of two replicas. Half a
# second (up to 2 s) tolerates load; a hung replica costs a request ranked to it first that long
# before the next one is tried. Ray's environment variables still set them.
QUEUE_LEN_DEADLINE_S = float(os.environ.get("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", 0.5))
MAX_QUEUE_LEN_DEADLINE_S = float(
    os.environ.get("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", 2.0)
)


@dataclass(frozen=True)
class RouteKey:
    """What a router reads of a request (the first argument of the replica's `session`)."""

    request_id: str
    prefix_hashes: tuple[int, ...] = ()
    adapter: str | None = None


def prefix_hashes(prompt: list[int], salt: Hashable = None) -> tuple[int, ...]:
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


class GirandoleRouter(RequestRouter):
    """Ray's RequestRouter with the queue-length deadlines above."""

    queue_len_response_deadline_s = QUEUE_LEN_DEADLINE_S
    max_queue_len_response_deadline_s = MAX_QUEUE_LEN_DEADLINE_S


class PrefixAwareRouter(GirandoleRouter):
    def initialize_state(self, imbalance: int = 8, **kwargs) -> None:
        self.imbalance = imbalance
        self.sent: dict[str, OrderedDict[int, None]] = {}  # replica id -> hashes sent there
        self.inflight: dict[str, int] = {}  # replica id -> requests routed, not completed
        self.adapters_sent: dict[str, set[str]] = {}  # replica id -> LoRA adapters sent there
        self._turn = itertools.count()
        self.num_prefix_routed = 0
        self.num_load_routed = 0
        self.num_adapter_routed = 0

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

    def _holds(self, replica: RunningReplica, adapter: str) -> bool:
        """Whether the replica holds the adapter: it says so, or a request for it went there."""
        if adapter in self.adapters_sent.get(replica.replica_id.unique_id, ()):
            return True
        stats = getattr(replica, "routing_stats", None) or {}
        return adapter in (stats.get("adapters") or ())

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        key = route_key_of(pending_request)
        if len(candidate_replicas) < 2:
            return [candidate_replicas]
        if key is None:
            return self._by_load(candidate_replicas)
        if key.adapter is not None:
            least = min(self._queue_len(r) for r in candidate_replicas)
            holders = [
                r
                for r in candidate_replicas
                if self._holds(r, key.adapter) and self._queue_len(r) - least <= self.imbalance
            ]
            if holders and len(holders) < len(candidate_replicas):
                self.num_adapter_routed += 1
                held = {id(r) for r in holders}
                others = [r for r in candidate_replicas if id(r) not in held]
                return self._by_affinity(holders, key) + self._by_load(others)
        return self._by_affinity(candidate_replicas, key)

    def _by_affinity(
        self, candidate_replicas: list[RunningReplica], key: RouteKey
    ) -> list[list[RunningReplica]]:
        """The replica sent the longest prefix of the prompt first, unless it is too busy;
        otherwise least loaded first."""
        if len(candidate_replicas) < 2:
            return [candidate_replicas]
        if not key.prefix_hashes:
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
        if key is None:
            return
        if key.adapter is not None:  # the replica reads it for this request if it had not
            self.adapters_sent.setdefault(rid, set()).add(key.adapter)
        if not key.prefix_hashes:
            return
        seen = self.sent.setdefault(rid, OrderedDict())
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
        self.adapters_sent.pop(replica_id.unique_id, None)


class RoundRobinRouter(GirandoleRouter):
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
