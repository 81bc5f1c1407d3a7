"""Fireworks' account metrics, `GET /v1/accounts/{account}/metrics`, against one real server: a
tiny random Llama as account acme's own model (its own deployment, `tiny`) and a managed
deployment of acme's (`dep-b`, one embedded replica), acme's key and a key of account `other`.
The per-second rates over the last minute are read back as the counts the test sent."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from api_helpers import api_conftest
from prometheus_client.parser import text_string_to_metric_families

from girandole.api.http.errors import APIError
from girandole.api.ops.account_metrics import WINDOW_S, AccountMetrics, DeploymentLoad, Ended
from girandole.api.ops.replica_gauges import ReplicaLoad
from girandole.registry.keystore import DB_NAME, Database
from girandole.registry.models import ModelCatalog

ACCOUNT, OTHER = "acme", "other"
KEY = "metrics-key-acme"
OWN = f"accounts/{ACCOUNT}/deployments/tiny"
OWN_MODEL = f"accounts/{ACCOUNT}/models/tiny"
MANAGED = f"accounts/{ACCOUNT}/deployments/dep-b"
BASE_B = f"accounts/{ACCOUNT}/models/tiny-b"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Any:
    conftest = api_conftest()
    tmp = tmp_path_factory.mktemp("account-metrics")
    data = tmp / "data"
    tiny = conftest.write_tiny_llama_for_ops(tmp / "tiny")
    db = Database(data / DB_NAME)
    other_key, _ = db.create_key(OTHER)
    ModelCatalog(db, []).add(BASE_B, str(tiny))
    db.close()
    server = conftest.start_server(
        tmp, "--model", str(tiny), "--model-id", "tiny", "--account", ACCOUNT, "--api-key", KEY,
        "--kv-cache-gb", "0.02", "--data-dir", str(data), api_key=KEY,
    )  # fmt: skip
    client = httpx.Client(base_url=server.url, timeout=60)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        r = client.post(
            f"/v1/accounts/{ACCOUNT}/deployments", params={"deploymentId": "dep-b"},
            json={"baseModel": BASE_B}, headers=auth,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while client.get(f"/v1/{MANAGED}", headers=auth).json().get("state") != "READY":
            assert time.monotonic() < deadline, "dep-b not READY"
            time.sleep(0.1)
        yield server, client, other_key
    finally:
        client.close()
        conftest.stop_server(server)


def scrape(client: httpx.Client, account: str, key: str, prefix: str = "/v1") -> httpx.Response:
    return client.get(f"{prefix}/accounts/{account}/metrics", headers=auth_of(key))


def auth_of(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(name, labels) -> value of every sample on the page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(page: dict, name: str, deployment: str, **extra: str) -> float | None:
    for (n, labels), v in page.items():
        labels = dict(labels)
        if n == name and labels["deployment"] == deployment:
            if all(labels.get(k) == want for k, want in extra.items()):
                return v
    return None


def test_each_deployment_shows_its_last_minute_of_requests(world):
    server, client, _ = world
    usage = {OWN: [], MANAGED: []}
    for model, deployment, n in ((OWN_MODEL, OWN, 3), (MANAGED, MANAGED, 2)):
        for i in range(n):
            body = {"model": model, "prompt": f"count {i}", "max_tokens": 5, "ignore_eos": True}
            r = client.post("/v1/completions", json=body, headers=auth_of(KEY))
            assert r.status_code == 200, r.text
            usage[deployment].append(r.json()["usage"])
    bad = {"model": MANAGED, "prompt": "x", "max_tokens": -1}  # the deployment's own 400
    assert client.post("/v1/completions", json=bad, headers=auth_of(KEY)).status_code == 400
    r = scrape(client, ACCOUNT, KEY)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    page = samples(r.text)

    for deployment, ok, errors in ((OWN, 3, 0), (MANAGED, 2, 1)):
        per_min = {
            name: value(page, name + ":sum_by_deployment", deployment) * WINDOW_S
            for name in ("request_counter_total", "tokens_prompt_total")
        }
        assert per_min["request_counter_total"] == pytest.approx(ok + errors)
        prompt_tokens = sum(u["prompt_tokens"] for u in usage[deployment])
        assert per_min["tokens_prompt_total"] == pytest.approx(prompt_tokens)
        error_rate = value(page, "requests_error_total:sum_by_deployment", deployment)
        assert (error_rate or 0) * WINDOW_S == pytest.approx(errors)
        if errors:
            assert value(page, "requests_error_total:sum_by_deployment", deployment,
                         http_code="400") * WINDOW_S == pytest.approx(1)  # fmt: skip
        # every request's latency is in the +Inf bucket; the answered ones' 5 tokens by 16
        overall = "latency_overall_ms_bucket:sum_by_deployment"
        assert value(page, overall, deployment, le="+Inf") * WINDOW_S == pytest.approx(ok + errors)
        generated = "tokens_generated_per_request_bucket:sum_by_deployment"
        assert value(page, generated, deployment, le="4") == 0
        assert value(page, generated, deployment, le="16") * WINDOW_S == pytest.approx(ok)
        ttft = "latency_to_first_token_ms_bucket:sum_by_deployment"
        assert value(page, ttft, deployment, le="+Inf") * WINDOW_S == pytest.approx(ok)
        # buckets count up to +Inf
        rates = [v for (n, labels), v in page.items()
                 if n == ttft and dict(labels)["deployment"] == deployment]  # fmt: skip
        assert len(rates) > 2 and max(rates) * WINDOW_S == pytest.approx(ok)
        assert value(page, "generator_model_forward_time:avg_by_deployment", deployment) > 0
        kv = value(page, "generator_kv_blocks_fraction:avg_by_deployment", deployment)
        assert kv is not None and 0 <= kv <= 1
    labels = dict(next(labels for (n, labels) in page if n.startswith("request_counter")
                       and dict(labels)["deployment"] == MANAGED))  # fmt: skip
    assert labels == {
        "base_model": BASE_B, "deployment": MANAGED, "deployment_account": ACCOUNT,
        "deployment_id": "dep-b",
    }  # fmt: skip


def test_a_key_reads_its_own_accounts_metrics_only(world):
    server, client, other_key = world
    denied = scrape(client, ACCOUNT, other_key)
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "PERMISSION_DENIED"
    assert client.get(f"/v1/accounts/{ACCOUNT}/metrics").status_code == 401
    own = scrape(client, OTHER, other_key)
    assert own.status_code == 200
    assert ACCOUNT not in own.text and "request_counter_total" in own.text  # no series: no deps
    # the fireworks-ai SDK's base URL
    inference = scrape(client, ACCOUNT, KEY, prefix="/inference/v1")
    assert inference.status_code == 200 and MANAGED in inference.text


def test_past_six_scrapes_a_minute_an_account_gets_429(world):
    server, client, other_key = world
    answers = [scrape(client, OTHER, other_key) for _ in range(7)]
    codes = [a.status_code for a in answers]
    assert 429 in codes and codes.index(429) <= 6 and set(codes) == {200, 429}, codes
    refused = answers[codes.index(429)]
    assert refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert 1 <= int(refused.headers["retry-after"]) <= 10
    assert scrape(client, ACCOUNT, KEY).status_code == 200  # another account's allowance


def test_the_window_forgets_requests_older_than_a_minute():
    metrics = AccountMetrics(scrapes_per_minute=0)
    now = time.monotonic()
    metrics.record(OWN, Ended(time=now - WINDOW_S - 1, status=200, prompt_tokens=7))
    metrics.record(OWN, Ended(time=now, status=500, prompt_tokens=3))
    page = samples(metrics.render([DeploymentLoad(OWN, OWN_MODEL, [])]).decode())
    assert value(page, "request_counter_total:sum_by_deployment", OWN) * WINDOW_S == 1
    assert value(page, "tokens_prompt_total:sum_by_deployment", OWN) * WINDOW_S == 3
    assert value(page, "requests_error_total:sum_by_deployment", OWN, http_code="500") > 0


def test_forward_time_is_the_mean_step_since_the_last_scrape():
    metrics = AccountMetrics(scrapes_per_minute=0)

    def forward(steps: int, seconds: float) -> float | None:
        stats = {"num_steps": steps, "step_seconds": seconds}
        load = DeploymentLoad(OWN, OWN_MODEL, [ReplicaLoad(OWN, "0", stats)])
        page = samples(metrics.render([load]).decode())
        return value(page, "generator_model_forward_time:avg_by_deployment", OWN)

    assert forward(10, 1.0) == pytest.approx(0.1)  # since the replica started
    assert forward(30, 1.4) == pytest.approx(0.02)  # 20 steps in 0.4 s
    assert forward(30, 1.4) is None  # no step since: no sample
    assert forward(4, 0.2) == pytest.approx(0.05)  # a new replica under the same id


def test_the_scrape_allowance_refills_and_zero_is_none():
    limited = AccountMetrics(scrapes_per_minute=2)
    limited.admit_scrape("a")
    limited.admit_scrape("a")
    with pytest.raises(APIError) as refused:
        limited.admit_scrape("a")
    assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "30"
    limited.admit_scrape("b")
    unlimited = AccountMetrics(scrapes_per_minute=0)
    for _ in range(100):
        unlimited.admit_scrape("a")
