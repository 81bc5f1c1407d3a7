"""The deployments control plane against a real `girandole serve` (the tiny EOS model as its own
model) with the real fireworks-ai SDK, plain HTTP and the `girandole deployment` CLI: a
deployment of a second tiny model (added with `girandole models add`) comes up READY with an
engine, scales to zero and back, is deleted and undeleted, and survives a restart."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import fireworks
import httpx
import pytest
from conftest import start_server, stop_server, write_eos_model, write_tiny_llama_for_ops

from girandole.deploy.hardware import detect_hardware
from girandole.registry.keystore import Database

ACCOUNT = "acme"
BASE_MODEL = f"accounts/{ACCOUNT}/models/tiny-llama"


def girandole(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "girandole.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


class Plane:
    """A server with keys of two accounts and a second model in its catalog."""

    def __init__(self, tmp: Path, *serve_args: str) -> None:
        self.tmp = tmp
        self.serve_args = serve_args  # more `girandole serve` flags
        self.data = tmp / "data"
        db = Database.in_folder(self.data)
        self.key, _ = db.create_key(ACCOUNT)
        self.other_key, _ = db.create_key("other")
        db.close()
        added = girandole(
            "models", "add", "--data-dir", str(self.data), "--account", ACCOUNT,
            "tiny-llama", str(write_tiny_llama_for_ops(tmp / "tiny-llama")),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        self.eos = write_eos_model(tmp / "eos")
        self.server = self.start()

    def start(self):
        return start_server(
            self.tmp, "--model", str(self.eos), "--model-id", "tiny-eos", "--account", ACCOUNT,
            "--kv-cache-gb", "0.01", "--data-dir", str(self.data), *self.serve_args,
            api_key=self.key,
        )  # fmt: skip

    def client(self, key: str | None = None, inference: bool = False) -> fireworks.Fireworks:
        base = self.server.url + ("/inference" if inference else "")
        return fireworks.Fireworks(
            api_key=key or self.key, account_id=ACCOUNT, base_url=base, max_retries=0
        )

    def http(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"} if key != "" else {}
        return httpx.request(method, self.server.url + path, headers=headers, timeout=60, **kw)

    def wait(self, deployment_id: str, ready: int, timeout: float = 120):
        """Wait until the deployment is READY with `ready` replicas ready."""
        fw = self.client()
        deadline = time.monotonic() + timeout
        while True:
            d = fw.deployments.get(deployment_id)
            if d.state == "READY" and d.replica_stats.ready_replica_count == ready:
                return d
            assert d.state != "FAILED", d.status
            assert time.monotonic() < deadline, d
            time.sleep(0.2)


@pytest.fixture(scope="module")
def plane(tmp_path_factory) -> Plane:
    p = Plane(tmp_path_factory.mktemp("deployments"))
    yield p
    stop_server(p.server)


def test_sdk_lifecycle(plane):
    fw = plane.client(inference=True)  # the SDK's base_url ".../inference"
    created = fw.deployments.create(
        base_model=BASE_MODEL,
        deployment_id="life",
        display_name="tiny llama",
        min_replica_count=0,
        max_replica_count=1,
        autoscaling_policy={
            "scale_up_window": "15s",
            "scale_down_window": "5m",
            "scale_to_zero_window": "1h",
            "load_targets": {"default": 0.6, "concurrent_requests": 4},
        },
        max_context_length=128,
    )
    assert created.name == f"accounts/{ACCOUNT}/deployments/life"
    assert created.state == "CREATING" and created.desired_replica_count == 1
    policy = created.autoscaling_policy
    assert (policy.scale_up_window, policy.scale_down_window) == ("15s", "300s")
    assert policy.load_targets == {"default": 0.6, "concurrent_requests": 4}

    ready = plane.wait("life", 1)
    assert ready.replica_count == 1 and ready.replica_stats.initializing_replica_count == 0
    assert ready.max_context_length == 128 and ready.display_name == "tiny llama"
    assert ready.base_model == BASE_MODEL and ready.status.code == "OK"

    fw = plane.client()  # the server root as base_url: /v1/accounts/...
    assert fw.deployments.scale("life", replica_count=0) == {}
    at_zero = plane.wait("life", 0)
    assert at_zero.replica_count == 0 and at_zero.desired_replica_count == 0
    fw.deployments.scale("life", replica_count=1)
    assert plane.wait("life", 1).replica_count == 1

    updated = fw.deployments.update("life", base_model=BASE_MODEL, description="updated")
    assert updated.description == "updated" and updated.display_name == "tiny llama"

    assert fw.deployments.delete("life") == {}
    gone = fw.deployments.get("life")
    assert gone.state == "DELETED" and gone.delete_time is not None and gone.replica_count == 0
    assert "life" not in [d.name.rsplit("/", 1)[1] for d in fw.deployments.list()]
    listed = [d.name.rsplit("/", 1)[1] for d in fw.deployments.list(show_deleted=True)]
    assert "life" in listed
    with pytest.raises(fireworks.NotFoundError):
        fw.deployments.scale("life", replica_count=1)

    back = fw.deployments.undelete("life", body={})
    assert back.state == "CREATING" and back.delete_time is None
    assert plane.wait("life", 1).description == "updated"
    fw.deployments.delete("life", hard=True)
    with pytest.raises(fireworks.NotFoundError):
        fw.deployments.get("life")


def wait_active(plane: Plane, n: int, timeout: float = 30, gauge: str = "active") -> None:
    """Until `n` inference requests are admitted (past their deployment's lookup); `gauge`
    "queued": until `n` wait in the admission queue."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = httpx.get(plane.server.url + "/metrics", timeout=10).text
        line = next(x for x in metrics.splitlines() if x.startswith(f"girandole_requests_{gauge} "))
        if float(line.split()[1]) >= n:
            return
        assert time.monotonic() < deadline, line
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["delete", "scale-to-zero", "restart"])
def test_requests_in_flight_end_when_their_deployment_goes(plane, how):
    """A stream and a whole request running on a deployment's engine when it is deleted,
    scaled to zero or restarted (a spec change) end at once with a 503 naming why, instead of
    waiting for tokens that never come (and holding their admission slots)."""
    name = f"going-{how}"
    plane.http("POST", f"/v1/accounts/{ACCOUNT}/deployments", params={"deploymentId": name},
               json={"baseModel": BASE_MODEL})  # fmt: skip
    plane.wait(name, 1)
    body = {
        "model": f"{BASE_MODEL}#accounts/{ACCOUNT}/deployments/{name}",
        "prompt": [1, 5, 9],
        "max_tokens": 8000,
        "ignore_eos": True,
    }
    url = plane.server.url + "/inference/v1/completions"
    headers = {"Authorization": f"Bearer {plane.key}"}
    whole: list[httpx.Response] = []

    def send_whole() -> None:
        whole.append(httpx.post(url, json=body, headers=headers, timeout=60))

    waiter = threading.Thread(target=send_whole)
    events: list[str] = []
    with httpx.stream("POST", url, json=body | {"stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        events.append(next(line for line in lines if line.startswith("data: ")))
        waiter.start()
        wait_active(plane, 2)  # the whole request runs too (a fixed sleep may end before it came)
        started = time.monotonic()
        base = f"/v1/accounts/{ACCOUNT}/deployments/{name}"
        if how == "delete":
            assert plane.http("DELETE", base).status_code == 200
        elif how == "scale-to-zero":
            assert plane.http("PATCH", base + ":scale", json={"replicaCount": 0}).is_success
        else:
            assert plane.http("PATCH", base, json={"maxContextLength": 4096}).is_success
        events += [line for line in lines if line.startswith("data: ")]
    waiter.join(30)
    assert time.monotonic() - started < 15
    assert events[-1] != "data: [DONE]" or "error" in events[-2], events[-3:]
    error = json.loads(next(e for e in reversed(events) if '"error"' in e)[6:])["error"]
    assert "deployment was deleted, scaled down or restarted" in error["message"], error
    assert len(events) < 4000  # cut short, not run to its end
    assert whole and whole[0].status_code == 503, whole and whole[0].text
    assert whole[0].json()["error"]["code"] == "UNAVAILABLE"
    assert "send the request again" in whole[0].json()["error"]["message"]
    plane.http("DELETE", f"/v1/accounts/{ACCOUNT}/deployments/{name}", params={"hard": "true"})


def test_a_request_waiting_for_admission_keeps_its_deployment_up(tmp_path):
    """A request queued for an admission slot longer than its deployment's scaleToZeroWindow
    saw the replica scaled away under it (the autoscaler counted only what ran on the replica's
    engine) and, once admitted, was answered 503. A deployment with a request waiting is not
    idle: the replica stays, the request runs, the deployment is READY after."""
    plane = Plane(tmp_path, "--max-concurrent-requests", "1")
    try:
        fw = plane.client()
        for name in ("ahead", "queued"):  # "queued" at min 1: nothing scales it down yet
            fw.deployments.create(base_model=BASE_MODEL, deployment_id=name, min_replica_count=1)
            plane.wait(name, 1)
        url = plane.server.url + "/inference/v1/completions"
        headers = {"Authorization": f"Bearer {plane.key}"}
        body = {"prompt": [1, 5, 9], "max_tokens": 8000, "ignore_eos": True}
        queued: list[httpx.Response] = []

        def send_queued() -> None:
            model = f"{BASE_MODEL}#accounts/{ACCOUNT}/deployments/queued"
            short = body | {"model": model, "max_tokens": 4}
            queued.append(httpx.post(url, json=short, headers=headers, timeout=120))

        waiter = threading.Thread(target=send_queued)
        ahead = body | {"model": f"{BASE_MODEL}#accounts/{ACCOUNT}/deployments/ahead"}
        with httpx.stream("POST", url, json=ahead | {"stream": True}, headers=headers,
                          timeout=120) as r:  # fmt: skip
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it holds the slot
            waiter.start()
            wait_active(plane, 1, gauge="queued")
            # the shortest window there is: idle for any time at all, it scales to zero
            patched = plane.http(
                "PATCH",
                f"/v1/accounts/{ACCOUNT}/deployments/queued",
                json={"minReplicaCount": 0, "autoscalingPolicy": {"scaleToZeroWindow": "0s"}},
            )
            assert patched.is_success, patched.text
            # the autoscaler looks every second: give it a few looks while the request waits
            # (8000 tokens of the request ahead take longer here than these 3 s)
            deadline = time.monotonic() + 3
            for _ in lines:
                assert fw.deployments.get("queued").replica_count == 1
                if time.monotonic() > deadline:
                    break
            assert time.monotonic() > deadline, "the request ahead ended before the autoscaler"
        waiter.join(60)  # the stream closed: its slot goes to the queued request
        assert queued and queued[0].status_code == 200, queued and queued[0].text
        assert len(queued[0].json()["choices"][0]["text"]) > 0
        assert fw.deployments.get("queued").state == "READY"
    finally:
        stop_server(plane.server)


def test_list_pages_filters_and_orders(plane):
    fw = plane.client()
    for i, name in enumerate(["list-b", "list-a", "list-c"]):
        fw.deployments.create(
            base_model=BASE_MODEL,
            deployment_id=name,
            display_name=f"n{i}",
            disable_auto_deploy=True,  # no replica: min 0
        )
    ids = [d.name.rsplit("/", 1)[1] for d in fw.deployments.list(page_size=1)]  # 3 pages
    assert [i for i in ids if i.startswith("list-")] == ["list-b", "list-a", "list-c"]

    page = plane.http("GET", f"/v1/accounts/{ACCOUNT}/deployments", params={"pageSize": 2}).json()
    assert len(page["deployments"]) == 2 and page["nextPageToken"]
    assert page["totalSize"] == len(ids)

    by_name = fw.deployments.list(order_by="name desc", filter='name:"list-"')
    assert [d.name.rsplit("/", 1)[1] for d in by_name] == ["list-c", "list-b", "list-a"]
    one = fw.deployments.list(filter='displayName = "n1" AND state = READY')
    assert [d.name.rsplit("/", 1)[1] for d in one] == ["list-a"]
    either = fw.deployments.list(filter="display_name=n0 OR display_name=n2", order_by="name")
    assert [d.name.rsplit("/", 1)[1] for d in either] == ["list-b", "list-c"]
    masked = plane.http(
        "GET", f"/v1/accounts/{ACCOUNT}/deployments/list-a", params={"readMask": "name,state"}
    ).json()
    assert masked == {"name": f"accounts/{ACCOUNT}/deployments/list-a", "state": "READY"}
    for name in ["list-a", "list-b", "list-c"]:
        fw.deployments.delete(name, hard=True)


@pytest.mark.parametrize(
    "body, query, param, words",
    [
        ({"baseModel": BASE_MODEL, "maxReplicaCount": 2}, {}, "maxReplicaCount", "Ray"),
        ({"baseModel": BASE_MODEL, "minReplicaCount": 2}, {}, "minReplicaCount", "Ray"),
        (
            # an AMD type: never this server's, on the CPU machine or an NVIDIA one
            {"baseModel": BASE_MODEL, "acceleratorType": "AMD_MI300X_192GB"},
            {},
            "acceleratorType",
            "not available on this server",
        ),
        ({"baseModel": BASE_MODEL, "precision": "FP8"}, {}, "precision", "cannot be honoured"),
        ({"baseModel": BASE_MODEL, "draftModel": "x"}, {}, "draftModel", "not a model"),
        (
            {"baseModel": BASE_MODEL, "ngramSpeculationLength": 3, "draftModel": "tiny-llama"},
            {},
            "ngramSpeculationLength",
            "mutually exclusive",
        ),
        (
            {"baseModel": BASE_MODEL, "ngramSpeculationLength": -1},
            {},
            "ngramSpeculationLength",
            "from 0 to 32",
        ),
        ({"baseModel": BASE_MODEL, "draftTokenCount": 0}, {}, "draftTokenCount", "from 1 to 32"),
        ({"baseModel": BASE_MODEL, "draftTokenCount": "4"}, {}, "draftTokenCount", "integer"),
        (
            {"baseModel": BASE_MODEL, "draftModel": "tiny-llama"},
            {"disableSpeculativeDecoding": "true"},
            "disableSpeculativeDecoding",
            "draftModel",
        ),
        ({"baseModel": BASE_MODEL, "enableMtp": True}, {}, "enableMtp", "not supported"),
        ({"baseModel": BASE_MODEL, "colour": "red"}, {}, "colour", "Extra inputs"),
        ({"baseModel": BASE_MODEL, "minReplicaCount": "1"}, {}, "minReplicaCount", "integer"),
        (
            {"baseModel": BASE_MODEL, "autoscalingPolicy": {"scaleUpWindow": "soon"}},
            {},
            "autoscalingPolicy.scaleUpWindow",
            "not a duration",
        ),
        (
            {"baseModel": BASE_MODEL, "autoscalingPolicy": {"scaleDownWindow": "2h"}},
            {},
            "autoscalingPolicy.scaleDownWindow",
            "at most 3600s",
        ),
        (
            {"baseModel": BASE_MODEL, "autoscalingPolicy": {"scaleToZeroWindow": "\u0661\u0660s"}},
            {},
            "autoscalingPolicy.scaleToZeroWindow",
            "not a duration",
        ),
        (
            {"baseModel": BASE_MODEL, "autoscalingPolicy": {"scaleToZeroWindow": "9" * 400 + "h"}},
            {},
            "autoscalingPolicy.scaleToZeroWindow",
            "longer than",
        ),
        ({"baseModel": BASE_MODEL, "maxContextLength": 2**63}, {}, "maxContextLength", "0 to"),
        (
            {"baseModel": BASE_MODEL, "autoscalingPolicy": {"loadTargets": {"gpu": 1}}},
            {},
            "autoscalingPolicy.loadTargets",
            "Unknown load target",
        ),
        ({"baseModel": "accounts/acme/models/nope"}, {}, "baseModel", "girandole models add"),
        ({"baseModel": "accounts/other/models/x"}, {}, "baseModel", "not a model"),
        ({}, {}, "baseModel", "required"),
        ({"baseModel": BASE_MODEL}, {"deploymentId": "Bad_Id"}, "deploymentId", "not valid"),
        (
            {"baseModel": BASE_MODEL, "minReplicaCount": 1, "maxReplicaCount": 0},
            {},
            "minReplicaCount",
            "above maxReplicaCount",
        ),
    ],
)
def test_create_refusals(plane, body, query, param, words):
    r = plane.http("POST", f"/v1/accounts/{ACCOUNT}/deployments", json=body, params=query)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_other_refusals(plane):
    base = f"/v1/accounts/{ACCOUNT}/deployments"
    fw = plane.client()
    fw.deployments.create(base_model="tiny-llama", deployment_id="taken", disable_auto_deploy=True)
    r = plane.http("POST", base, json={"baseModel": BASE_MODEL}, params={"deploymentId": "taken"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "ALREADY_EXISTS"
    # the server's own deployment is not the control plane's to take
    r = plane.http(
        "POST", base, json={"baseModel": BASE_MODEL}, params={"deploymentId": "tiny-eos"}
    )
    assert r.status_code == 409, r.text
    r = plane.http("PATCH", base + "/taken:scale", json={"replicaCount": 2})
    assert r.status_code == 400 and "Ray" in r.json()["error"]["message"]
    r = plane.http("PATCH", base + "/taken:scale", json={"replicaCount": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "replicaCount"
    r = plane.http("PATCH", base + "/taken", json={"baseModel": "accounts/fireworks/models/x"})
    assert r.status_code == 400 and "cannot change" in r.json()["error"]["message"]
    r = plane.http("POST", base + "/taken:undelete", json={})
    assert r.status_code == 400 and "not deleted" in r.json()["error"]["message"]
    for method, path in [("GET", "/nope"), ("DELETE", "/nope"), ("PATCH", "/nope:scale")]:
        r = plane.http(method, base + path, json={} if method == "PATCH" else None)
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", r.text
    for params in [{"filter": "state ~ READY"}, {"filter": "colour = red"}, {"orderBy": "x"}]:
        r = plane.http("GET", base, params=params)
        assert r.status_code == 400, (params, r.text)
    r = plane.http("GET", base, params={"pageToken": "garbage"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pageToken"
    # a query parameter of the wrong type is named by its name (param was null)
    for params, name in [({"pageSize": "abc"}, "pageSize"), ({"validateOnly": "maybe"},
                                                               "validateOnly")]:  # fmt: skip
        method = "GET" if name == "pageSize" else "POST"
        r = plane.http(method, base, params=params, json={"baseModel": BASE_MODEL})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
        assert f"query.{name}" in r.json()["error"]["message"]
    r = plane.http("POST", base, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    fw.deployments.delete("taken", hard=True)


SPEC_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def main():\n    return 42\ndef main():\n",
    "0123456789 0123456789 01234",
]


def complete_all(plane: Plane, deployment_id: str) -> tuple[list[str], list[float | None]]:
    """Greedy answers of a deployment to SPEC_PROMPTS, and each one's speculation-acceptance
    from perf_metrics (None: nothing was proposed)."""
    texts, acceptance = [], []
    for prompt in SPEC_PROMPTS:
        body = {"model": f"{BASE_MODEL}#accounts/{ACCOUNT}/deployments/{deployment_id}",
                "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "perf_metrics_in_response": True}  # fmt: skip
        r = plane.http("POST", "/inference/v1/completions", json=body)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
        acceptance.append(r.json()["perf_metrics"].get("speculation-acceptance"))
    return texts, acceptance


def test_speculation_per_deployment(plane):
    """ngramSpeculationLength and draftModel per deployment (the server runs none): the same
    greedy answers as a deployment without them, with speculation in perf_metrics; shown on GET,
    changed by PATCH (the replica restarts with them)."""
    fw = plane.client()
    base = f"/v1/accounts/{ACCOUNT}/deployments"
    fw.deployments.create(base_model=BASE_MODEL, deployment_id="spec")
    created = fw.deployments.create(
        base_model=BASE_MODEL, deployment_id="spec-ngram", ngram_speculation_length=4
    )
    assert created.ngram_speculation_length == 4 and created.draft_model is None
    plane.wait("spec", 1)
    plain, acceptance = complete_all(plane, "spec")
    assert acceptance == [None] * len(SPEC_PROMPTS)  # the server's flags: no speculation
    plane.wait("spec-ngram", 1)
    assert fw.deployments.get("spec-ngram").ngram_speculation_length == 4
    texts, acceptance = complete_all(plane, "spec-ngram")
    assert texts == plain and sum(a or 0 for a in acceptance) > 0, acceptance

    # the model as its own draft (its short name resolved to the account's model)
    r = plane.http("PATCH", base + "/spec", json={"draftModel": "tiny-llama", "draftTokenCount": 3})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "UPDATING"
    assert (r.json()["draftModel"], r.json()["draftTokenCount"]) == (BASE_MODEL, 3)
    plane.wait("spec", 1)
    texts, acceptance = complete_all(plane, "spec")
    assert texts == plain and all(a is not None and a > 0.9 for a in acceptance), acceptance
    got = plane.http("GET", base + "/spec").json()
    assert (got["draftModel"], got["draftTokenCount"]) == (BASE_MODEL, 3)
    assert "ngramSpeculationLength" not in got

    # exclusive on PATCH too; 0 turns the n-gram lookup off
    r = plane.http("PATCH", base + "/spec", json={"ngramSpeculationLength": 2})
    assert r.status_code == 400 and "mutually exclusive" in r.json()["error"]["message"]
    r = plane.http("PATCH", base + "/spec-ngram", json={"ngramSpeculationLength": 0})
    assert r.status_code == 200 and r.json()["ngramSpeculationLength"] == 0
    plane.wait("spec-ngram", 1)
    texts, acceptance = complete_all(plane, "spec-ngram")
    assert texts == plain and acceptance == [None] * len(SPEC_PROMPTS)
    for deployment_id in ("spec", "spec-ngram"):
        fw.deployments.delete(deployment_id, hard=True)


SHAPES = f"accounts/{ACCOUNT}/deploymentShapes"


def test_deployment_shapes_sdk(plane):
    """The built-in shapes through the SDK's deployment_shapes and deployment_shape_versions:
    three per base model, in the model's account (the public catalog's under fireworks)."""
    fw = plane.client()
    shapes = {s.name: s for s in fw.deployment_shapes.list()}
    presets = ("minimal", "fast", "throughput")
    for model in ("tiny-llama", "tiny-eos"):  # the catalog's model and the server's own
        assert {f"{SHAPES}/{model}-{p}" for p in presets} <= set(shapes), sorted(shapes)
    fast = shapes[f"{SHAPES}/tiny-llama-fast"]
    assert (fast.base_model, fast.preset_type) == (BASE_MODEL, "FAST")
    assert (fast.ngram_speculation_length, fast.draft_model) == (4, "")
    assert shapes[f"{SHAPES}/tiny-llama-minimal"].max_context_length == 4096
    throughput = shapes[f"{SHAPES}/tiny-llama-throughput"]
    assert (throughput.max_context_length, throughput.ngram_speculation_length) == (0, 0)
    # this machine's accelerator (the server's): none on a CPU, and a deployment on the shape
    # takes it (a create naming it is judged against the same hardware)
    assert fast.accelerator_type == detect_hardware().accelerator_type

    targeted = fw.deployment_shapes.list(target_model="tiny-llama", page_size=2)
    assert [s.name for s in targeted] == [f"{SHAPES}/tiny-llama-{p}" for p in sorted(presets)]
    public = [s.name for s in fw.deployment_shapes.list(account_id="fireworks")]
    assert "accounts/fireworks/deploymentShapes/gemma-3-270m-fast" in public
    assert all(name.startswith("accounts/fireworks/") for name in public)

    inference = plane.client(inference=True)  # under /inference/v1 too
    assert inference.deployment_shapes.get("tiny-llama-fast") == fast
    versions = list(fw.deployment_shape_versions.list("tiny-llama-fast"))
    assert [v.name for v in versions] == [f"{SHAPES}/tiny-llama-fast/versions/1"]
    version = fw.deployment_shape_versions.get("1", deployment_shape_id="tiny-llama-fast")
    assert version.validated and version.latest_validated and not version.public
    snapshot = version.snapshot
    assert (snapshot.name, snapshot.ngram_speculation_length) == (fast.name, 4)

    matched = fw.deployment_shape_versions.match_for_model(BASE_MODEL, enable_addons=True)
    assert matched.total_size == 3 and {
        v.snapshot.name for v in matched.deployment_shape_versions
    } == {f"{SHAPES}/tiny-llama-{p}" for p in presets}
    # the deployment's own fields narrow the match: n-gram speculation on is the FAST one only
    create = {"parent": f"accounts/{ACCOUNT}",
              "deployment": {"base_model": BASE_MODEL, "ngramSpeculationLength": 4}}  # fmt: skip
    matched = fw.deployment_shape_versions.match(create_deployment_request=create)
    assert [v.snapshot.preset_type for v in matched.deployment_shape_versions] == ["FAST"]


def test_deployment_shape_refusals(plane):
    base = f"/v1/accounts/{ACCOUNT}"
    for path, status in [
        (f"{base}/deploymentShapes/nope", 404),
        (f"{base}/deploymentShapes/tiny-llama-fast/versions/2", 404),
        (f"{base}/deploymentShapes/nope/versions", 404),
        (f"{base}/deploymentShapes?targetModel=accounts/other/models/x", 400),
        (f"{base}/deploymentShapes?filter=colour%3Dred", 400),
    ]:
        r = plane.http("GET", path)
        assert r.status_code == status, (path, r.text)
    r = plane.http("GET", f"{base}/deploymentShapes", key=plane.other_key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "PERMISSION_DENIED"
    r = plane.http("GET", "/v1/accounts/fireworks/deploymentShapes", key=plane.other_key)
    assert r.status_code == 200 and r.json()["totalSize"] == 3  # the public catalog's
    match = base + "/deploymentShapeVersions:match"
    for body, param in [
        ({"createDeploymentRequest": {"parent": "accounts/other",
                                      "deployment": {"baseModel": BASE_MODEL}}},
         "createDeploymentRequest.parent"),
        ({"createDeploymentRequest": {"parent": f"accounts/{ACCOUNT}",
                                      "deployment": {"baseModel": "accounts/other/models/x"}}},
         "createDeploymentRequest.deployment.baseModel"),
        ({"createDeploymentRequest": {"parent": f"accounts/{ACCOUNT}", "deployment": {}}},
         "createDeploymentRequest.deployment.baseModel"),
    ]:  # fmt: skip
        r = plane.http("POST", match, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # deployments naming a shape they may not use
    for shape, field, words in [
        ("nope", "deploymentShape", "not a deployment shape"),
        ("accounts/other/deploymentShapes/tiny-llama-fast", "deploymentShape", "may use"),
        (f"{SHAPES}/tiny-eos-fast", "deploymentShape", "not of the deployment's baseModel"),
        (f"{SHAPES}/tiny-llama-fast/versions/2", "deploymentShape", "only version is 1"),
    ]:
        r = plane.http("POST", base + "/deployments", json={"baseModel": BASE_MODEL,
                                                            "deploymentShape": shape})  # fmt: skip
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and words in error["message"], error
    # a field that contradicts the shape: a 400 naming it, unless skipShapeValidation
    body = {"baseModel": BASE_MODEL, "deploymentShape": "tiny-llama-fast",
            "ngramSpeculationLength": 2}  # fmt: skip
    r = plane.http("POST", base + "/deployments", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "ngramSpeculationLength"
    assert "contradicts" in r.json()["error"]["message"]
    r = plane.http("POST", base + "/deployments", json=body,
                   params={"validateOnly": "true", "skipShapeValidation": "true"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["ngramSpeculationLength"] == 2
    assert r.json()["deploymentShape"] == f"{SHAPES}/tiny-llama-fast/versions/1"
    # "default": the base model's THROUGHPUT shape
    r = plane.http("POST", base + "/deployments", params={"validateOnly": "true"},
                   json={"baseModel": BASE_MODEL, "deploymentShape": "default"})  # fmt: skip
    assert r.json()["deploymentShape"] == f"{SHAPES}/tiny-llama-throughput/versions/1", r.text


def test_deployments_on_shapes(plane):
    """A deployment made on the FAST shape speculates (speculation-acceptance in perf_metrics);
    one on the MINIMAL shape has its 4096-token context; a PATCH onto another shape takes
    that shape's fields, and one that contradicts the shape is a 400."""
    fw = plane.client()
    fast = fw.deployments.create(
        base_model=BASE_MODEL,
        deployment_id="shape-fast",
        deployment_shape=f"{SHAPES}/tiny-llama-fast",
    )
    assert fast.deployment_shape == f"{SHAPES}/tiny-llama-fast/versions/1"
    assert (fast.ngram_speculation_length, fast.draft_model) == (4, "")
    minimal = fw.deployments.create(
        base_model=BASE_MODEL, deployment_id="shape-min", deployment_shape="tiny-llama-minimal"
    )
    assert minimal.max_context_length == 4096 and minimal.ngram_speculation_length == 0
    plane.wait("shape-fast", 1)
    _, acceptance = complete_all(plane, "shape-fast")
    assert sum(a or 0 for a in acceptance) > 0, acceptance
    plane.wait("shape-min", 1)
    body = {"model": f"{BASE_MODEL}#accounts/{ACCOUNT}/deployments/shape-min",
            "prompt": [5] * 4100, "max_tokens": 1}  # fmt: skip
    r = plane.http("POST", "/inference/v1/completions", json=body)
    assert r.status_code == 400 and "limit of 4096 tokens" in r.text, r.text  # the model: 8192

    base = f"/v1/accounts/{ACCOUNT}/deployments"
    r = plane.http("PATCH", base + "/shape-fast", json={"ngramSpeculationLength": 2})
    assert r.status_code == 400 and "contradicts" in r.json()["error"]["message"], r.text
    r = plane.http("PATCH", base + "/shape-fast", json={"ngramSpeculationLength": 2},
                   params={"skipShapeValidation": "true"})  # fmt: skip
    assert r.status_code == 200 and r.json()["ngramSpeculationLength"] == 2, r.text
    got = fw.deployments.get("shape-fast")  # echoing a GET back changes nothing: no 400
    r = plane.http("PATCH", base + "/shape-fast", json=got.to_dict())
    assert r.status_code == 200 and r.json()["ngramSpeculationLength"] == 2, r.text
    r = plane.http("PATCH", base + "/shape-fast",
                   json={"deploymentShape": f"{SHAPES}/tiny-llama-throughput"})  # fmt: skip
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["deploymentShape"] == f"{SHAPES}/tiny-llama-throughput/versions/1"
    assert (got["ngramSpeculationLength"], got["maxContextLength"]) == (0, 0)
    plane.wait("shape-fast", 1)  # restarted with the model's full context: the prompt fits
    body["model"] = f"{BASE_MODEL}#accounts/{ACCOUNT}/deployments/shape-fast"
    r = plane.http("POST", "/inference/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for deployment_id in ("shape-fast", "shape-min"):
        fw.deployments.delete(deployment_id, hard=True)


def test_draft_model_refusals(plane):
    """A draftModel of another account, one with another vocabulary, a path: 400s naming
    draftModel, before anything loads. The two models are gone after it (other tests list the
    plane's models)."""
    from girandole.registry.models import ModelCatalog

    source = plane.tmp / "tiny-llama"
    wide = plane.tmp / "tiny-wide"  # config.json says another vocabulary (never loaded)
    wide.mkdir(exist_ok=True)
    for f in source.iterdir():
        (wide / f.name).write_bytes(f.read_bytes())
    config = json.loads((wide / "config.json").read_text())
    config["vocab_size"] += 64
    (wide / "config.json").write_text(json.dumps(config))
    db = Database.in_folder(plane.data)
    catalog = ModelCatalog(db, [])
    added = {"accounts/other/models/private": source, f"accounts/{ACCOUNT}/models/tiny-wide": wide}
    for name, path in added.items():
        catalog.add(name, str(path))
    try:
        base = f"/v1/accounts/{ACCOUNT}/deployments"
        before = plane.http("GET", base).json()["totalSize"]
        for draft, words in [
            ("accounts/other/models/private", "not a model"),
            ("tiny-wide", "vocabulary"),
            (str(source), "not a model"),
        ]:
            r = plane.http("POST", base, json={"baseModel": BASE_MODEL, "draftModel": draft})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "draftModel" and words in error["message"], error
        assert plane.http("GET", base).json()["totalSize"] == before  # nothing was created
    finally:
        for name in added:
            catalog.remove(name)
        db.close()


def test_keys_manage_their_own_account(plane):
    r = plane.http("GET", f"/v1/accounts/{ACCOUNT}/deployments", key="")
    assert r.status_code == 401
    r = plane.http("GET", f"/v1/accounts/{ACCOUNT}/deployments", key="gk_nope_nope")
    assert r.status_code == 401
    r = plane.http("GET", f"/v1/accounts/{ACCOUNT}/deployments", key=plane.other_key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "PERMISSION_DENIED"
    r = plane.http(
        "POST",
        f"/inference/v1/accounts/{ACCOUNT}/deployments",
        key=plane.other_key,
        json={"baseModel": BASE_MODEL},
    )
    assert r.status_code == 403
    # the other account can deploy public models only, not acme's
    r = plane.http(
        "POST", "/v1/accounts/other/deployments", key=plane.other_key,
        json={"baseModel": BASE_MODEL}, params={"disableAutoDeploy": "true"},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "baseModel"
    r = plane.http(
        "POST", "/v1/accounts/other/deployments", key=plane.other_key,
        json={"baseModel": "accounts/fireworks/models/gemma-3-270m"},
        params={"validateOnly": "true"},
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["name"].startswith("accounts/other/deployments/")
    assert (
        plane.http("GET", "/v1/accounts/other/deployments", key=plane.other_key).json()[
            "deployments"
        ]
        == []
    )  # validateOnly created nothing

    # the model catalog: the public one for every key, an account's own for its keys
    public = plane.http("GET", "/v1/accounts/fireworks/models", key=plane.other_key).json()
    assert [m["name"] for m in public["models"]] == ["accounts/fireworks/models/gemma-3-270m"]
    own = plane.http("GET", f"/inference/v1/accounts/{ACCOUNT}/models").json()
    assert {m["name"] for m in own["models"]} == {BASE_MODEL, f"accounts/{ACCOUNT}/models/tiny-eos"}
    assert plane.http("GET", f"/v1/accounts/{ACCOUNT}/models/tiny-llama").json()["name"] == (
        BASE_MODEL
    )
    r = plane.http("GET", f"/v1/accounts/{ACCOUNT}/models", key=plane.other_key)
    assert r.status_code == 403
    assert plane.http("GET", f"/v1/accounts/{ACCOUNT}/models/nope").status_code == 404


def test_cli(plane):
    env = {
        "GIRANDOLE_BASE_URL": plane.server.url,
        "GIRANDOLE_API_KEY": plane.key,
        "GIRANDOLE_ACCOUNT": ACCOUNT,
    }
    created = girandole(
        "deployment", "create", "tiny-llama", "--deployment-id", "cli", "--min-replica-count", "0",
        "--max-replica-count", "1", "--scale-up-window", "20s", "--scale-down-window", "1m",
        "--scale-to-zero-window", "2h", "--load-targets", "default=0.5,requests_per_second=3",
        "--ngram-speculation-length", "3", "--wait", "--json", env=env,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    d = json.loads(created.stdout)
    assert d["state"] == "READY" and d["replicaCount"] == 1
    assert d["ngramSpeculationLength"] == 3
    assert d["autoscalingPolicy"] == {
        "scaleUpWindow": "20s",
        "scaleDownWindow": "60s",
        "scaleToZeroWindow": "7200s",
        "loadTargets": {"default": 0.5, "requests_per_second": 3.0},
    }
    listed = girandole("deployment", "list", env=env)
    assert listed.returncode == 0 and f"accounts/{ACCOUNT}/deployments/cli" in listed.stdout
    shown = girandole("deployment", "get", f"accounts/{ACCOUNT}/deployments/cli", env=env)
    assert "State:" in shown.stdout and "READY" in shown.stdout, shown.stdout
    updated = girandole(
        "deployment", "update", "cli", "--display-name", "from cli", "--json", env=env
    )
    assert json.loads(updated.stdout)["displayName"] == "from cli"
    shaped = girandole(
        "deployment", "update", "cli", "--deployment-shape", "tiny-llama-fast",
        "--ngram-speculation-length", "5", "--skip-shape-validation", "--json", env=env,
    )  # fmt: skip
    assert shaped.returncode == 0, shaped.stderr
    d = json.loads(shaped.stdout)
    assert (d["deploymentShape"], d["ngramSpeculationLength"]) == (
        f"{SHAPES}/tiny-llama-fast/versions/1",
        5,
    )
    shown = girandole("deployment", "get", "cli", env=env)
    assert f"{SHAPES}/tiny-llama-fast/versions/1" in shown.stdout, shown.stdout
    scaled = girandole("deployment", "scale", "cli", "--replica-count", "0", "--wait", env=env)
    assert scaled.returncode == 0, scaled.stderr
    assert plane.client().deployments.get("cli").replica_count == 0
    refused = girandole("deployment", "scale", "cli", "--replica-count", "2", env=env)
    assert refused.returncode == 1 and "Ray" in refused.stderr and "HTTP 400" in refused.stderr
    deleted = girandole("deployment", "delete", "cli", env=env)
    assert deleted.returncode == 0
    assert plane.client().deployments.get("cli").state == "DELETED"
    undeleted = girandole("deployment", "undelete", "cli", "--json", env=env)
    assert json.loads(undeleted.stdout)["state"] == "CREATING"
    assert girandole("deployment", "delete", "cli", "--hard", env=env).returncode == 0
    missing = girandole("deployment", "get", "cli", env=env)
    assert missing.returncode == 1 and "not found" in missing.stderr
    bad = girandole("deployment", "create", "tiny-llama", "--load-targets", "oops", env=env)
    assert bad.returncode == 2 and "key=value" in bad.stderr
    away = girandole("deployment", "list", env={**env, "GIRANDOLE_BASE_URL": "http://127.0.0.1:9"})
    assert away.returncode == 1 and "cannot reach" in away.stderr


def test_restart_brings_deployments_back(tmp_path):
    plane = Plane(tmp_path)
    try:
        fw = plane.client()
        fw.deployments.create(base_model=BASE_MODEL, deployment_id="kept", display_name="k")
        plane.wait("kept", 1)
        fw.deployments.create(base_model=BASE_MODEL, deployment_id="zero")
        plane.wait("zero", 1)
        fw.deployments.scale("zero", replica_count=0)
        fw.deployments.create(base_model=BASE_MODEL, deployment_id="gone")
        fw.deployments.delete("gone")
        stop_server(plane.server)

        plane.server = plane.start()
        fw = plane.client()
        kept = plane.wait("kept", 1)  # its replica started again
        assert kept.display_name == "k" and kept.replica_count == 1
        zero = fw.deployments.get("zero")
        assert zero.state == "READY" and zero.desired_replica_count == 0
        assert zero.replica_count == 0
        assert fw.deployments.get("gone").state == "DELETED"
        names = {d.name.rsplit("/", 1)[1] for d in fw.deployments.list(show_deleted=True)}
        assert names == {"kept", "zero", "gone"}
    finally:
        stop_server(plane.server)


def test_models_list_filters_orders_and_masks(plane):
    """ListModels' filter, orderBy and readMask were ignored: every model came back, in the
    catalog's order, with every field (a filter on kind listed the other kinds too)."""
    fw = plane.client()
    eos = f"accounts/{ACCOUNT}/models/tiny-eos"
    assert [m.name for m in fw.models.list(order_by="name desc")] == [BASE_MODEL, eos]
    assert [m.name for m in fw.models.list()] == [eos, BASE_MODEL]  # by name, as Fireworks
    assert [m.name for m in fw.models.list(filter='displayName = "tiny-eos"')] == [eos]
    assert list(fw.models.list(filter="kind = HF_PEFT_ADDON")) == []
    path = f"/v1/accounts/{ACCOUNT}/models"
    masked = plane.http("GET", path, params={"readMask": "name,kind"}).json()["models"]
    assert masked == [
        {"name": eos, "kind": "HF_BASE_MODEL"},
        {"name": BASE_MODEL, "kind": "HF_BASE_MODEL"},
    ]
    one = plane.http("GET", path + "/tiny-eos", params={"readMask": "display_name"}).json()
    assert one == {"displayName": "tiny-eos"}
    for params, param in (
        ({"filter": "bogus = 1"}, "filter"),
        ({"orderBy": "bogus"}, "orderBy"),
        ({"readMask": "bogus"}, "readMask"),
    ):
        r = plane.http("GET", path, params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_dataset_list_queries_do_not_depend_on_what_the_list_holds(plane):
    """A datasets list checked its filter, orderBy and readMask against the fields of the
    datasets it held: with none, an orderBy on a Dataset field was a 400 and a bad filter a
    200; with some, a readMask naming no field answered empty objects instead of a 400."""
    key, path = plane.other_key, "/v1/accounts/other/datasets"

    def code(params: dict) -> tuple[int, str | None]:
        r = plane.http("GET", path, key=key, params=params)
        return r.status_code, r.json()["error"]["param"] if r.status_code != 200 else None

    def check() -> None:
        assert code({"orderBy": "exampleCount desc"}) == (200, None)
        assert code({"filter": 'format = "CHAT"'}) == (200, None)
        assert code({"filter": "bogus = 1"}) == (400, "filter")
        assert code({"orderBy": "bogus"}) == (400, "orderBy")
        assert code({"readMask": "bogus"}) == (400, "readMask")

    check()  # no datasets
    body = {"datasetId": "queries", "dataset": {"format": "CHAT"}}
    assert plane.http("POST", path, key=key, json=body).status_code == 200
    try:
        check()
        got = plane.http("GET", path + "/queries", key=key, params={"readMask": "bogus"})
        assert got.status_code == 400 and got.json()["error"]["param"] == "readMask"
        listed = plane.http("GET", path, key=key, params={"readMask": "name,format"}).json()
        assert listed["datasets"] == [{"name": "accounts/other/datasets/queries", "format": "CHAT"}]
        # an update's body is the Dataset: its 400s name the field as sent, not `dataset.<f>`
        for field, value in (("format", "NOPE"), ("externalUrl", "gs://b/f.jsonl")):
            r = plane.http("PATCH", path + "/queries", key=key, json={field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    finally:
        plane.http("DELETE", path + "/queries", key=key)


def test_validate_only_refuses_a_taken_id_as_the_create_would(plane):
    """validateOnly answered 200 for a deploymentId that was taken (showing the live
    deployment's replicas), or soft-deleted, where the create itself is a 409."""
    base = f"/v1/accounts/{ACCOUNT}/deployments"
    fw = plane.client()
    fw.deployments.create(base_model=BASE_MODEL, deployment_id="vo-live", disable_auto_deploy=True)
    fw.deployments.create(base_model=BASE_MODEL, deployment_id="vo-gone", disable_auto_deploy=True)
    fw.deployments.delete("vo-gone")
    try:
        for taken, words in (("vo-live", "another deploymentId"), ("vo-gone", "undelete")):
            params = {"deploymentId": taken, "validateOnly": "true"}
            r = plane.http("POST", base, json={"baseModel": BASE_MODEL}, params=params)
            assert r.status_code == 409 and words in r.json()["error"]["message"], r.text
        params = {"deploymentId": "vo-free", "validateOnly": "true"}
        r = plane.http("POST", base, json={"baseModel": BASE_MODEL}, params=params)
        assert (
            r.status_code == 200 and r.json()["name"] == f"accounts/{ACCOUNT}/deployments/vo-free"
        )
        assert plane.http("GET", base + "/vo-free").status_code == 404
    finally:
        fw.deployments.delete("vo-live", hard=True)
        fw.deployments.delete("vo-gone", hard=True)


def test_int64_fields_written_as_strings_filter_and_sort_as_numbers(plane):
    """A Dataset's exampleCount is an int64, which proto JSON writes as a string ("10"):
    filters compared it to numbers as text ("10" > 5 was false) and orderBy sorted it as text
    ("10" before "2")."""
    key, path = plane.other_key, "/v1/accounts/other/datasets"
    sizes = {"two-lines": 2, "ten-lines": 10}
    for name, lines in sizes.items():
        body = {"datasetId": name, "dataset": {"format": "CHAT"}}
        assert plane.http("POST", path, key=key, json=body).status_code == 200
        rows = "".join(
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
            for _ in range(lines)
        )
        files = {"file": ("in.jsonl", rows.encode())}
        r = plane.http("POST", f"{path}/{name}:upload", key=key, files=files)
        assert r.status_code == 200, r.text
    try:

        def names(params: dict) -> list[str]:
            params = {**params, "readMask": "name,exampleCount"}
            listed = plane.http("GET", path, key=key, params=params).json()["datasets"]
            return [d["name"].rsplit("/", 1)[1] for d in listed]

        assert names({"filter": "exampleCount > 5"}) == ["ten-lines"]
        assert names({"filter": 'exampleCount >= "3"'}) == ["ten-lines"]
        assert names({"filter": "exampleCount = 2"}) == ["two-lines"]
        assert names({"orderBy": "exampleCount desc"}) == ["ten-lines", "two-lines"]
        assert names({"orderBy": "exampleCount"}) == ["two-lines", "ten-lines"]
    finally:
        for name in sizes:
            plane.http("DELETE", f"{path}/{name}", key=key)


class InProcessPlane(Plane):
    """The Plane's server as the app `girandole serve` builds, on uvicorn in this process: the
    test reaches the deployments' real engines through the app's own objects."""

    def start(self):
        from loopback import serve_in_thread

        from girandole.api.app import create_app
        from girandole.api.server import add_serve_parser, settings_from_args
        from girandole.api.state import AppState

        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        args = parser.parse_args(
            ["serve", "--model", str(self.eos), "--model-id", "tiny-eos", "--account", ACCOUNT,
             "--kv-cache-gb", "0.01", "--data-dir", str(self.data), *self.serve_args]
        )  # fmt: skip
        self.app = create_app(AppState(settings_from_args(args)))
        self.uvicorn, self.thread, url = serve_in_thread(self.app, timeout=120)
        return SimpleNamespace(url=url)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def test_a_deployment_whose_engine_died_serves_again(tmp_path):
    """A deployment's replica whose engine loop ended kept the deployment READY with one
    replica while every request to it failed (only a Ray replica was health-checked). The
    server replaces it within a few ticks: a request is a 200 again, the deployment READY."""
    plane = InProcessPlane(tmp_path)
    name = f"accounts/{ACCOUNT}/deployments/dies"
    try:
        plane.http("POST", f"/v1/accounts/{ACCOUNT}/deployments", params={"deploymentId": "dies"},
                   json={"baseModel": BASE_MODEL})  # fmt: skip
        plane.wait("dies", 1)
        backend = plane.app.state.deployments.backend
        (dead,) = backend.engines(name)
        dead.shutdown()  # its loop's thread ends, as when the engine dies
        body = {"model": f"{BASE_MODEL}#{name}", "prompt": [1, 5, 9], "max_tokens": 4}
        deadline = time.monotonic() + 60
        while (r := plane.http("POST", "/inference/v1/completions", json=body)).status_code != 200:
            assert r.status_code == 503, r.text  # the dead engine's, then a scale-up's
            assert time.monotonic() < deadline, (r.text, plane.http("GET", f"/v1/{name}").text)
            time.sleep(0.1)
        assert r.json()["usage"]["completion_tokens"] > 0
        assert plane.wait("dies", 1).replica_count == 1
        (engine,) = backend.engines(name)
        assert engine is not dead  # the dead one is gone
    finally:
        plane.stop()
