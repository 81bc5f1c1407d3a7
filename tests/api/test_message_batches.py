"""Anthropic's Message Batches API (`girandole.api.messages.batches`) on the real server and
default model, driven by the anthropic SDK's `client.messages.batches`: a batch's results equal
the synchronous messages, a bad request and an unknown model are errored results in Anthropic's
shape; cancel, delete, list pages; the same job seen through Fireworks' batch API; other
accounts and read-only keys kept out; the 4xx in Anthropic's error shape."""

from __future__ import annotations

import asyncio
import time

import anthropic
import httpx
import pytest
from api_helpers import ACCOUNT, API_KEY, MODEL

from girandole.registry.keystore import Database
from girandole.registry.roles import INFERENCE_USER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url + "/inference", api_key=API_KEY, max_retries=0)


def params(content: str, **fields) -> dict:
    return {"model": MODEL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": content}], **fields}  # fmt: skip


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        assert time.monotonic() < deadline, f"{batch_id} still {batch.processing_status}"
        time.sleep(0.2)


def key_of(server, account: str, **kw) -> str:
    key, _ = Database.in_folder(server.log_path.parent / f"data-{server.port}").create_key(
        account, **kw
    )
    return key


def test_a_batch_answers_as_the_synchronous_messages_do(client, server):
    questions = ["What is the capital of France?", "Name a color.", "Count to three."]
    requests = [{"custom_id": f"q{i}", "params": params(q)} for i, q in enumerate(questions)]
    requests.append({"custom_id": "hot", "params": params("x", temperature=9)})
    requests.append({"custom_id": "nobody", "params": params("x", model="no-such-model")})
    batch = client.messages.batches.create(requests=requests)
    assert batch.id.startswith("msgbatch_") and batch.type == "message_batch"
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.expires_at > batch.created_at and batch.ended_at is None
    counts = batch.request_counts
    assert sum(counts.model_dump().values()) == 5 and counts.processing >= 3
    done = wait_ended(client, batch.id)
    assert done.request_counts.model_dump() == {
        "processing": 0, "succeeded": 3, "errored": 2, "canceled": 0, "expired": 0}  # fmt: skip
    assert done.ended_at >= done.created_at and done.cancel_initiated_at is None
    assert done.results_url.endswith(f"/inference/v1/messages/batches/{batch.id}/results")
    results = list(client.messages.batches.results(batch.id))
    assert [r.custom_id for r in results] == ["q0", "q1", "q2", "hot", "nobody"]  # request order
    for result in results[:3]:
        assert result.result.type == "succeeded"
        fields = params(questions[int(result.custom_id[1:])])
        greedy = {"temperature": fields.pop("temperature")}  # this SDK has no sampling args
        sync = client.messages.create(**fields, extra_body=greedy)
        assert result.result.message.content == sync.content
        assert result.result.message.usage.input_tokens == sync.usage.input_tokens
    hot, nobody = results[3].result, results[4].result
    assert hot.type == "errored" and hot.error.type == "error"
    assert hot.error.error.type == "invalid_request_error"
    assert "temperature" in hot.error.error.message
    assert nobody.type == "errored" and nobody.error.error.type == "not_found_error"
    # the same job through Fireworks' batch API, with the lines' tokens counted
    job_id = batch.id.replace("_", "-")
    job = httpx.get(f"{server.url}/v1/accounts/{ACCOUNT}/batchInferenceJobs/{job_id}",
                    headers=server.headers).json()  # fmt: skip
    assert job["state"] == "JOB_STATE_COMPLETED"
    assert job["jobProgress"]["inputTokens"] == sum(
        r.result.message.usage.input_tokens for r in results[:3])  # fmt: skip
    assert job["jobProgress"]["outputTokens"] == sum(
        r.result.message.usage.output_tokens for r in results[:3])  # fmt: skip
    # deleted: gone, its datasets too
    deleted = client.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.batches.retrieve(batch.id)
    assert missing.value.body["error"]["type"] == "not_found_error"
    datasets = httpx.get(f"{server.url}/v1/accounts/{ACCOUNT}/datasets",
                         headers=server.headers).json()["datasets"]  # fmt: skip
    assert not [d for d in datasets if job_id in d["name"]]


def test_cancel_keeps_what_is_done(client, server):
    long = params("Write a long story about the sea.", max_tokens=400, temperature=0)
    requests = [{"custom_id": f"s{i}", "params": long} for i in range(12)]
    batch = client.messages.batches.create(requests=requests)
    with pytest.raises(anthropic.BadRequestError, match="still being processed"):
        client.messages.batches.delete(batch.id)
    r = httpx.get(f"{server.url}/v1/messages/batches/{batch.id}/results", headers=server.headers)
    assert r.status_code == 400 and "still being processed" in r.json()["error"]["message"]
    with pytest.raises(anthropic.AnthropicError, match="No `results_url`"):  # the SDK's own
        client.messages.batches.results(batch.id)
    cancelled = client.messages.batches.cancel(batch.id)
    assert cancelled.processing_status in ("canceling", "ended")
    assert cancelled.cancel_initiated_at is not None
    done = wait_ended(client, batch.id)
    counts = done.request_counts
    assert counts.canceled >= 1 and counts.processing == 0 and counts.errored == 0
    assert counts.succeeded + counts.canceled == 12
    results = list(client.messages.batches.results(batch.id))
    assert len(results) == 12
    assert sum(r.result.type == "canceled" for r in results) == counts.canceled
    for result in results:
        if result.result.type == "succeeded":  # stopped lines are not results
            assert result.result.message.stop_reason in ("end_turn", "max_tokens")
    assert client.messages.batches.cancel(batch.id).processing_status == "ended"  # again: as is
    # its requests, a dataset: deleting them made the results a 500
    requests_dataset = (
        f"{server.url}/v1/accounts/{ACCOUNT}/datasets/{batch.id.replace('_', '-')}-input"
    )
    refused = httpx.delete(requests_dataset, headers=server.headers)
    assert refused.status_code == 400 and "delete the message batch" in refused.text, refused.text
    assert len(list(client.messages.batches.results(batch.id))) == 12
    client.messages.batches.delete(batch.id)
    assert httpx.get(requests_dataset, headers=server.headers).status_code == 404
    server.wait_idle()


def test_results_read_while_the_batch_is_deleted(client, server):
    """Results are read in a thread: a DELETE meanwhile took the batch's requests, and the read
    found none, a 500 (6 of 80 reads beside 10 deletes). It is the 404 the batch is now."""
    many = [{"custom_id": f"r{i}", "params": params("hi", max_tokens=1)} for i in range(300)]

    async def rounds() -> list[int]:
        seen = []
        async with httpx.AsyncClient(headers=server.headers, timeout=60) as c:
            for _ in range(6):
                batch = client.messages.batches.create(requests=many)
                client.messages.batches.cancel(batch.id)
                wait_ended(client, batch.id)
                url = f"{server.url}/v1/messages/batches/{batch.id}"
                calls = [c.get(url + "/results") for _ in range(8)]
                calls.insert(4, c.delete(url))
                seen += [r.status_code for r in await asyncio.gather(*calls)]
        return seen

    seen = asyncio.run(rounds())
    assert set(seen) <= {200, 404} and 200 in seen, seen
    assert "InputError" not in server.log()


def test_list_pages_newest_first(client):
    made = [client.messages.batches.create(requests=[{"custom_id": "a", "params": params("hi")}])
            for _ in range(3)]  # fmt: skip
    ids = [b.id for b in made][::-1]
    first = client.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[:2] and first.has_more is True
    assert (first.first_id, first.last_id) == (ids[0], ids[1])
    after = client.messages.batches.list(limit=2, after_id=ids[1])
    assert after.data[0].id == ids[2]
    before = client.messages.batches.list(limit=1, before_id=ids[2])
    assert [b.id for b in before.data] == [ids[1]] and before.has_more is True
    listed = [b.id for b in client.messages.batches.list(limit=1)]  # the SDK pages through
    assert listed[:3] == ids
    for batch in made:
        wait_ended(client, batch.id)
        client.messages.batches.delete(batch.id)


@pytest.mark.parametrize(
    "body, needle",
    [({"requests": []}, "requests"),
     ({}, "requests"),
     ({"requests": [{"custom_id": "a b", "params": {}}]}, "requests.0.custom_id"),
     ({"requests": [{"custom_id": "x" * 65, "params": {}}]}, "requests.0.custom_id"),
     ({"requests": [{"custom_id": "a", "params": {}}, {"custom_id": "a", "params": {}}]},
      "requests.1.custom_id"),
     ({"requests": [{"custom_id": "a", "params": "hi"}]}, "params"),
     ({"requests": [{"custom_id": "a", "params": {}, "extra": 1}]}, "extra")],
)  # fmt: skip
def test_bad_batches_are_400s_in_anthropics_shape(server, body, needle):
    r = httpx.post(f"{server.url}/v1/messages/batches", json=body, headers=server.headers)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert needle in error["error"]["message"]


def test_keys_and_accounts(server):
    url = f"{server.url}/v1/messages/batches"
    body = {"requests": [{"custom_id": "a", "params": params("hi")}]}
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    made = httpx.post(url, json=body, headers={"x-api-key": API_KEY})  # Anthropic's header
    assert made.status_code == 200, made.text
    batch_id = made.json()["id"]
    other = {"x-api-key": key_of(server, "other-account")}
    r = httpx.get(f"{url}/{batch_id}", headers=other)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert batch_id not in [b["id"] for b in httpx.get(url, headers=other).json()["data"]]
    reader = {"x-api-key": key_of(server, ACCOUNT, role=INFERENCE_USER)}
    assert httpx.get(f"{url}/{batch_id}", headers=reader).status_code == 200
    r = httpx.post(f"{url}/{batch_id}/cancel", headers=reader)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    for path in ("msgbatch_nope", "batch_" + "0" * 32):
        r = httpx.get(f"{url}/{path}", headers=server.headers)
        assert r.status_code == 404 and path in r.json()["error"]["message"]
    r = httpx.get(url, params={"limit": 0}, headers=server.headers)
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.get(url, params={"after_id": "msgbatch_nope"}, headers=server.headers)
    assert r.status_code == 400 and "after_id" in r.json()["error"]["message"]
    client = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    wait_ended(client, batch_id)
    r = httpx.post(f"{url}/{batch_id}/cancel", headers=server.headers)
    assert r.status_code == 400 and "already ended" in r.json()["error"]["message"]
    assert httpx.delete(f"{url}/{batch_id}", headers=server.headers).status_code == 200


def test_a_request_for_a_deployment_that_cannot_serve_is_its_error(client, server):
    """A deployment's own refusal (here one scaled to at most 0 replicas: a 503 with no
    Retry-After) was an errored result 'Internal server error'; it is the deployment's message,
    as /v1/messages answers it, and the batch ends."""
    deployments = f"{server.url}/v1/accounts/{ACCOUNT}/deployments"
    made = httpx.post(deployments, params={"deploymentId": "batch-zero"}, headers=server.headers,
                      json={"baseModel": MODEL, "minReplicaCount": 0, "maxReplicaCount": 0})  # fmt: skip
    assert made.status_code == 200, made.text
    try:
        name = f"accounts/{ACCOUNT}/deployments/batch-zero"
        sync = httpx.post(f"{server.url}/v1/messages", headers=server.headers,
                          json={**params("hi"), "model": name})  # fmt: skip
        assert sync.status_code == 503, sync.text
        batch = client.messages.batches.create(requests=[
            {"custom_id": "zero", "params": {**params("hi"), "model": name}},
            {"custom_id": "ok", "params": params("hi", max_tokens=2)},
        ])  # fmt: skip
        done = wait_ended(client, batch.id, timeout=120)
        assert (done.request_counts.errored, done.request_counts.succeeded) == (1, 1)
        zero, ok = client.messages.batches.results(batch.id)
        assert zero.result.type == "errored" and ok.result.type == "succeeded"
        error = zero.result.error.error
        assert error.message == sync.json()["error"]["message"], error
        assert "maxReplicaCount" in error.message
        client.messages.batches.delete(batch.id)
    finally:
        httpx.delete(f"{deployments}/batch-zero", headers=server.headers)
