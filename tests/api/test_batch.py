"""Batch inference jobs against a real `girandole serve` (a tiny random Llama with the ChatML
template) with the real fireworks-ai SDK (`client.datasets`, `client.batch_inference_jobs`),
plain HTTP and the `girandole batch` CLI: a job's results keyed by custom_id with an error file;
a 500-line job killed (SIGKILL) halfway and resumed after a restart gives every custom_id
exactly once; cancel; bad inputs are 400s naming the problem."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import fireworks
import httpx
import pytest
from api_helpers import cli_runner
from conftest import start_server, stop_server, write_tiny_llama_for_ops

from girandole.registry.keystore import Database

ACCOUNT = "acme"
MODEL = f"accounts/{ACCOUNT}/models/tiny"


def chat_line(i: int, **body) -> dict:
    messages = [{"role": "user", "content": f"Say something about the number {i}."}]
    return {"custom_id": f"req-{i}", "body": {"messages": messages, **body}}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


class Batch:
    """A server with keys of two accounts in its database, restartable on the same data."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        db = Database.in_folder(self.data)
        self.key, _ = db.create_key(ACCOUNT)
        self.other_key, _ = db.create_key("other")
        db.close()
        self.model = write_tiny_llama_for_ops(tmp / "tiny")
        self.server = self.start()

    def start(self):
        return start_server(
            self.tmp, "--model", str(self.model), "--model-id", "tiny", "--account", ACCOUNT,
            "--chat-template", "chatml", "--kv-cache-gb", "0.05", "--data-dir", str(self.data),
            api_key=self.key,
        )  # fmt: skip

    def client(self, inference: bool = False, key: str | None = None) -> fireworks.Fireworks:
        base = self.server.url + ("/inference" if inference else "")
        return fireworks.Fireworks(
            api_key=key or self.key, account_id=ACCOUNT, base_url=base, max_retries=0
        )

    def http(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.request(method, self.server.url + path, headers=headers, timeout=60, **kw)

    def upload(self, dataset_id: str, lines: list[dict] | bytes) -> None:
        fw = self.client()
        fw.datasets.create(dataset_id=dataset_id, dataset={"display_name": dataset_id})
        data = lines if isinstance(lines, bytes) else jsonl(lines)
        fw.datasets.upload(dataset_id, file=("input.jsonl", data))

    def start_job(self, job_id: str, input_id: str, max_tokens: int) -> None:
        self.client().batch_inference_jobs.create(
            batch_inference_job_id=job_id,
            model=MODEL,
            input_dataset_id=input_id,
            inference_parameters={"max_tokens": max_tokens},
        )

    def wait(self, job_id: str, until, timeout: float = 240):
        fw = self.client()
        deadline = time.monotonic() + timeout
        while True:
            job = fw.batch_inference_jobs.get(job_id)
            if until(job):
                return job
            assert job.state not in ("JOB_STATE_FAILED",), job.status
            assert time.monotonic() < deadline, job
            time.sleep(0.05)

    def download(self, dataset: str) -> dict[str, list[dict]]:
        """The output dataset's files, through the SDK's signed download URLs."""
        urls = self.client().datasets.get_download_endpoint(dataset.rsplit("/", 1)[-1])
        files = {}
        for name, url in urls.filename_to_signed_urls.items():
            response = httpx.get(url, timeout=60)  # no key: the URL is signed
            assert response.status_code == 200, response.text
            files[name] = [json.loads(line) for line in response.text.splitlines()]
        return files


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Batch:
    b = Batch(tmp_path_factory.mktemp("batch"))
    yield b
    stop_server(b.server)


def test_sdk_job_end_to_end(batch):
    lines = [chat_line(i) for i in range(6)]
    lines.append({"custom_id": "completion", "body": {"prompt": "Once upon", "max_tokens": 3}})
    lines.append(chat_line(99, temperature=-1))  # the endpoint refuses it: the error file
    batch.upload("e2e-input", lines)
    fw = batch.client()
    assert fw.datasets.get("e2e-input").state == "READY"
    assert fw.datasets.get("e2e-input").example_count == "8"
    job = fw.batch_inference_jobs.create(
        batch_inference_job_id="e2e",
        display_name="end to end",
        model=MODEL,
        input_dataset_id=f"accounts/{ACCOUNT}/datasets/e2e-input",
        output_dataset_id=f"accounts/{ACCOUNT}/datasets/e2e-output",
        inference_parameters={"max_tokens": 5, "temperature": 0.0, "extra_body": '{"seed": 1}'},
    )
    assert job.name == f"accounts/{ACCOUNT}/batchInferenceJobs/e2e"
    assert job.state in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert job.job_progress.total_input_requests == 8
    assert job.inference_parameters.max_tokens == 5
    done = batch.wait("e2e", lambda j: j.state == "JOB_STATE_COMPLETED")
    progress = done.job_progress
    assert progress.percent == 100
    assert (progress.total_processed_requests, progress.successfully_processed_requests) == (8, 7)
    assert progress.failed_requests == 1 and progress.output_rows == 7
    assert progress.input_tokens > 0 and progress.output_tokens > 0
    assert done.output_dataset_id == f"accounts/{ACCOUNT}/datasets/e2e-output"

    output = fw.datasets.get("e2e-output")
    assert output.state == "READY" and output.source_job_name == done.name
    files = batch.download(done.output_dataset_id)
    results = {r["custom_id"]: r for r in files["results.jsonl"]}
    assert set(results) == {f"req-{i}" for i in range(6)} | {"completion"}
    chat = results["req-0"]["response"]
    assert chat["status_code"] == 200 and results["req-0"]["error"] is None
    assert chat["body"]["object"] == "chat.completion"
    assert chat["body"]["model"] == MODEL
    assert chat["body"]["usage"]["completion_tokens"] <= 5  # the job's maxTokens
    assert results["completion"]["response"]["body"]["object"] == "text_completion"
    assert results["completion"]["response"]["body"]["usage"]["completion_tokens"] <= 3
    assert sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results.values()) == (
        progress.output_tokens
    )
    (error,) = files["errors.jsonl"]
    assert error["custom_id"] == "req-99" and error["response"]["status_code"] == 400
    assert "temperature" in error["error"]["message"]

    # every line ran through the serving pipeline: a usage row each, on the job's account (the
    # server writes them from a thread of its own: the last may come a moment after the job ends)
    db = Database.in_folder(batch.data)
    deadline = time.monotonic() + 10
    try:
        while True:
            rows = db.execute(
                "SELECT COUNT(*), SUM(completion_tokens) FROM usage WHERE account = ?"
                " AND request_id IN (SELECT json_extract(body, '$.response.request_id')"
                " FROM batch_results WHERE job_id = 'e2e' AND ok = 1)",
                (ACCOUNT,),
            )
            if rows[0][0] >= 7 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        db.close()
    assert rows[0] == (7, progress.output_tokens)

    listed = list(fw.batch_inference_jobs.list(filter='state = "JOB_STATE_COMPLETED"'))
    assert "e2e" in [j.name.rsplit("/", 1)[-1] for j in listed]


