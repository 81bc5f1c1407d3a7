"""The parts of the control plane that need no engine: durations, list queries, field
validation, the record's round trip through the database, acceleratorType from a GPU's name."""

from __future__ import annotations

import pytest

from girandole.deploy.hardware import accelerator_type_of
from girandole.registry import list_query
from girandole.registry.deployments import (
    DeploymentError,
    DeploymentRecord,
    DeploymentStore,
    Hardware,
    apply_fields,
    format_duration,
    parse_duration,
)
from girandole.registry.keystore import Database

CPU = Hardware(None, 0, "CPU only")
H200 = Hardware("NVIDIA_H200_141GB", 1, "one NVIDIA H200")


@pytest.mark.parametrize(
    "text, seconds",
    [("30s", 30), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("1.5s", 1.5), ("250ms", 0.25)],
)
def test_durations(text, seconds):
    assert parse_duration(text, "w") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "1d", "-5s", "5 s", None, 30])
def test_bad_durations(text):
    with pytest.raises(DeploymentError) as info:
        parse_duration(text, "autoscalingPolicy.scaleUpWindow")
    assert info.value.param == "autoscalingPolicy.scaleUpWindow"


def test_duration_format():
    assert (format_duration(600.0), format_duration(1.5)) == ("600s", "1.5s")


RESOURCES = [
    {"name": "a", "state": "READY", "minReplicaCount": 0, "status": {"code": "OK"}},
    {"name": "b", "state": "FAILED", "minReplicaCount": 1, "status": {"code": "INTERNAL"}},
    {"name": "c", "state": "READY", "minReplicaCount": 2, "annotations": {"team": "x"}},
]
FIELDS = {"name", "state", "minReplicaCount", "status", "annotations"}


@pytest.mark.parametrize(
    "text, names",
    [
        ("", ["a", "b", "c"]),
        ("state = READY", ["a", "c"]),
        ('state != "READY"', ["b"]),
        ("min_replica_count >= 1", ["b", "c"]),
        ("state = READY AND minReplicaCount > 0", ["c"]),
        ("name = a OR name = b AND state = FAILED", ["a", "b"]),
        ("NOT state = READY", ["b"]),
        ("status.code = INTERNAL", ["b"]),
        ("annotations:team", ["c"]),
        ("name:*", ["a", "b", "c"]),
    ],
)
def test_filters(text, names):
    condition = list_query.parse_filter(text, FIELDS)
    assert [r["name"] for r in RESOURCES if condition.matches(r)] == names


@pytest.mark.parametrize(
    "text",
    ["state", "state =", "state = READY AND", "colour = red", "state = READY XOR x", "a=(b)"],
)
def test_bad_filters(text):
    with pytest.raises(list_query.QueryError):
        list_query.parse_filter(text, FIELDS)


def test_order_and_pages():
    items = [dict(r) for r in RESOURCES]
    list_query.sort_resources(items, list_query.parse_order_by("state, name desc", FIELDS))
    assert [r["name"] for r in items] == ["b", "c", "a"]
    with pytest.raises(list_query.QueryError):
        list_query.parse_order_by("name sideways", FIELDS)
    first, token = list_query.page(items, 2, None)
    second, last = list_query.page(items, 2, token)
    assert [r["name"] for r in first + second] == ["b", "c", "a"] and last == ""
    assert list_query.page_size_of(None) == 50 and list_query.page_size_of(1000) == 200
    with pytest.raises(list_query.QueryError):
        list_query.page_size_of(-1)
    with pytest.raises(list_query.QueryError):
        list_query.decode_page_token("not-a-token")


def record(**fields) -> DeploymentRecord:
    return apply_fields(
        DeploymentRecord("t", "d", "accounts/t/models/m"), fields, CPU, creating=True
    )


def test_fields_and_defaults():
    r = record(minReplicaCount=1, displayName="x", autoscalingPolicy={"scaleToZeroWindow": "5m"})
    assert (r.min_replica_count, r.max_replica_count) == (1, 1)  # max defaults to max(min, 1)
    assert r.autoscaling_policy.scale_to_zero_window == 300
    assert r.autoscaling_policy.scale_up_window == 30  # Fireworks' defaults
    assert r.autoscaling_policy.load_targets == {"default": 0.8}
    kept = record(annotations={"a": "b"}, expireTime="2030-01-01T00:00:00Z")
    assert kept.to_json()["annotations"] == {"a": "b"}
    assert record(acceleratorType="ACCELERATOR_TYPE_UNSPECIFIED").accelerator_type is None


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"acceleratorType": "NVIDIA_H200_141GB"}, "acceleratorType"),
        ({"acceleratorCount": 1}, "acceleratorCount"),
        ({"precision": "BF16"}, "precision"),
        ({"numPeftDeviceCached": 4}, "numPeftDeviceCached"),
        ({"displayName": "x" * 64}, "displayName"),
        ({"maxContextLength": -1}, "maxContextLength"),
        ({"autoscalingPolicy": {"loadTargets": {"default": 1.5}}}, "autoscalingPolicy.loadTargets"),
        ({"autoscalingPolicy": {"scalingSchedules": [{}]}}, "autoscalingPolicy.scalingSchedules"),
        (
            {"autoscalingPolicy": {"scaleToZeroWindow": "9" * 400 + "h"}},
            "autoscalingPolicy.scaleToZeroWindow",
        ),
        (
            {"autoscalingPolicy": {"scaleToZeroWindow": "169h"}},
            "autoscalingPolicy.scaleToZeroWindow",
        ),
    ],
)
def test_refused_fields(fields, param):
    with pytest.raises(DeploymentError) as info:
        record(**fields)
    assert info.value.status == 400 and info.value.param == param


def test_accelerator_honoured_where_present():
    r = apply_fields(
        DeploymentRecord("t", "d", "m"),
        {"acceleratorType": "NVIDIA_H200_141GB", "acceleratorCount": 1},
        H200,
        creating=True,
    )
    assert (r.accelerator_type, r.accelerator_count) == ("NVIDIA_H200_141GB", 1)
    with pytest.raises(DeploymentError):
        apply_fields(DeploymentRecord("t", "d", "m"), {"acceleratorCount": 2}, H200, creating=True)


@pytest.mark.parametrize(
    "name, memory_gb, expected",
    [
        ("NVIDIA H200", 141, "NVIDIA_H200_141GB"),
        ("NVIDIA A100-SXM4-40GB", 40, "NVIDIA_A100_40GB"),
        ("NVIDIA A100-SXM4-80GB", 80, "NVIDIA_A100_80GB"),
        ("NVIDIA L4", 24, "NVIDIA_L4_24GB"),
        ("NVIDIA GeForce RTX 4090", 24, None),
    ],
)
def test_accelerator_type_of(name, memory_gb, expected):
    assert accelerator_type_of(name, memory_gb * 10**9) == expected


def test_store_round_trip():
    store = DeploymentStore(Database(None))
    r = record(
        displayName="x",
        minReplicaCount=1,
        autoscalingPolicy={"scaleDownWindow": "2m", "loadTargets": {"concurrent_requests": 3}},
        annotations={"k": "v"},
    )
    r.state, r.desired_replica_count = "READY", 1
    assert store.insert(r) and not store.insert(r)
    back = store.get("t", "d")
    assert back.to_json() == r.to_json()
    r.state = "DELETED"
    r.delete_time = r.update_time
    store.save(r)
    assert store.get("t", "d").deleted and store.get("t", "d").to_json() == r.to_json()
    store.remove("t", "d")
    assert store.get("t", "d") is None and store.list() == []
