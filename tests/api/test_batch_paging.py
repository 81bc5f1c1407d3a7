"""The three lists of batch jobs page by key in SQL (Fireworks' batchInferenceJobs, OpenAI's
/v1/batches, Anthropic's /v1/messages/batches): each page read alone gives what cutting it
from the whole history gave (the same jobs, order, fields, cursors and errors), jobs created at
the same instant included (ordered by id); old offset page tokens still work. Also: a job being
created counts its input while no file can join it (a file that joined after the count ran
uncounted in totalInputRequests). An app without a model, in process."""

from __future__ import annotations

import json
import random

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from girandole.api.app import create_app
from girandole.api.batch.route import new_job
from girandole.api.datasets.route import still_open
from girandole.api.http.errors import APIError
from girandole.api.http.pages import list_page
from girandole.api.settings import ServerSettings
from girandole.api.state import AppState
from girandole.batch.lines import read_input
from girandole.batch.store import RUNNING, BatchStore, LineResult
from girandole.registry.keystore import Database
from girandole.registry.list_query import encode_key_token, encode_page_token

KEY = {"Authorization": "Bearer k"}
JOBS = 250


@pytest.fixture(scope="module")
def app():
    """250 jobs of the server's account, a third each plain, OpenAI's and Anthropic's, four
    made at each instant (their ids in no order of their making), some with results; and a
    few jobs of another account."""
    app = create_app(AppState(ServerSettings(api_keys=["k"])))
    store: BatchStore = app.state.batch_store
    account = app.state.girandole.settings.account
    rng = random.Random(7)
    for i in range(JOBS):
        hexid = f"{rng.getrandbits(128):032x}"
        kind = ("fireworks", "openai", "anthropic")[i % 3]
        job_id = {"fireworks": f"job-{hexid[:12]}", "openai": f"batch-{hexid}",
                  "anthropic": f"msgbatch-{hexid}"}[kind]  # fmt: skip
        job = new_job(account, job_id, job_id, "m", f"in-{i}", f"{job_id}-output", {}, 4, "k")
        created = 1_700_000_000.25 + i // 4
        if kind == "openai":
            job["openai"] = {"id": f"batch_{hexid}", "endpoint": "/v1/chat/completions",
                             "input_file_id": f"file-{i}", "created_at": int(created),
                             "metadata": {"i": str(i)}}  # fmt: skip
        elif kind == "anthropic":
            job["anthropic"] = {"id": f"msgbatch_{hexid}"}
        job["state"] = RUNNING
        assert store.insert_job(account, job_id, None, job)
        store.db.execute(
            "UPDATE batch_jobs SET created = ? WHERE account = ? AND job_id = ?",
            (created, account, job_id),
        )
        for line in range(i % 4):  # progress: the page's own sums, not its neighbours'
            store.record_result(account, job_id, LineResult(
                line, f"c{line}", line % 2 == 0, {}, prompt_tokens=i, completion_tokens=line))  # fmt: skip
    for i in range(3):
        other = new_job("other", f"x{i}", "x", "m", "in", "out", {}, 1, "k")
        store.insert_job("other", f"x{i}", None, other | {"openai": {"id": f"batch_{i:032x}"}})
    return app


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def jobs_path(app) -> str:
    return f"/v1/accounts/{app.state.girandole.settings.account}/batchInferenceJobs"


def get(client: TestClient, path: str, **params) -> dict:
    r = client.get(path, params=params, headers=KEY)
    assert r.status_code == 200, r.text
    return r.json()