def test_sdk_upload_endpoint_under_inference(batch):
    """The SDK with base_url ".../inference": signed PUT URLs, validateUpload, a job."""
    fw = batch.client(inference=True)
    fw.datasets.create(dataset_id="signed-input", dataset={})
    data = jsonl([chat_line(i) for i in range(3)])
    urls = fw.datasets.get_upload_endpoint(
        "signed-input", filename_to_size={"input.jsonl": str(len(data))}
    ).filename_to_signed_urls
    assert "/inference/v1/accounts/acme/datasets/signed-input/files/" in urls["input.jsonl"]
    assert fw.datasets.get("signed-input").state == "UPLOADING"
    tampered = urls["input.jsonl"].replace("signature=", "signature=0")
    assert httpx.put(tampered, content=data).status_code == 403
    assert httpx.put(urls["input.jsonl"], content=data).status_code == 200
    fw.datasets.validate_upload("signed-input", body={})
    assert fw.datasets.get("signed-input").example_count == "3"
    batch.start_job("signed", "signed-input", 2)
    job = batch.wait("signed", lambda j: j.state == "JOB_STATE_COMPLETED")
    assert job.output_dataset_id == f"accounts/{ACCOUNT}/datasets/signed-output"
    assert len(batch.download(job.output_dataset_id)["results.jsonl"]) == 3
    fw.batch_inference_jobs.delete("signed")
    with pytest.raises(fireworks.NotFoundError):
        fw.batch_inference_jobs.get("signed")


def test_a_put_of_another_size_than_declared_is_a_400_naming_both(batch):
    """The size given in filenameToSize holds the signed PUT to it (it was never checked: any
    body was kept), whether the body's length is announced or it comes chunked."""
    fw = batch.client()
    fw.datasets.create(dataset_id="sized", dataset={})
    data = jsonl([chat_line(i) for i in range(4)])
    url = fw.datasets.get_upload_endpoint(
        "sized", filename_to_size={"in.jsonl": len(data)}
    ).filename_to_signed_urls["in.jsonl"]

    def chunked(body: bytes):
        yield body[:10]
        yield body[10:]

    for body, sent in (
        (data + b"\n\n", f"{len(data) + 2} bytes"),  # Content-Length: refused before reading
        (chunked(data[:-7]), f"{len(data) - 7} bytes"),
        (chunked(data + b"more"), "more"),
    ):
        error = _error(httpx.put(url, content=body), 400, f"declared as {len(data)} bytes", sent)
        assert error["param"] == "filenameToSize"
    r = batch.http("POST", f"/v1/accounts/{ACCOUNT}/datasets/sized:validateUpload", json={})
    _error(r, 400, "no file yet")  # none of them was kept
    forged = url.replace(f"size={len(data)}", f"size={len(data) + 2}")
    assert httpx.put(forged, content=data + b"\n\n").status_code == 403  # the size is signed
    assert httpx.put(url, content=chunked(data)).status_code == 200
    fw.datasets.validate_upload("sized", body={})
    assert fw.datasets.get("sized").example_count == "4"


