"""PrefixAwareRouter with LoRA adapters: a request for an adapter ranks first the replicas that
hold it (reported in their routing stats, or sent it before), then prefix and load decide; a
holder too busy loses to load; with no holder the request goes by prefix and load (the replica
it lands on reads the adapter)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray", reason="the Ray backend needs ray[serve]")

from girandole.deploy.ray_router import PrefixAwareRouter, RouteKey  # noqa: E402


def replica(rid: str, adapters: list[str] | None = None) -> SimpleNamespace:
    """What the router reads of Ray's RunningReplica: its id and its routing stats."""
    return SimpleNamespace(
        replica_id=SimpleNamespace(unique_id=rid), routing_stats={"adapters": adapters or []}
    )


def router() -> PrefixAwareRouter:
    r = PrefixAwareRouter.__new__(PrefixAwareRouter)  # Ray builds it inside a handle
    r.initialize_state(imbalance=2)
    return r


def choose(r: PrefixAwareRouter, replicas, key: RouteKey) -> list[list[str]]:
    ranks = asyncio.run(r.choose_replicas(replicas, SimpleNamespace(args=[key])))
    return [[x.replica_id.unique_id for x in rank] for rank in ranks]


def routed(r: PrefixAwareRouter, rep, key: RouteKey) -> None:
    r.on_request_routed(SimpleNamespace(args=[key]), rep.replica_id, None)


def test_the_replica_holding_the_adapter_comes_first():
    r = router()
    a, b, c = replica("a"), replica("b", ["lora-x"]), replica("c")
    assert choose(r, [a, b, c], RouteKey("1", adapter="lora-x"))[0] == ["b"]
    # the base model, or an adapter nobody holds: least loaded, not b in particular
    assert len(choose(r, [a, b, c], RouteKey("2"))) == 3
    assert len(choose(r, [a, b, c], RouteKey("3", adapter="lora-y"))) == 3


def test_a_replica_sent_the_adapter_holds_it_before_it_reports_it():
    r = router()
    a, b = replica("a"), replica("b")
    first = choose(r, [a, b], RouteKey("1", adapter="lora-x"))[0][0]
    chosen = a if first == "a" else b
    routed(r, chosen, RouteKey("1", adapter="lora-x"))
    r.on_request_completed(chosen.replica_id, "1")
    for i in range(4):  # the load rotation would alternate; the adapter keeps it in place
        assert choose(r, [a, b], RouteKey(str(i + 2), adapter="lora-x"))[0] == [first]


def test_prefix_then_load_among_holders_and_a_busy_holder_loses():
    r = router()
    a, b, c = replica("a", ["lora-x"]), replica("b", ["lora-x"]), replica("c")
    key = RouteKey("1", prefix_hashes=(11, 12), adapter="lora-x")
    routed(r, b, RouteKey("0", prefix_hashes=(11,), adapter="lora-x"))  # b has the prefix
    assert choose(r, [a, b, c], key)[:2] == [["b"], ["a"]]
    for i in range(3):  # b now has 4 in flight, c none: past the imbalance of 2
        routed(r, b, RouteKey(f"busy-{i}"))
    ranks = choose(r, [a, b, c], key)
    assert ranks[0] == ["a"] and ranks[-1] == ["b"]  # the other holder first, b last
    for i in range(3):
        routed(r, a, RouteKey(f"busy-a-{i}"))
    assert choose(r, [a, b, c], key)[0] == ["c"]  # every holder too busy: least loaded
