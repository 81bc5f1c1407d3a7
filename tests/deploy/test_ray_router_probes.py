"""Our routers inside Ray Serve's own routing loop (RequestRouter._choose_replica_for_request,
Ray's code): before sending a request Ray asks the chosen replica its queue length, and passes
over a replica that answers too late. With Ray's 0.1 s deadline, a replica that answered in
0.2 s (a loaded host) never got a request: six in flight all went to the other one. Ours wait
longer, so the load spreads."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray", reason="the Ray backend needs ray[serve]")

from ray.serve._private.common import (  # noqa: E402
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve._private.request_router.common import PendingRequest  # noqa: E402

from girandole.deploy.ray_router import (  # noqa: E402
    QUEUE_LEN_DEADLINE_S,
    PrefixAwareRouter,
    RoundRobinRouter,
    RouteKey,
)

DEPLOYMENT = DeploymentID(name="replica", app_name="girandole--acme--pair")


class SlowToAnswer:
    """What Ray's routing loop reads of a RunningReplica; its queue length comes after `delay`."""

    def __init__(self, uid: str, delay: float) -> None:
        self.replica_id = ReplicaID(uid, DEPLOYMENT)
        self.delay = delay
        self.max_ongoing_requests = 16
        self.routing_stats: dict = {}
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()
        self.ongoing = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        await asyncio.sleep(self.delay)
        return self.ongoing


def route_six(router_class, delay: float) -> list[str]:
    """Six requests, each still running when the next is routed; where each went."""

    async def run() -> list[str]:
        router = router_class(
            DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True
        )
        router.initialize_state()
        slow, fast = SlowToAnswer("slow", delay), SlowToAnswer("fast", 0.0)
        router.update_replicas([slow, fast])
        chosen = []
        for i in range(6):
            meta = RequestMetadata(request_id=f"r{i}", internal_request_id=f"r{i}")
            pending = PendingRequest(args=[RouteKey(f"r{i}")], kwargs={}, metadata=meta)
            replica = await router._choose_replica_for_request(pending)
            router.on_request_routed(pending, replica.replica_id, None)
            router.on_send_request(replica.replica_id)  # as Ray's handle does once it is sent
            replica.ongoing += 1
            chosen.append(replica.replica_id.unique_id)
        return chosen

    return asyncio.run(run())


@pytest.mark.parametrize("router_class", [PrefixAwareRouter, RoundRobinRouter])
def test_a_replica_slow_to_answer_still_gets_its_share(router_class):
    assert QUEUE_LEN_DEADLINE_S > 0.2
    chosen = route_six(router_class, delay=0.2)
    assert chosen.count("slow") == 3 and chosen.count("fast") == 3, chosen


def test_a_replica_that_never_answers_in_time_is_passed_over():
    # the deadline still holds: a replica slower than it (hung) gets nothing, the other all
    chosen = route_six(PrefixAwareRouter, delay=QUEUE_LEN_DEADLINE_S * 8)
    assert chosen == ["fast"] * 6, chosen