def test_kill_halfway_and_resume(batch):
    """SIGKILL the server while a 500-line job runs; after a restart the job resumes and every
    custom_id is in the results exactly once."""
    batch.upload("big-input", [chat_line(i) for i in range(500)])
    batch.start_job("big", "big-input", 6)
    halfway = batch.wait("big", lambda j: (j.job_progress.total_processed_requests or 0) >= 120)
    assert halfway.state == "JOB_STATE_RUNNING"
    batch.server.process.send_signal(signal.SIGKILL)
    batch.server.process.wait(30)
    db = Database.in_folder(batch.data)
    try:
        (before,) = db.execute("SELECT COUNT(*) FROM batch_results WHERE job_id = 'big'")[0]
    finally:
        db.close()
    assert 120 <= before < 500, before  # killed halfway

    batch.server = batch.start()
    job = batch.wait("big", lambda j: j.state == "JOB_STATE_COMPLETED")
    assert job.job_progress.total_processed_requests == 500
    assert job.job_progress.successfully_processed_requests == 500
    files = batch.download(job.output_dataset_id)
    ids = [r["custom_id"] for r in files["results.jsonl"]]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(500))  # each exactly once
    assert files["errors.jsonl"] == []
    assert f"{500 - before} of 500 lines to run" in batch.server.log()


def test_a_cancel_the_server_stopped_before_writing_ends_after_a_restart(batch):
    """A cancel commits the job's state at once, and the runner then stops its lines and
    writes what was done. A server killed in between left the job cancelled with no output:
    its dataset never READY, an OpenAI batch `cancelling` and a message batch `canceling`
    for ever. The job's row is written here as the cancel writes it, with the server down."""
    batch.upload("cut-input", [chat_line(i) for i in range(300)])
    batch.start_job("cut", "cut-input", 8)
    batch.wait("cut", lambda j: (j.job_progress.total_processed_requests or 0) >= 10)
    batch.server.process.send_signal(signal.SIGKILL)
    batch.server.process.wait(30)
    db = Database.in_folder(batch.data)
    try:
        (text,) = db.execute("SELECT body FROM batch_jobs WHERE job_id = 'cut'")[0]
        job = json.loads(text)
        job["state"] = "JOB_STATE_CANCELLED"
        job["status"] = {"code": "CANCELLED", "message": "cancelled by the user"}
        db.execute("UPDATE batch_jobs SET body = ? WHERE job_id = 'cut'", (json.dumps(job),))
        (done,) = db.execute("SELECT COUNT(*) FROM batch_results WHERE job_id = 'cut'")[0]
    finally:
        db.close()
    batch.server = batch.start()
    fw = batch.client()
    deadline = time.monotonic() + 60
    while fw.datasets.get("cut-output").state != "READY":
        assert time.monotonic() < deadline, "the cancelled job's output was never written"
        time.sleep(0.1)
    files = batch.download(f"accounts/{ACCOUNT}/datasets/cut-output")
    assert len(files["results.jsonl"]) == done  # what was done before the kill, nothing more
    assert fw.batch_inference_jobs.get("cut").state == "JOB_STATE_CANCELLED"
    batch.server.wait_idle()


def test_cancel(batch):
    batch.upload("cancel-input", [chat_line(i) for i in range(400)])
    fw = batch.client()
    batch.start_job("cancel-me", "cancel-input", 8)
    batch.wait("cancel-me", lambda j: (j.job_progress.total_processed_requests or 0) >= 20)
    r = batch.http("POST", f"/v1/accounts/{ACCOUNT}/batchInferenceJobs/cancel-me:cancel")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "JOB_STATE_CANCELLED"
    job = batch.wait("cancel-me", lambda j: j.state == "JOB_STATE_CANCELLED")
    processed = job.job_progress.total_processed_requests
    assert 20 <= processed < 400
    time.sleep(1.0)
    later = fw.batch_inference_jobs.get("cancel-me")
    assert later.job_progress.total_processed_requests == processed  # nothing more ran
    files = batch.download(job.output_dataset_id)  # what was done is kept
    assert len(files["results.jsonl"]) == processed
    assert fw.datasets.get(job.output_dataset_id.rsplit("/", 1)[-1]).state == "READY"
    batch.server.wait_idle()