def test_fireworks_pages_join_into_the_whole_list_by_created_then_id(app, client):
    store: BatchStore = app.state.batch_store
    account = app.state.girandole.settings.account
    rows = store.db.execute("SELECT created, job_id FROM batch_jobs WHERE account = ?", (account,))
    expected = [f"{jobs_path(app)[4:]}/{job_id}" for _, job_id in sorted(rows)]
    assert len(expected) == JOBS
    for size in (1, 7, 50, 200):
        names, token, pages = [], None, 0
        while True:
            params = {"pageSize": size} | ({"pageToken": token} if token else {})
            page = get(client, jobs_path(app), **params)
            # what the whole history cut by offset gives: a filter every job matches takes
            # that path (a filter on any field reads every job)
            old = get(client, jobs_path(app), filter='name:"batchInferenceJobs"', **params)
            assert page["batchInferenceJobs"] == old["batchInferenceJobs"]
            assert page["totalSize"] == old["totalSize"] == JOBS
            assert bool(page["nextPageToken"]) == bool(old["nextPageToken"])
            names += [job["name"] for job in page["batchInferenceJobs"]]
            token, pages = page["nextPageToken"], pages + 1
            if not token:
                break
        assert names == expected and pages == -(-JOBS // size)
    whole = store.list_jobs(account)
    assert [job["name"] for job in whole] == expected
    first = get(client, jobs_path(app), pageSize=200)["batchInferenceJobs"]
    assert first == whole[:200]  # bodies with their own progress
    assert {job["jobProgress"]["totalProcessedRequests"] for job in first} == {0, 1, 2, 3}


def test_fireworks_old_offset_tokens_and_bad_parameters(app, client):
    path = jobs_path(app)
    whole = get(client, path, filter='name:"batchInferenceJobs"', pageSize=200)
    whole = whole["batchInferenceJobs"] + get(
        client, path, filter='name:"batchInferenceJobs"', pageSize=200, pageToken=encode_page_token(200)
    )["batchInferenceJobs"]  # fmt: skip
    # a token of the offset kind (every token before): the page at that offset
    page = get(client, path, pageSize=10, pageToken=encode_page_token(37))
    assert page["batchInferenceJobs"] == whole[37:47]
    after = get(client, path, pageSize=10, pageToken=page["nextPageToken"])
    assert after["batchInferenceJobs"] == whole[47:57]
    end = get(client, path, pageSize=10, pageToken=encode_page_token(245))
    assert end["batchInferenceJobs"] == whole[245:] and end["nextPageToken"] == ""
    assert get(client, path, pageToken=encode_page_token(999)) == {
        "batchInferenceJobs": [], "nextPageToken": "", "totalSize": JOBS}  # fmt: skip
    # a key token where a filter pages by offset: its offset
    keyed = get(client, path, pageSize=10, pageToken=page["nextPageToken"], filter="state:JOB")
    assert keyed["batchInferenceJobs"] == whole[47:57]
    # readMask as before: only the fields named
    masked = get(client, path, pageSize=3, readMask="name,state")["batchInferenceJobs"]
    assert masked == [{"name": j["name"], "state": j["state"]} for j in whole[:3]]
    assert get(client, path, pageSize=0)["batchInferenceJobs"] == whole[:50]  # the default
    assert len(get(client, path, pageSize=1000)["batchInferenceJobs"]) == 200  # the most
    for params, param in (
        ({"pageSize": -1}, "pageSize"),
        ({"pageToken": "bogus"}, "pageToken"),
        ({"pageToken": encode_page_token(-1)}, "pageToken"),
        ({"pageToken": encode_key_token(5, (float("nan"), "x"))}, "pageToken"),
        ({"filter": "nope = 1"}, "filter"),
        ({"orderBy": "nope"}, "orderBy"),
    ):
        r = client.get(path, params=params, headers=KEY)
        assert r.status_code == 400 and param in r.text, (params, r.text)


def test_openai_pages_are_the_whole_list_cut_by_after(app, client):
    whole = get(client, "/v1/batches", limit=100)
    ids = [b["id"] for b in whole["data"]]
    assert len(ids) == JOBS // 3 and whole["has_more"] is False  # the other account's: not
    store: BatchStore = app.state.batch_store
    account = app.state.girandole.settings.account
    made = [j for j in store.list_jobs(account) if "openai" in j][::-1]  # the old reading
    assert ids == [j["openai"]["id"] for j in made]
    for limit in (1, 6, 20):
        seen, after = [], None
        while True:
            params = {"limit": limit} | ({"after": after} if after else {})
            page = get(client, "/v1/batches", **params)
            assert page == list_page(whole["data"], limit, after)
            seen += page["data"]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == whole["data"]
    r = client.get("/v1/batches", params={"after": "batch_" + "0" * 32}, headers=KEY)
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        f"No item with id 'batch_{'0' * 32}', field: 'after'"
    )
    r = client.get("/v1/batches", params={"after": "nope"}, headers=KEY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"


def test_anthropic_pages_after_before_and_both(app, client):
    headers = {"x-api-key": "k"}

    def page(**params) -> dict:
        r = client.get("/v1/messages/batches", params=params, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    whole = page(limit=1000)
    data = whole["data"]
    ids = [b["id"] for b in data]
    assert len(ids) == JOBS // 3 and whole["has_more"] is False
    store: BatchStore = app.state.batch_store
    made = store.list_jobs(app.state.girandole.settings.account)
    assert ids == [j["anthropic"]["id"] for j in made if "anthropic" in j][::-1]  # the old reading
    rng = random.Random(3)
    cases = [{"limit": 1}, {"limit": 5, "after_id": ids[0]}, {"limit": 5, "before_id": ids[-1]},
             {"limit": 3, "before_id": ids[2]}, {"limit": 3, "before_id": ids[0]},
             {"limit": 4, "after_id": ids[-1]}, {"limit": 2, "after_id": ids[10], "before_id": ids[3]},
             {"limit": 9, "after_id": ids[3], "before_id": ids[10]},
             {"limit": 6, "after_id": ids[3], "before_id": ids[10]},
             {"limit": 1, "after_id": ids[5], "before_id": ids[5]}]  # fmt: skip
    for _ in range(40):
        a, b = rng.choice(ids), rng.choice(ids)
        cases.append({"limit": rng.randint(1, 12), "after_id": a} | (
            {"before_id": b} if rng.random() < 0.5 else {}))  # fmt: skip
        cases.append({"limit": rng.randint(1, 12), "before_id": b})
    for params in cases:
        after, before = params.get("after_id"), params.get("before_id")
        old = list_page(data, params["limit"], after, before, tail=before is not None and after is None,
                        cursor_names=("after_id", "before_id"))  # fmt: skip
        del old["object"]
        assert page(**params) == old, params
    # forward by after_id and back by before_id: the whole list each way
    forward, after = [], None
    while True:
        got = page(limit=7, **({"after_id": after} if after else {}))
        forward += got["data"]
        if not got["has_more"]:
            break
        after = got["last_id"]
    backward, before = [], ids[-1]
    while True:
        got = page(limit=7, before_id=before)
        backward = got["data"] + backward
        if not got["has_more"]:
            break
        before = got["first_id"]
    assert forward == data and backward == data[:-1]
    for param in ("after_id", "before_id"):
        r = client.get("/v1/messages/batches", params={param: "msgbatch_nope"}, headers=headers)
        assert r.status_code == 400 and param in r.json()["error"]["message"]


def test_a_page_reads_only_its_rows_by_the_indexes(tmp_path):
    """Every statement of a page (jobs, their results' sums, the count, a cursor's key) is a
    SEARCH by an index, never a SCAN of the account's history; a database made before these
    indexes gets them when it opens."""
    db = Database(tmp_path / "old.db")
    store = BatchStore(db, tmp_path / "datasets")
    for i in range(30):
        body = {"state": RUNNING, "openai": {"id": f"o{i}"}} if i % 2 else {"state": RUNNING}
        store.insert_job("acme", f"j{i:02}", None, body | ({"anthropic": {"id": f"a{i}"}} if i % 5 == 0 else {}))  # fmt: skip
        store.record_result("acme", f"j{i:02}", LineResult(0, "c", True, {}))
    for name in ("batch_jobs_created", "batch_jobs_openai", "batch_jobs_anthropic", "batch_jobs_input"):  # fmt: skip
        db.execute(f"DROP INDEX {name}")  # the database as an older server left it
    store = BatchStore(db, tmp_path / "datasets")
    statements: list[tuple[str, tuple]] = []
    execute = db.execute

    def recording(sql: str, params: tuple = ()) -> list[tuple]:
        statements.append((sql, params))
        return execute(sql, params)

    db.execute = recording  # type: ignore[method-assign]
    key = store.key_of("acme", "j11", "openai", "o11")
    assert key is not None
    pages = [
        store.page_jobs("acme", 5),
        store.page_jobs("acme", 5, above=key, offset=0),
        store.page_jobs("acme", 5, api="openai", below=key, descending=True),
        store.page_jobs("acme", 5, api="anthropic", above=(0.0, ""), below=key),
    ]
    assert store.count_jobs("acme") == 30
    assert store.job_reading("acme", "d") is None
    db.execute = execute  # type: ignore[method-assign]
    assert [job_id for (_, job_id), _ in pages[0]] == [f"j{i:02}" for i in range(5)]
    assert [job_id for (_, job_id), _ in pages[1]] == [f"j{i:02}" for i in range(12, 17)]
    assert [job_id for (_, job_id), _ in pages[2]] == ["j09", "j07", "j05", "j03", "j01"]
    assert [job_id for (_, job_id), _ in pages[3]] == ["j00", "j05", "j10"]
    assert all(job["jobProgress"]["totalProcessedRequests"] == 1 for p in pages for _, job in p)
    for sql, params in statements:
        plan = [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
        assert plan and not any(step.startswith("SCAN") for step in plan), (sql, plan)


def test_no_file_joins_an_input_while_a_job_created_on_it_counts_it(monkeypatch):
    """A file uploaded to the input dataset while the job being created read it was placed
    (no job read the dataset yet) and ran uncounted: totalInputRequests 1 of 2 lines. Now it
    is refused until the job exists (which then refuses it), so the count is what runs."""
    import girandole.api.batch.route as route

    app = create_app(AppState(ServerSettings(api_keys=["k"])))
    client = TestClient(app)
    store: BatchStore = app.state.batch_store
    account = app.state.girandole.settings.account
    datasets = f"/v1/accounts/{account}/datasets"
    line = {"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}
    assert client.post(datasets, json={"datasetId": "race", "dataset": {}}, headers=KEY).is_success
    r = client.post(f"{datasets}/race:upload", headers=KEY,
                    files={"file": ("a.jsonl", json.dumps(line).encode() + b"\n")})  # fmt: skip
    assert r.status_code == 200, r.text
    read = route.read_input
    refused: list[APIError] = []

    def read_while_a_file_arrives(data: bytes, most: int):
        """The count, while an upload's file joins the dataset (as receive_file places it)."""
        more = json.dumps(line | {"custom_id": "b"}).encode() + b"\n"
        try:
            as_received = still_open(Request({"type": "http", "app": app}), account, "race")
            store.write_file(account, "race", "b.jsonl", more, as_received)
        except APIError as exc:
            refused.append(exc)
        return read(data, most)

    monkeypatch.setattr(route, "read_input", read_while_a_file_arrives)
    body = {"model": "accounts/fireworks/models/gemma-3-270m", "inputDatasetId": "race"}
    r = client.post(f"{jobs_path(app)}?batchInferenceJobId=race-job", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    monkeypatch.setattr(route, "read_input", read)
    runs = len(read_input(store.dataset_bytes(account, "race"), 100))  # what the runner reads
    assert r.json()["jobProgress"]["totalInputRequests"] == runs == 1
    assert refused and refused[0].status_code == 400 and "being created" in refused[0].message
    assert not store.input_counted(account, "race")  # released once the job is saved
    # and the job refuses it now, as before
    r = client.post(f"{datasets}/race:upload", headers=KEY, files={"file": ("c.jsonl", b"{}\n")})
    assert r.status_code == 400 and "race-job" in r.text
    # a creation that fails releases the dataset too
    r = client.post(f"{jobs_path(app)}?batchInferenceJobId=race-job", json=body, headers=KEY)
    assert r.status_code == 409 and not store.input_counted(account, "race")
