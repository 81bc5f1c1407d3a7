"""Who may use the control plane, what `GET /v1/models/{name}` finds, and the per-replica gauges
for routers, against a real `girandole serve` (the tiny EOS model as its own model) with two
embedded deployments of two tiny models in account acme, keys of roles `user` and
`inference-user` and a key of another account; the real openai and fireworks-ai clients and the
`girandole keys` CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import fireworks
import httpx
import openai
import pytest
from api_helpers import api_conftest
from prometheus_client.parser import text_string_to_metric_families

from girandole.registry.keystore import Database

ACCOUNT = "acme"
OWN_MODEL = f"accounts/{ACCOUNT}/models/tiny-eos"
OWN_DEPLOYMENT = f"accounts/{ACCOUNT}/deployments/tiny-eos"
MODEL_A = f"accounts/{ACCOUNT}/models/tiny-a"
MODEL_B = f"accounts/{ACCOUNT}/models/tiny-b"
FIRST = f"accounts/{ACCOUNT}/deployments/first"
SECOND = f"accounts/{ACCOUNT}/deployments/second"
DEPLOYMENTS = f"/v1/accounts/{ACCOUNT}/deployments"
ROUTER_GAUGES = (
    "girandole:num_requests_waiting",
    "girandole:num_requests_running",
    "girandole:kv_cache_usage_perc",
)


def girandole(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "girandole.cli", *args],
        capture_output=True, text=True, env=dict(os.environ), timeout=120,
    )  # fmt: skip


class Plane:
    def __init__(self, tmp: Path) -> None:
        conftest = api_conftest()
        self.conftest = conftest
        self.data = tmp / "data"
        db = Database.in_folder(self.data)
        self.key, _ = db.create_key(ACCOUNT, "admin")
        self.reader_key, self.reader = db.create_key(ACCOUNT, "reader", role="inference-user")
        self.other_key, _ = db.create_key("other")
        db.close()
        root = _root_conftest()
        for name, seed in (("tiny-a", 0), ("tiny-b", 1)):
            path = root.write_tiny_llama(tmp / name, seed=seed, max_position_embeddings=8192)
            added = girandole(
                "models", "add", "--data-dir", str(self.data), "--account", ACCOUNT, name,
                str(path),
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
        eos = conftest.write_eos_model(tmp / "eos")
        self.server = conftest.start_server(
            tmp, "--model", str(eos), "--model-id", "tiny-eos", "--account", ACCOUNT,
            "--kv-cache-gb", "0.01", "--data-dir", str(self.data), api_key=self.key,
        )  # fmt: skip

    def http(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.request(method, self.server.url + path, headers=headers, timeout=60, **kw)

    def openai(self, key: str | None = None, inference: bool = False) -> openai.OpenAI:
        base = self.server.url + ("/inference/v1" if inference else "/v1")
        return openai.OpenAI(api_key=key or self.key, base_url=base, max_retries=0)

    def wait(self, deployment_id: str, ready: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            d = self.http("GET", f"{DEPLOYMENTS}/{deployment_id}").json()
            if d["state"] == "READY" and d["replicaCount"] == ready:
                return d
            assert d["state"] != "FAILED", d
            assert time.monotonic() < deadline, d
            time.sleep(0.2)

    def gauges(self) -> dict[str, dict[tuple[str, str], float]]:
        """The router gauges of /metrics: name -> (deployment, replica) -> value."""
        r = httpx.get(self.server.url + "/metrics", timeout=30)
        assert r.status_code == 200
        found: dict[str, dict[tuple[str, str], float]] = {g: {} for g in ROUTER_GAUGES}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name in found:
                    labels = (sample.labels["deployment"], sample.labels["replica"])
                    found[sample.name][labels] = sample.value
        return found


def _root_conftest():
    """tests/conftest.py (the tiny checkpoint writers), loaded once under a name of its own."""
    name = "_girandole_root_conftest"
    if name not in sys.modules:
        root = Path(__file__).resolve().parents[1] / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, root)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def plane(tmp_path_factory) -> Plane:
    p = Plane(tmp_path_factory.mktemp("access"))
    try:
        for deployment_id, model in (("first", MODEL_A), ("second", MODEL_B)):
            r = p.http(
                "POST", DEPLOYMENTS, params={"deploymentId": deployment_id},
                json={"baseModel": model},
            )  # fmt: skip
            assert r.status_code == 200, r.text
        p.wait("first", 1)
        p.wait("second", 1)
        yield p
    finally:
        p.conftest.stop_server(p.server)


# -- the key's role gates the control plane ---------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1", "/inference/v1"])
@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "", {"baseModel": MODEL_A}),
        ("PATCH", "/first", {"description": "x"}),
        ("PATCH", "/first:scale", {"replicaCount": 0}),
        ("DELETE", "/first", None),
        ("POST", "/first:undelete", {}),
    ],
)
def test_an_inference_user_key_cannot_change_deployments(plane, prefix, method, path, body):
    url = f"{prefix}/accounts/{ACCOUNT}/deployments{path}"
    r = plane.http(method, url, key=plane.reader_key, json=body)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "PERMISSION_DENIED"
    assert "role inference-user" in error["message"] and "role user" in error["message"], error
    d = plane.http("GET", f"{DEPLOYMENTS}/first").json()
    assert d["state"] == "READY" and d["replicaCount"] == 1 and d.get("description", "") == ""


def test_an_inference_user_key_reads_and_runs_inference(plane):
    fw = fireworks.Fireworks(
        api_key=plane.reader_key, account_id=ACCOUNT, base_url=plane.server.url, max_retries=0
    )
    assert {d.name for d in fw.deployments.list()} == {FIRST, SECOND}
    assert fw.deployments.get("first").state == "READY"
    with pytest.raises(fireworks.PermissionDeniedError):
        fw.deployments.create(base_model=MODEL_A, deployment_id="nope")
    with pytest.raises(fireworks.PermissionDeniedError):
        fw.deployments.scale("first", replica_count=0)
    models = plane.http("GET", f"/v1/accounts/{ACCOUNT}/models", key=plane.reader_key).json()
    assert {MODEL_A, MODEL_B} <= {m["name"] for m in models["models"]}
    # shapes are read, :match included (a POST that changes nothing)
    assert f"accounts/{ACCOUNT}/deploymentShapes/tiny-a-fast" in {
        s.name for s in fw.deployment_shapes.list()
    }
    assert fw.deployment_shape_versions.match_for_model(MODEL_A).total_size == 3
    done = plane.openai(plane.reader_key).completions.create(
        model=f"{MODEL_A}#{FIRST}", prompt="hello", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert done.usage.completion_tokens == 3
    # a key of role user still changes deployments; the other account's key still gets 403
    r = plane.http(
        "POST", DEPLOYMENTS, json={"baseModel": MODEL_A}, params={"validateOnly": "true"}
    )
    assert r.status_code == 200, r.text
    r = plane.http("GET", DEPLOYMENTS, key=plane.other_key)
    assert r.status_code == 403 and "belongs to account other" in r.json()["error"]["message"]


def test_the_keys_cli_sets_roles_and_a_running_server_follows(plane):
    data = str(plane.data)
    made = girandole(
        "keys", "create", "--account", ACCOUNT, "--role", "inference-user", "--json",
        "--data-dir", data,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["role"] == "inference-user"
    key, key_id = created["key"], created["id"]
    listed = girandole("keys", "list", "--account", ACCOUNT, "--data-dir", data)
    assert "ROLE" in listed.stdout.splitlines()[0]
    assert any(key_id in line and "inference-user" in line for line in listed.stdout.splitlines())
    validate = {"params": {"validateOnly": "true"}, "json": {"baseModel": MODEL_A}}
    assert plane.http("POST", DEPLOYMENTS, key=key, **validate).status_code == 403
    updated = girandole("keys", "update", key_id, "--role", "user", "--data-dir", data)
    assert updated.returncode == 0 and "role user" in updated.stdout, updated.stderr
    assert plane.http("POST", DEPLOYMENTS, key=key, **validate).status_code == 200
    bad = girandole("keys", "update", key_id, "--role", "root", "--data-dir", data)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = girandole("keys", "update", "nope", "--role", "user", "--data-dir", data)
    assert missing.returncode == 1 and "no live key" in missing.stderr


# -- GET /v1/models/{name} -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        MODEL_A,  # the model's default deployment
        f"{MODEL_A}#{FIRST}",
        f"{MODEL_B}#{SECOND}",
        f"{ACCOUNT}/tiny-b#{ACCOUNT}/second",  # Fireworks' short forms
        FIRST,  # a deployment's name alone
        OWN_MODEL,
        f"{OWN_MODEL}#{OWN_DEPLOYMENT}",
    ],
)
def test_models_retrieve_finds_what_the_key_reaches(plane, name):
    for inference in (False, True):
        model = plane.openai(inference=inference).models.retrieve(name)
        assert model.object == "model" and model.owned_by == ACCOUNT
        assert model.id.startswith("accounts/") and model.id.endswith(name.rsplit("/", 1)[1])
    listed = {m.id: m for m in plane.openai().models.list()}
    if model.id in listed:  # the same entry as /v1/models shows
        assert model.model_dump() == listed[model.id].model_dump()
    # known while a replica runs: the tiny models' 8192 tokens, the EOS model's 1024
    assert model.context_length == (1024 if name.startswith(OWN_MODEL) else 8192)
    with pytest.raises(openai.NotFoundError) as info:  # another account's key: as if absent
        plane.openai(plane.other_key).models.retrieve(name)
    assert info.value.body["code"] == "NOT_FOUND"


def test_models_retrieve_by_raw_path(plane):
    """The `#` of a deployment suffix must travel as %23; the slashes may stay as they are."""
    r = plane.http("GET", f"/inference/v1/models/{MODEL_B}%23{SECOND}")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == f"{MODEL_B}#{SECOND}" and r.json()["object"] == "model"
    r = plane.http("GET", f"/v1/models/{FIRST}", key=plane.reader_key)
    assert r.status_code == 200 and r.json()["id"] == FIRST


@pytest.mark.parametrize(
    "name",
    [
        f"{MODEL_A}#{SECOND}",  # a deployment of another model
        f"{MODEL_A}#{ACCOUNT}/nope",
        f"accounts/{ACCOUNT}/deployments/nope",
        f"accounts/{ACCOUNT}/models/nope",
        "accounts/fireworks/models/gemma-3-270m",  # in the catalog, not deployed
        f"{OWN_MODEL}#{FIRST}",
        "not a model",
    ],
)
def test_models_retrieve_answers_404_for_anything_else(plane, name):
    with pytest.raises(openai.NotFoundError) as info:
        plane.openai().models.retrieve(name)
    assert info.value.body["code"] == "NOT_FOUND"


# -- gauges for routers ---------------------------------------------------------------------------


def test_router_gauges_per_replica(plane):
    gauges = plane.gauges()
    replicas = {(OWN_DEPLOYMENT, "0"), (FIRST, "0"), (SECOND, "0")}
    for name in ROUTER_GAUGES:
        assert set(gauges[name]) == replicas, (name, gauges[name])
    for value in gauges["girandole:kv_cache_usage_perc"].values():
        assert 0 <= value <= 1
    metrics = httpx.get(plane.server.url + "/metrics", timeout=30).text
    assert "girandole_num_requests_running " in metrics  # the server-wide gauges stay

    # a long stream on `first`: its replica runs it and holds KV blocks, `second` does not
    started, stop = threading.Event(), threading.Event()

    def stream() -> None:
        body = {
            "model": f"{MODEL_A}#{FIRST}", "prompt": "hello " * 40, "max_tokens": 4000,
            "stream": True, "ignore_eos": True,
        }  # fmt: skip
        with httpx.stream(
            "POST", plane.server.url + "/v1/completions", json=body,
            headers={"Authorization": f"Bearer {plane.key}"}, timeout=120,
        ) as r:  # fmt: skip
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    return  # closing the stream aborts the request

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        assert started.wait(60)
        busy = plane.gauges()
        assert busy["girandole:num_requests_running"][(FIRST, "0")] == 1
        assert busy["girandole:kv_cache_usage_perc"][(FIRST, "0")] > 0
        assert busy["girandole:num_requests_running"][(SECOND, "0")] == 0
        assert busy["girandole:kv_cache_usage_perc"][(SECOND, "0")] == 0
        assert busy["girandole:num_requests_running"][(OWN_DEPLOYMENT, "0")] == 0
    finally:
        stop.set()
        thread.join(60)
    deadline = time.monotonic() + 30
    while plane.gauges()["girandole:num_requests_running"][(FIRST, "0")] != 0:
        assert time.monotonic() < deadline, "the aborted request still runs"
        time.sleep(0.1)

    # a deployment scaled to zero has no replica, so no series
    r = plane.http("PATCH", f"{DEPLOYMENTS}/second:scale", json={"replicaCount": 0})
    assert r.status_code == 200, r.text
    plane.wait("second", 0)
    assert set(plane.gauges()["girandole:num_requests_waiting"]) == {
        (OWN_DEPLOYMENT, "0"),
        (FIRST, "0"),
    }
    r = plane.http("PATCH", f"{DEPLOYMENTS}/second:scale", json={"replicaCount": 1})
    assert r.status_code == 200, r.text
    plane.wait("second", 1)