def test_a_deleted_jobs_output_dataset_ends_ready_with_what_was_done(batch):
    """Deleting a job (waiting or running) ends its output dataset as a cancel does: READY with
    the lines done (it stayed UPLOADING for ever)."""
    batch.upload("del-input", [chat_line(i) for i in range(300)])
    fw = batch.client()
    batch.start_job("del-running", "del-input", 8)
    batch.start_job("del-waiting", "del-input", 8)  # jobs run one at a time: this one waits
    batch.wait("del-running", lambda j: (j.job_progress.total_processed_requests or 0) >= 10)
    assert fw.batch_inference_jobs.get("del-waiting").state == "JOB_STATE_PENDING"
    for job_id in ("del-waiting", "del-running"):
        fw.batch_inference_jobs.delete(job_id)
        with pytest.raises(fireworks.NotFoundError):
            fw.batch_inference_jobs.get(job_id)
    waiting = fw.datasets.get("del-waiting-output")
    assert (waiting.state, waiting.example_count) == ("READY", "0")
    running = fw.datasets.get("del-running-output")
    assert running.state == "READY" and int(running.example_count) >= 10
    time.sleep(1.0)  # lines in flight when it was deleted: none is written after
    results = batch.download(f"accounts/{ACCOUNT}/datasets/del-running-output")
    assert len(results["results.jsonl"]) == int(running.example_count)
    assert fw.datasets.get("del-running-output").example_count == running.example_count
    batch.server.wait_idle()


def test_a_failed_jobs_output_dataset_ends_ready_with_what_was_done(batch):
    """A job that fails on its own (its input unreadable when it starts: the file damaged on
    disk while it waited behind another job) ends JOB_STATE_FAILED, saying why, and its output
    dataset READY with what was done, here nothing (it stayed UPLOADING for ever: a client
    polling it for a final state never saw one)."""
    batch.upload("blocker-input", [chat_line(i) for i in range(300)])
    batch.upload("broken-input", [chat_line(i) for i in range(3)])
    fw = batch.client()
    batch.start_job("blocker", "blocker-input", 8)  # jobs run one at a time: the next waits
    batch.start_job("broken", "broken-input", 8)
    assert fw.batch_inference_jobs.get("broken").state == "JOB_STATE_PENDING"
    (path,) = (batch.data / "datasets" / ACCOUNT / "broken-input").iterdir()
    path.write_bytes(b"not json\n")
    batch.http("POST", f"/v1/accounts/{ACCOUNT}/batchInferenceJobs/blocker:cancel")
    deadline = time.monotonic() + 60
    while (job := fw.batch_inference_jobs.get("broken")).state != "JOB_STATE_FAILED":
        assert job.state == "JOB_STATE_PENDING", job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job.status.code == "INVALID_ARGUMENT" and "line 1" in job.status.message, job.status
    output = fw.datasets.get("broken-output")
    assert (output.state, output.example_count) == ("READY", "0")
    assert batch.download(job.output_dataset_id) == {"results.jsonl": [], "errors.jsonl": []}
    # ended: its datasets may go
    datasets = f"/v1/accounts/{ACCOUNT}/datasets"
    assert batch.http("DELETE", datasets + "/broken-output").status_code == 200
    batch.server.wait_idle()


def _error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error
    return error


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"custom_id": "a", "body": {"messages": []}}\nnot json\n', ["line 2", "JSON"]),
        (jsonl([chat_line(1), chat_line(1)]), ["line 2", "req-1", "used again"]),
        (jsonl([{"custom_id": "a"}]), ["line 1", "body"]),
        (jsonl([{"custom_id": 7, "body": {}}]), ["line 1", "custom_id"]),
        (jsonl([{"custom_id": "a", "body": {"text": "x"}}]), ["line 1", "messages", "prompt"]),
        (jsonl([{"custom_id": "a", "body": {"input": "x"}}]), ["line 1", "needs a url"]),
        (jsonl([{"custom_id": "a", "url": "/v1/moderations", "body": {}}]), ["url"]),
        (b"\n\n", ["no lines"]),
        (b'{"custom_id": "a", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", ["deeply"]),
        (b'{"custom_id": "a", "body": {"max_tokens": 1' + b"0" * 5000 + b"}}\n", ["line 1"]),
    ],
)
def test_bad_input_files_are_400(batch, content, words):
    dataset_id = f"bad-{abs(hash(content)) % 10**8}"
    batch.upload(dataset_id, content)
    r = batch.http(
        "POST",
        f"/v1/accounts/{ACCOUNT}/batchInferenceJobs",
        json={"model": MODEL, "inputDatasetId": dataset_id},
    )
    error = _error(r, 400, *words)
    assert error["param"] == "inputDatasetId"


