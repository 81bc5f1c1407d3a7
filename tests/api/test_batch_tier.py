"""Batch-job lines run below interactive traffic, against a real `girandole serve` (a tiny random
Llama) that runs one sequence at a time (`--max-num-seqs 1`), so the job's lines run one after
another with the next one queued in the engine: an interactive request sent while the job runs
is admitted before the queued line (it takes the running line's place, which is recomputed
later), and a job whose lines were pushed aside still gives every line the text it gives alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import start_server, stop_server, write_tiny_llama_for_ops

from girandole.registry.keystore import Database

ACCOUNT = "acme"
MODEL = f"accounts/{ACCOUNT}/models/tiny"


class Server:
    def __init__(self, tmp: Path) -> None:
        data = tmp / "data"
        db = Database.in_folder(data)
        self.key, _ = db.create_key(ACCOUNT)
        db.close()
        model = write_tiny_llama_for_ops(tmp / "tiny")
        self.server = start_server(
            tmp, "--model", str(model), "--model-id", "tiny", "--account", ACCOUNT,
            "--kv-cache-gb", "0.05", "--data-dir", str(data), "--max-num-seqs", "1",
            api_key=self.key,
        )  # fmt: skip
        self.http = httpx.Client(
            base_url=self.server.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120
        )

    def call(self, method: str, path: str, **kw) -> dict:
        r = self.http.request(method, f"/v1/accounts/{ACCOUNT}{path}", **kw)
        assert r.status_code < 400, r.text
        return r.json()

    def create_job(self, job_id: str, bodies: list[dict]) -> None:
        lines = [{"custom_id": f"line-{i}", "body": b} for i, b in enumerate(bodies)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        self.call("POST", "/datasets", json={"datasetId": f"{job_id}-in", "dataset": {}})
        self.call("POST", f"/datasets/{job_id}-in:upload", files={"file": ("in.jsonl", data)})
        self.call(
            "POST",
            "/batchInferenceJobs",
            params={"batchInferenceJobId": job_id},
            json={"model": MODEL, "inputDatasetId": f"{job_id}-in"},
        )

    def processed(self, job_id: str) -> int:
        job = self.call("GET", f"/batchInferenceJobs/{job_id}")
        return int(job.get("jobProgress", {}).get("totalProcessedRequests") or 0)

    def engine(self) -> dict:
        return self.http.get("/health").json()["engine"]

    def wait(self, what: str, until, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def complete(self, prompt: str, max_tokens: int) -> dict:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        r = self.http.post("/v1/completions", json={**body, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Server:
    s = Server(tmp_path_factory.mktemp("batch-tier"))
    yield s
    s.http.close()
    stop_server(s.server)


def long_line(i: int) -> dict:
    return {"prompt": f"Line {i} of a long job:", "max_tokens": 1000, "ignore_eos": True}


def test_an_interactive_request_is_admitted_before_the_queued_batch_line(srv):
    srv.create_job("long", [long_line(i) for i in range(20)])
    try:
        # one line runs, the next is queued in the engine (the runner adds lines while none
        # waits)
        srv.wait("a running line and a queued one", lambda: srv.engine()["num_waiting"] >= 1)
        before = srv.processed("long")
        out = srv.complete("An interactive question:", 8)
        after = srv.processed("long")
    finally:
        srv.call("POST", "/batchInferenceJobs/long:cancel")
    assert out["usage"]["completion_tokens"] == 8
    # Behind the queued line it would have waited for the running line and the queued one to
    # end; taking the running line's place, it ends before the line that was queued (the one
    # that ran may have ended meanwhile).
    assert after - before <= 1
    srv.wait("the job to stop", lambda: srv.engine()["num_running"] == 0)


def test_lines_pushed_aside_by_interactive_requests_give_their_own_text(srv):
    bodies = [
        {"prompt": f"Story {i}:", "max_tokens": 24 + 5 * i, "temperature": 0, "ignore_eos": True}
        for i in range(4)
    ]
    alone = [srv.complete(b["prompt"], b["max_tokens"])["choices"][0]["text"] for b in bodies]
    preemptions = srv.engine()["num_preemptions"]
    srv.create_job("mixed", bodies)
    srv.wait("the job to run", lambda: srv.engine()["num_running"] >= 1)
    for i in range(4):  # each takes the running line's place if one runs
        srv.complete(f"Interactive {i}:", 4)
    srv.wait(
        "the job to complete",
        lambda: srv.call("GET", "/batchInferenceJobs/mixed")["state"] == "JOB_STATE_COMPLETED",
    )
    assert srv.engine()["num_preemptions"] > preemptions  # some line was recomputed
    urls = srv.call("GET", "/datasets/mixed-output:getDownloadEndpoint")["filenameToSignedUrls"]
    rows = [json.loads(x) for x in httpx.get(urls["results.jsonl"], timeout=60).text.splitlines()]
    texts = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in rows}
    assert texts == {f"line-{i}": alone[i] for i in range(4)}