def test_bad_requests(batch):
    batch.upload("ok-input", [chat_line(1)])
    base = f"/v1/accounts/{ACCOUNT}/batchInferenceJobs"
    good = {"model": MODEL, "inputDatasetId": "ok-input"}

    def create(body, **params):
        return batch.http("POST", base, json=body, params=params)

    _error(create({"inputDatasetId": "ok-input"}), 400, "model is required")
    _error(create({"model": MODEL}), 400, "inputDatasetId is required")
    _error(create({**good, "model": "accounts/acme/models/nope"}), 404)
    _error(create({**good, "inputDatasetId": "missing"}), 400, "does not exist")
    _error(create({**good, "inputDatasetId": "accounts/other/datasets/x"}), 400, "own account")
    _error(create({**good, "precision": "FP8"}), 400, "precision")
    _error(create({**good, "continuedFromJobName": "x"}), 400, "continuedFromJobName")
    _error(create({**good, "inferenceParameters": {"maxTokens": "many"}}), 400, "maxTokens")
    _error(create({**good, "inferenceParameters": {"extraBody": "{"}}), 400, "extraBody")
    _error(create({**good, "inferenceParameters": {"extraBody": "[1]"}}), 400, "extraBody")
    deep = "[" * 100_000 + "]" * 100_000
    _error(create({**good, "inferenceParameters": {"extraBody": deep}}), 400, "deeply")
    huge = '{"max_tokens": 1' + "0" * 5000 + "}"
    _error(create({**good, "inferenceParameters": {"extraBody": huge}}), 400, "extraBody")
    _error(create({**good, "bogus": 1}), 400, "bogus")
    _error(create(good, batchInferenceJobId="Not_Valid"), 400, "batchInferenceJobId")
    assert create(good, batchInferenceJobId="twice").status_code == 200
    _error(create(good, batchInferenceJobId="twice"), 409, "already exists")
    _error(batch.http("GET", base + "/nope"), 404, "not found")
    _error(batch.http("POST", base + "/nope:cancel"), 404)
    # another account's key cannot touch acme's jobs or datasets
    _error(batch.http("GET", base, key=batch.other_key), 403)
    _error(batch.http("GET", f"/v1/accounts/{ACCOUNT}/datasets", key=batch.other_key), 403)
    _error(batch.http("GET", base, key="wrong"), 401)
    # datasets
    datasets = f"/v1/accounts/{ACCOUNT}/datasets"
    _error(batch.http("POST", datasets, json={"datasetId": "x"}), 400, "dataset")
    _error(
        batch.http("POST", datasets, json={"datasetId": "Bad!", "dataset": {}}), 400, "datasetId"
    )
    _error(batch.http("POST", datasets, json={"datasetId": "ok-input", "dataset": {}}), 409)
    _error(
        batch.http("POST", datasets, json={"datasetId": "u", "dataset": {"externalUrl": "gs://b"}}),
        400,
        "externalUrl",
    )
    # a source named in another collection or account is refused, never read as the own
    # `ok-input` its last part names
    for source in ("accounts/acme/models/ok-input", "acme/ok-input",
                   "accounts/acme/datasets/ok-input/x", "accounts/other/datasets/ok-input"):  # fmt: skip
        copy = {"datasetId": "copy", "dataset": {}, "sourceDatasetId": source}
        error = _error(batch.http("POST", datasets, json=copy), 400, repr(source))
        assert error["param"] == "sourceDatasetId"
    made = {
        "datasetId": "made",
        "dataset": {"sourceJobName": "accounts/other/batchInferenceJobs/j"},
    }
    error = _error(batch.http("POST", datasets, json=made), 400, "another account's batch")
    assert error["param"] == "dataset.sourceJobName"
    made["dataset"]["sourceJobName"] = "j"  # kept as the full name the server gives its jobs
    named = batch.http("POST", datasets, json=made).json()["sourceJobName"]
    assert named == f"accounts/{ACCOUNT}/batchInferenceJobs/j"
    batch.http("POST", datasets, json={"datasetId": "empty", "dataset": {}})
    _error(create({**good, "inputDatasetId": "empty"}), 400, "no uploaded file")
    _error(batch.http("POST", datasets + "/empty:validateUpload", json={}), 400, "no file")
    _error(
        batch.http(
            "POST", datasets + "/empty:getUploadEndpoint", json={"filenameToSize": {"../x": "1"}}
        ),
        400,
        "file name",
    )
    _error(batch.http("POST", datasets + "/empty:upload", content=b"{}"), 415, "multipart")
    _error(batch.http("POST", datasets + "/empty:upload", files={"other": b"x"}), 400, "'file'")
    _error(batch.http("GET", datasets + "/nope"), 404)
    _error(batch.http("GET", datasets, params={"filter": "state = = 1"}), 400, "filter")


def test_line_separators_inside_json_strings_are_text(batch):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps with
    ensure_ascii=False writes them so): a line ends at a newline only."""
    prompt = "a\u2028b\u2029c\x85d"
    lines = [{"custom_id": "sep", "body": {"prompt": prompt, "max_tokens": 2}}]
    batch.upload(
        "separators", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()
    )
    fw = batch.client()
    assert fw.datasets.get("separators").example_count == "1"
    fw.batch_inference_jobs.create(
        batch_inference_job_id="separators", model=MODEL, input_dataset_id="separators"
    )
    job = batch.wait("separators", lambda j: j.state == "JOB_STATE_COMPLETED")
    (result,) = batch.download(job.output_dataset_id)["results.jsonl"]
    assert result["custom_id"] == "sep"


def test_a_dataset_of_several_files_is_read_as_one(batch):
    """Two uploads to a dataset, each without a newline at its end: the first file's last
    line ran into the second's first ("line 1 is not valid JSON: Extra data"), though the
    dataset counted both."""
    fw = batch.client()
    fw.datasets.create(dataset_id="two-files", dataset={})
    for i in (1, 2):
        fw.datasets.upload("two-files", file=(f"part{i}.jsonl", json.dumps(chat_line(i)).encode()))
    assert fw.datasets.get("two-files").example_count == "2"
    batch.start_job("two-files-job", "two-files", 2)
    done = batch.wait("two-files-job", lambda j: j.state == "JOB_STATE_COMPLETED")
    assert done.job_progress.total_input_requests == 2
    results = batch.download(done.output_dataset_id)["results.jsonl"]
    assert sorted(r["custom_id"] for r in results) == ["req-1", "req-2"]


def test_a_running_jobs_datasets_cannot_be_deleted_or_changed(batch):
    batch.upload("keep-input", [chat_line(i) for i in range(300)])
    fw = batch.client()
    urls = fw.datasets.get_upload_endpoint("keep-input", filename_to_size={"more.jsonl": "10"})
    signed = urls.filename_to_signed_urls["more.jsonl"]  # asked for before the job
    batch.start_job("keep-output", "keep-input", 8)
    datasets = f"/v1/accounts/{ACCOUNT}/datasets"
    r = batch.http("DELETE", datasets + "/keep-output-output")
    error = _error(r, 400, "keep-output", "cancel the job")
    assert error["code"] == "FAILED_PRECONDITION"
    # nor its input, which it reads again after a restart (deleted, the job failed then)
    error = _error(batch.http("DELETE", datasets + "/keep-input"), 400, "keep-input", "cancel")
    assert error["code"] == "FAILED_PRECONDITION"
    # nor changed: a file added to it was read too when the job resumed (or, pending, started),
    # another count of lines than the job's, or a custom_id used again that failed it
    with pytest.raises(fireworks.BadRequestError, match="keep-input is the input of"):
        fw.datasets.upload("keep-input", file=("more.jsonl", jsonl([chat_line(1000)])))
    with pytest.raises(fireworks.BadRequestError, match="keep-input is the input of"):
        fw.datasets.get_upload_endpoint("keep-input", filename_to_size={"more.jsonl": "10"})
    _error(httpx.put(signed, content=jsonl([chat_line(1000)])), 400, "keep-input is the input")
    batch.http("POST", f"/v1/accounts/{ACCOUNT}/batchInferenceJobs/keep-output:cancel")
    batch.wait("keep-output", lambda j: j.state == "JOB_STATE_CANCELLED")
    assert batch.http("DELETE", datasets + "/keep-input").status_code == 200
    assert batch.http("DELETE", datasets + "/keep-output-output").status_code == 200
    # a dataset made again under that id starts empty
    leftover = batch.data / "datasets" / ACCOUNT / "keep-output-output"
    leftover.mkdir(parents=True, exist_ok=True)
    (leftover / "results.jsonl").write_text("{}\n")
    fw.datasets.create(dataset_id="keep-output-output", dataset={})
    urls = fw.datasets.get_download_endpoint("keep-output-output").filename_to_signed_urls
    assert not urls
    batch.server.wait_idle()


def test_an_upload_cut_off_midway_is_no_server_error(batch):
    """A client that leaves while sending a dataset file (either way of uploading) is its own
    doing: no 500, no traceback in the log, the dataset still waits for its file."""
    fw = batch.client()
    fw.datasets.create(dataset_id="cut-off", dataset={})
    base = f"/v1/accounts/{ACCOUNT}/datasets/cut-off"
    signed = fw.datasets.get_upload_endpoint("cut-off", filename_to_size={"in.jsonl": 10**6})
    put_path = signed.filename_to_signed_urls["in.jsonl"].split(str(batch.server.port), 1)[1]
    heads = [
        f"POST {base}:upload HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
        f"Authorization: Bearer {batch.key}\r\n",
        f"PUT {put_path} HTTP/1.1\r\n",
    ]
    for head in heads:
        with socket.create_connection(("127.0.0.1", batch.server.port), timeout=10) as s:
            s.sendall(
                (head + "Host: x\r\nContent-Length: 1000000\r\n\r\n").encode()
                + b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
                + b"\r\n"
                + b"x" * 10_000
            )
            time.sleep(0.3)
    time.sleep(0.5)
    assert fw.datasets.get("cut-off").state == "UPLOADING"
    assert "Traceback" not in batch.server.log()
    assert "unhandled error" not in batch.server.log()


def _send_in_two(batch, head: str, body: bytes, meanwhile) -> int:
    """Send a request whose body comes in two halves, `meanwhile()` run between: its status."""
    with socket.create_connection(("127.0.0.1", batch.server.port), timeout=30) as s:
        s.sendall(f"{head}Host: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        s.sendall(body[: len(body) // 2])
        time.sleep(0.3)  # the server waits for the rest
        meanwhile()
        s.sendall(body[len(body) // 2 :])
        return int(s.recv(4096).split(b" ", 2)[1])


def test_a_dataset_changed_or_deleted_while_its_file_arrives(batch):
    """An upload read its dataset before the file's bytes arrived and wrote it whole after:
    a PATCH in between was undone (displayName back, 6 of 6), and a dataset deleted in between
    had the file written into a folder of its own again (orphaned on disk, the upload a 200)
    or the upload a 500. Now the PATCH stays, and the upload of a deleted dataset is a 404."""
    fw, datasets = batch.client(), f"/v1/accounts/{ACCOUNT}/datasets"
    auth = f"Authorization: Bearer {batch.key}\r\n"
    form = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        + jsonl([chat_line(i) for i in range(2000)])
        + b"\r\n--XyZ--\r\n"
    )
    multipart = f"Content-Type: multipart/form-data; boundary=XyZ\r\n{auth}"
    fw.datasets.create(dataset_id="slow-patch", dataset={})
    head = f"POST {datasets}/slow-patch:upload HTTP/1.1\r\n{multipart}"
    rename = lambda: fw.datasets.update("slow-patch", display_name="renamed")  # noqa: E731
    assert _send_in_two(batch, head, form, rename) == 200
    found = fw.datasets.get("slow-patch")
    assert (found.display_name, found.state, found.example_count) == ("renamed", "READY", "2000")
    for way in ("upload", "put"):
        fw.datasets.create(dataset_id=f"slow-{way}", dataset={})
        if way == "upload":
            head, body = f"POST {datasets}/slow-{way}:upload HTTP/1.1\r\n{multipart}", form
        else:
            sizes = {"a.jsonl": len(form)}
            urls = fw.datasets.get_upload_endpoint(f"slow-{way}", filename_to_size=sizes)
            url = urls.filename_to_signed_urls["a.jsonl"]
            head, body = f"PUT {url.split(str(batch.server.port), 1)[1]} HTTP/1.1\r\n", form
        delete = lambda: fw.datasets.delete(f"slow-{way}")  # noqa: E731, B023
        assert _send_in_two(batch, head, body, delete) == 404, way
        assert not (batch.data / "datasets" / ACCOUNT / f"slow-{way}").exists(), way
    assert not list((batch.data / "datasets" / ".partial").iterdir())
    assert "Traceback" not in batch.server.log()


def test_a_dataset_patch_changes_only_what_it_may(batch):
    """A PATCH ignored every field but displayName, format and userUploaded (a 200 that kept
    exampleCount, sourceJobName, name...): another value of one is a 400 naming it, the GET
    body sent back unchanged a 200 (state, status and updateTime, which the server moves, are
    not compared)."""
    fw, path = batch.client(), f"/v1/accounts/{ACCOUNT}/datasets/patched"
    batch.upload("patched", [chat_line(0), chat_line(1)])
    renamed = fw.datasets.update("patched", display_name="renamed", format="CHAT")
    assert (renamed.display_name, renamed.format, renamed.example_count) == ("renamed", "CHAT", "2")
    got = batch.http("GET", path).json()
    echoed = batch.http("PATCH", path, json=got)
    assert echoed.status_code == 200, echoed.text
    assert {k: v for k, v in echoed.json().items() if k != "updateTime"} == {
        k: v for k, v in got.items() if k != "updateTime"
    }
    for field, value in (
        ("example_count", "7"),
        ("source_job_name", f"accounts/{ACCOUNT}/batchInferenceJobs/x"),
        ("splitted", {"source_dataset_id": "x"}),
    ):
        with pytest.raises(fireworks.BadRequestError) as err:
            fw.datasets.update("patched", display_name="again", **{field: value})
        error = err.value.body.get("error", err.value.body)  # type: ignore[union-attr]
        camel = {"example_count": "exampleCount", "source_job_name": "sourceJobName"}
        name = camel.get(field, field)
        assert error["param"] == name and "cannot be changed" in error["message"], error
    r = batch.http("PATCH", path, json={**got, "name": f"accounts/{ACCOUNT}/datasets/other"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    # what the server moves by itself (an upload ending) is not compared: a GET taken during
    # an upload may be sent back after it
    r = batch.http("PATCH", path, json={**got, "state": "UPLOADING", "updateTime": "x"})
    assert r.status_code == 200 and r.json()["state"] == "READY", r.text
    assert fw.datasets.get("patched").display_name == "renamed"  # no refused PATCH wrote it


def test_cli(batch, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([chat_line(i) for i in range(5)]))
    run = cli_runner(batch.server.url, batch.key, ACCOUNT)

    def girandole(*args: str) -> subprocess.CompletedProcess:
        return run("batch", *args)

    out = tmp_path / "out.jsonl"
    created = girandole(
        "create", str(requests), "--model", MODEL, "--job-id", "cli", "--max-tokens", "3",
        "--wait", "--output", str(out),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "JOB_STATE_COMPLETED" in created.stdout and "5/5" in created.stdout
    assert sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines()) == [
        f"req-{i}" for i in range(5)
    ]
    assert (tmp_path / "out.errors.jsonl").read_text() == ""
    got = girandole("get", f"accounts/{ACCOUNT}/batchInferenceJobs/cli", "--json")
    assert json.loads(got.stdout)["jobProgress"]["successfullyProcessedRequests"] == 5
    listed = girandole("list")
    assert listed.returncode == 0 and "cli" in listed.stdout and "100%" in listed.stdout
    cancelled = girandole("cancel", "cli")  # already done: stays COMPLETED
    assert cancelled.returncode == 0 and "JOB_STATE_COMPLETED" in cancelled.stdout
    missing = girandole("get", "nope")
    assert missing.returncode == 1 and "not found" in missing.stderr
    unreadable = girandole("create", str(tmp_path / "none.jsonl"), "--model", MODEL)
    assert unreadable.returncode == 1 and "cannot read" in unreadable.stderr


def test_interactive_requests_take_the_capacity(batch):
    """While 16 interactive streams (the runner's --batch-max-in-flight) run, the job submits no
    new line; it goes on once they end."""
    import threading

    batch.upload("yield-input", [chat_line(i, max_tokens=4) for i in range(300)])
    fw = batch.client()
    fw.batch_inference_jobs.create(
        batch_inference_job_id="yield", model=MODEL, input_dataset_id="yield-input"
    )
    batch.wait("yield", lambda j: (j.job_progress.total_processed_requests or 0) >= 10)
    streaming = threading.Barrier(17)
    stop = threading.Event()
    held: list[int] = []  # streams still running when the check was done
    ended: list[int] = []  # streams that ran out before it

    def interactive(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 6000, "ignore_eos": True,
                "stream": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {batch.key}"}
        url = batch.server.url + "/v1/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=300) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)  # streaming: it holds its admission slot
            streaming.wait()
            for _ in lines:
                if stop.is_set():  # leaving closes the stream: the server aborts it
                    held.append(i)
                    return
        ended.append(i)

    threads = [threading.Thread(target=interactive, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    streaming.wait()

    def processed() -> int:
        return fw.batch_inference_jobs.get("yield").job_progress.total_processed_requests

    # The lines in flight when the streams came finish (a second on a quiet machine, more on a
    # busy one); then the count stays. A job that kept submitting would never hold still.
    before, deadline = processed(), time.monotonic() + 20
    while True:
        time.sleep(1.5)
        after = processed()
        if after == before or time.monotonic() > deadline:
            break
        before = after
    # the streams ran throughout (6,000 tokens each would take minutes); cut them now rather
    # than wait for them (16 x 6,000 tokens: 4-5 minutes of this suite)
    stop.set()
    for t in threads:
        t.join()
    assert ended == [] and sorted(held) == list(range(16))
    assert after == before < 300
    job = batch.wait("yield", lambda j: j.state == "JOB_STATE_COMPLETED")
    assert job.job_progress.successfully_processed_requests == 300
