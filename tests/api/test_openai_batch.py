"""OpenAI's Files and Batch APIs (`girandole.api.openai_batch`) on the real server and default
model, driven by the openai SDK's `client.files` and `client.batches`: a batch's results equal
the synchronous answers, with an error file for the bad line and usage summed; cancel; the same
job seen through Fireworks' batch API; other accounts and read-only keys kept out; the 4xx."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from api_helpers import ACCOUNT, API_KEY, MODEL, usage_row

from girandole.registry.keystore import Database
from girandole.registry.roles import INFERENCE_USER

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
ENDED = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def line(custom_id: str, content: str, url: str = CHAT, **body) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


def wait_for(client: openai.OpenAI, batch_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ENDED:
            return batch
        assert time.monotonic() < deadline, f"{batch_id} still {batch.status}"
        time.sleep(0.2)


def key_of(server, account: str, **kw) -> str:
    key, _ = Database.in_folder(server.log_path.parent / f"data-{server.port}").create_key(
        account, **kw
    )
    return key


def test_a_batch_answers_as_the_synchronous_requests_do(client, server):
    questions = ["What is the capital of France?", "Name a color.", "Count to three."]
    lines = [line(f"q{i}", q, max_tokens=8, temperature=0) for i, q in enumerate(questions)]
    lines.append(line("bad", "x", temperature=9))  # the endpoint's 400: in the error file
    uploaded = client.files.create(file=("questions.jsonl", jsonl(lines)), purpose="batch")
    assert (uploaded.filename, uploaded.purpose, uploaded.bytes) == (
        "questions.jsonl", "batch", len(jsonl(lines)))  # fmt: skip
    assert client.files.content(uploaded.id).content == jsonl(lines)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                  completion_window="24h", metadata={"run": "1"})  # fmt: skip
    assert batch.status == "in_progress" and batch.id.startswith("batch_")
    assert (batch.model, batch.metadata, batch.request_counts.total) == (MODEL, {"run": "1"}, 4)
    done = wait_for(client, batch.id)
    assert done.status == "completed" and done.errors is None
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    assert done.completed_at >= done.finalizing_at >= done.created_at
    results = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["q0", "q1", "q2"]
    for result in results:
        i = int(result["custom_id"][1:])
        sync = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": questions[i]}], max_tokens=8,
            temperature=0,
        )  # fmt: skip
        body = result["response"]["body"]
        assert result["response"]["status_code"] == 200 and result["error"] is None
        assert body["choices"][0]["message"]["content"] == sync.choices[0].message.content
    (error,) = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
    assert "temperature" in error["error"]["message"]
    assert done.usage.input_tokens == sum(r["response"]["body"]["usage"]["prompt_tokens"]
                                          for r in results)  # fmt: skip
    assert done.usage.output_tokens == sum(r["response"]["body"]["usage"]["completion_tokens"]
                                           for r in results)  # fmt: skip
    outputs = client.files.retrieve(done.output_file_id)
    assert outputs.purpose == "batch_output" and outputs.bytes > 0
    # listed, newest first; the same job through Fireworks' batch API
    assert client.batches.list().data[0].id == batch.id
    ids = [f.id for f in client.files.list()]
    assert {uploaded.id, done.output_file_id, done.error_file_id} <= set(ids)
    assert [f.id for f in client.files.list(purpose="batch")][0] == uploaded.id
    job_id = batch.id.replace("_", "-")
    job = httpx.get(f"{server.url}/v1/accounts/{ACCOUNT}/batchInferenceJobs/{job_id}",
                    headers=server.headers).json()  # fmt: skip
    assert job["state"] == "JOB_STATE_COMPLETED" and job["model"] == MODEL
    assert job["jobProgress"]["successfullyProcessedRequests"] == 3
    # a deleted file is gone, its bytes too
    assert client.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(uploaded.id)
    client.files.delete(done.output_file_id)  # the batch no longer names it
    again = client.batches.retrieve(batch.id)
    assert again.output_file_id is None and again.error_file_id == done.error_file_id


def test_embeddings_and_responses_batches(client, server):
    texts = ["a lighthouse", "the sea at night"]
    embed = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": MODEL, "input": t}} for i, t in enumerate(texts)]  # fmt: skip
    respond = [
        {"custom_id": "r0", "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": "Name a color.", "max_output_tokens": 6,
                  "temperature": 0}},
        {"custom_id": "r1", "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": "x", "background": True}},
    ]  # fmt: skip
    batches = {}
    for name, lines, endpoint in (("embed", embed, "/v1/embeddings"),
                                  ("respond", respond, "/v1/responses")):  # fmt: skip
        uploaded = client.files.create(file=(f"{name}.jsonl", jsonl(lines)), purpose="batch")
        batches[name] = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,
                                              completion_window="24h")  # fmt: skip
    embedded = wait_for(client, batches["embed"].id)
    assert (embedded.request_counts.completed, embedded.request_counts.failed) == (2, 0)
    for text in client.files.content(embedded.output_file_id).text.splitlines():
        result = json.loads(text)
        i = int(result["custom_id"][1:])
        vector = result["response"]["body"]["data"][0]["embedding"]
        sync = client.embeddings.create(model=MODEL, input=texts[i], encoding_format="float")
        assert len(vector) == len(sync.data[0].embedding)
        assert max(abs(a - b) for a, b in zip(vector, sync.data[0].embedding)) < 1e-3
        # the line's request id is its usage row's (an embeddings body has no id of its own)
        ((endpoint, status, prompt, _),) = usage_row(server, result["response"]["request_id"])
        assert (endpoint, status) == ("embeddings", 200) and prompt > 0
    assert embedded.usage.input_tokens > 0 and embedded.usage.output_tokens == 0
    responded = wait_for(client, batches["respond"].id)
    assert (responded.request_counts.completed, responded.request_counts.failed) == (1, 1)
    (result,) = [json.loads(x) for x in
                 client.files.content(responded.output_file_id).text.splitlines()]  # fmt: skip
    body = result["response"]["body"]
    sync = client.responses.create(model=MODEL, input="Name a color.", max_output_tokens=6,
                                   temperature=0)  # fmt: skip
    assert body["object"] == "response" and body["output"][0]["content"][0]["text"] == (
        sync.output_text
    )
    (error,) = [json.loads(x) for x in
                client.files.content(responded.error_file_id).text.splitlines()]  # fmt: skip
    assert error["custom_id"] == "r1" and "background" in error["error"]["message"]
    assert usage_row(server, error["response"]["request_id"])[0][:2] == ("responses", 400)


def test_cancel(client):
    story = [line(f"s{i}", f"Write a long story about the number {i}.", max_tokens=400)
             for i in range(12)]  # fmt: skip
    uploaded = client.files.create(file=("stories.jsonl", jsonl(story)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                  completion_window="24h")  # fmt: skip
    # its input is read again after a restart: deleting it failed the batch ("has no file")
    with pytest.raises(openai.BadRequestError, match=f"input of batch {batch.id}"):
        client.files.delete(uploaded.id)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    cancelled = wait_for(client, batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert cancelled.request_counts.completed < 12
    if cancelled.output_file_id is not None:  # the lines that finished before the cancel
        done = client.files.content(cancelled.output_file_id).text.splitlines()
        assert len(done) == cancelled.request_counts.completed
    assert client.batches.cancel(batch.id).status == "cancelled"  # idempotent
    assert client.files.delete(uploaded.id).deleted  # once the batch has ended


def test_bad_requests_name_the_field(client, server):
    def create(**body) -> httpx.Response:
        return httpx.post(server.url + "/v1/batches", headers=server.headers, timeout=30,
                          json={"endpoint": CHAT, "completion_window": "24h", **body})  # fmt: skip

    def upload(lines: list[dict] | bytes, purpose: str = "batch") -> str:
        data = lines if isinstance(lines, bytes) else jsonl(lines)
        return client.files.create(file=("in.jsonl", data), purpose=purpose).id

    good = upload([line("a", "hi")])
    other_model = line("b", "hi")
    other_model["body"]["model"] = "accounts/fireworks/models/other"
    no_model = line("c", "hi")
    del no_model["body"]["model"]
    cases = [
        (create(input_file_id=good, endpoint="/v1/moderations"), 400, "endpoint", "embeddings"),
        (create(input_file_id=good, endpoint="/v1/messages"), 400, "endpoint", "responses"),
        (create(input_file_id=good, completion_window="1h"), 400, "completion_window", "24h"),
        (create(input_file_id=good, extra=1), 400, "extra", "Extra inputs"),
        (create(input_file_id=good, output_expires_after={"anchor": "completed_at",
                "seconds": 3600}), 400, "output_expires_after.anchor", "created_at"),
        (create(input_file_id=good, output_expires_after={"anchor": "created_at",
                "seconds": 3599}), 400, "output_expires_after.seconds", "3600"),
        (create(input_file_id=good, output_expires_after={"anchor": "created_at",
                "seconds": 2592001}), 400, "output_expires_after.seconds", "2592000"),
        (create(input_file_id=good, output_expires_after={"anchor": "created_at"}), 400,
         "output_expires_after.seconds", None),
        (create(input_file_id="file-nope"), 404, "id", "file-nope"),
        (create(input_file_id=upload([line("a", "hi")], "user_data")), 400, "input_file_id",
         "purpose"),
        (create(input_file_id=upload([line("a", "hi", url="/v1/completions")])), 400,
         "input_file_id", "line 1"),
        (create(input_file_id=upload([line("a", "hi"), other_model])), 400, "input_file_id",
         "2 models"),
        (create(input_file_id=upload([no_model])), 400, "input_file_id", "body.model"),
        (create(input_file_id=upload(b'{"custom_id": "a"\n')), 400, "input_file_id", "line 1"),
        (create(input_file_id=upload([line("a", "hi"), line("a", "hi")])), 400,
         "input_file_id", "custom_id"),
        (create(input_file_id=upload([other_model])), 404, "model", "not found"),
    ]  # fmt: skip
    for response, status, param, words in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param, error
        assert words is None or words in error["message"], error
    files = server.url + "/v1/files"
    no_purpose = httpx.post(files, headers=server.headers, files={"file": ("a.jsonl", b"{}")})
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"
    bad_purpose = httpx.post(files, headers=server.headers, files={"file": ("a", b"{}")},
                             data={"purpose": "nonsense"})  # fmt: skip
    assert bad_purpose.status_code == 400 and "nonsense" in bad_purpose.text
    no_file = httpx.post(files, headers=server.headers, files={"purpose": (None, b"batch")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    other_part = httpx.post(files, headers=server.headers, data={"purpose": "batch"},
                            files={"other": ("a", b"{}")})  # fmt: skip
    assert other_part.status_code == 400 and other_part.json()["error"]["param"] == "other"
    expiring = httpx.post(files, headers=server.headers, files={"file": ("a", b"{}")},
                          data={"purpose": "batch", "expires_after[seconds]": "3600"})  # fmt: skip
    assert expiring.status_code == 400 and "expires_after" in expiring.text
    not_a_form = httpx.post(files, headers=server.headers, json={"purpose": "batch"})
    assert not_a_form.status_code == 415
    for path in ("/v1/batches/batch_nope", "/v1/batches/batch_" + "0" * 32,
                 "/v1/files/file-nope"):  # fmt: skip
        assert httpx.get(server.url + path, headers=server.headers).status_code == 404


def test_an_output_expiry_policy_is_accepted_as_openai_accepts_it(client):
    """`output_expires_after` (the SDK's argument) is checked and kept; nothing expires here,
    so the output file's `expires_at` stays null (a Batch object never shows the policy)."""
    uploaded = client.files.create(file=("x.jsonl", jsonl([line("x", "hi", max_tokens=2)])),
                                   purpose="batch")  # fmt: skip
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7 * 24 * 3600},
    )  # fmt: skip
    assert batch.status == "in_progress" and batch.request_counts.total == 1
    done = wait_for(client, batch.id)
    assert done.status == "completed"
    assert client.files.retrieve(done.output_file_id).expires_at is None


def test_keys_see_their_own_account_and_roles_hold(client, server):
    uploaded = client.files.create(
        file=("a.jsonl", jsonl([line("a", "hi", max_tokens=4)])), purpose="batch"
    )
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                  completion_window="24h")  # fmt: skip
    other = {"Authorization": f"Bearer {key_of(server, 'other-account')}"}
    for path in (f"/v1/files/{uploaded.id}", f"/v1/files/{uploaded.id}/content",
                 f"/v1/batches/{batch.id}"):  # fmt: skip
        assert httpx.get(server.url + path, headers=other).status_code == 404
    assert httpx.get(server.url + "/v1/files", headers=other).json()["data"] == []
    cancel = httpx.post(f"{server.url}/v1/batches/{batch.id}/cancel", headers=other)
    assert cancel.status_code == 404
    reader = {"Authorization": f"Bearer {key_of(server, ACCOUNT, role=INFERENCE_USER)}"}
    refused = httpx.post(server.url + "/v1/files", headers=reader, data={"purpose": "batch"},
                         files={"file": ("a", b"{}")})  # fmt: skip
    assert refused.status_code == 403 and "role" in refused.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/batches/{batch.id}", headers=reader).status_code == 200
    assert httpx.get(server.url + "/v1/files", headers={}).status_code == 401
    wait_for(client, batch.id)


def test_a_custom_id_that_is_not_text_is_a_400_naming_the_line(client, server):
    """JSON's "\\ud800" is an unpaired surrogate, which no UTF-8 file or database row holds:
    it was accepted, its line ran, and then the whole batch failed (INTERNAL,
    UnicodeEncodeError) when the result was stored."""
    lone = jsonl([line("ok", "hi", max_tokens=1), line("q\ud800", "hi", max_tokens=1)])
    assert b'"q\\ud800"' in lone  # json.dumps escapes it
    uploaded = client.files.create(file=("lone.jsonl", lone), purpose="batch")
    response = httpx.post(
        server.url + "/v1/batches", headers=server.headers,
        json={"input_file_id": uploaded.id, "endpoint": CHAT, "completion_window": "24h"},
    )  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "input_file_id"
    assert "line 2" in error["message"] and "surrogate" in error["message"], error


def test_the_server_answers_while_a_large_batch_is_checked(client, server):
    """Creating a batch reads and checks its whole file (here 50,000 lines, 100 MB: seconds).
    That ran on the event loop, so every other request (a stream's next token, /health) waited
    for it; it runs beside it now: a request sent meanwhile is answered first."""
    pad = "word " * 400
    big = jsonl([line(f"c{i}", pad, max_tokens=1) for i in range(50_000)])
    uploaded = client.files.create(file=("big.jsonl", big), purpose="batch")
    del big
    created: dict = {}

    def create() -> None:
        created["batch"] = client.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
        )
        created["at"] = time.monotonic()

    thread = threading.Thread(target=create)
    thread.start()
    time.sleep(0.3)  # the check under way
    assert httpx.get(server.url + "/health", timeout=60).status_code == 200
    answered = time.monotonic()
    thread.join()
    assert answered < created["at"], "/health waited for the batch's file to be checked"
    client.batches.cancel(created["batch"].id)
    wait_for(client, created["batch"].id)
    server.wait_idle()


def test_a_batchs_files_are_listed_once_it_has_ended(client, server):
    """The output and error files were named as files only when the batch was next retrieved:
    till then /v1/files did not list them and /v1/files/{id} was a 404, and their created_at
    was the time of that retrieve."""
    lines = [line("ok", "hi", max_tokens=2), line("bad", "x", temperature=9)]
    uploaded = client.files.create(file=("two.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                  completion_window="24h")  # fmt: skip
    job = f"{server.url}/v1/accounts/{ACCOUNT}/batchInferenceJobs/batch-{batch.id[6:]}"
    deadline = time.monotonic() + 120
    while httpx.get(job, headers=server.headers).json()["state"] != "JOB_STATE_COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.2)  # watched through Fireworks' API: the batch is not retrieved
    output, errors = (f"file-{batch.id[6:]}-{kind}" for kind in ("output", "errors"))
    listed = [f.id for f in client.files.list(purpose="batch_output")]
    assert output in listed and errors in listed
    assert client.files.retrieve(output).filename == f"{batch.id}_output.jsonl"
    time.sleep(1.5)
    done = client.batches.retrieve(batch.id)
    assert (done.output_file_id, done.error_file_id) == (output, errors)
    assert client.files.retrieve(output).created_at <= done.completed_at + 1


def test_a_file_deleted_while_its_content_is_read(server):
    """Reads of a file's content beside its DELETE get the whole file or a 404: the bytes were
    opened only after the status line went, so a delete in between was a 500 or a body cut
    short (about a quarter of such reads)."""
    data = b'{"x": 1}\n' * 2000

    async def rounds() -> list[int | str]:
        seen: list[int | str] = []
        async with httpx.AsyncClient(headers=server.headers, timeout=60) as c:
            for _ in range(8):
                up = await c.post(server.url + "/v1/files", data={"purpose": "batch"},
                                  files={"file": ("a.jsonl", data)})  # fmt: skip
                url = server.url + f"/v1/files/{up.json()['id']}"
                calls = [c.get(url + "/content") for _ in range(10)]
                calls.insert(5, c.delete(url))
                answers = await asyncio.gather(*calls, return_exceptions=True)
                for r in answers:
                    if isinstance(r, BaseException):
                        seen.append(type(r).__name__)
                    elif r.status_code == 200 and r.request.method == "GET":
                        seen.append(200 if r.content == data else "short")
                    else:
                        seen.append(r.status_code)
        return seen

    seen = asyncio.run(rounds())
    assert set(seen) <= {200, 404}, seen


def test_a_cancelled_jobs_output_deleted_at_once_stays_deleted(server):
    """A cancelled job's output dataset may be deleted at once (the job has ended), but the
    runner wrote what was done into it after its lines in flight stopped: the dataset's folder
    came back on disk (8 of 8), files no request could read or delete. Nothing is written to a
    deleted dataset now."""
    base = f"{server.url}/v1/accounts/{ACCOUNT}"
    http = httpx.Client(headers=server.headers, timeout=60)  # one connection: no delay between

    def call(method: str, path: str, **kw) -> httpx.Response:
        return http.request(method, base + path, **kw)

    def run(job_id: str, lines: list[dict]) -> None:
        call("POST", "/datasets", json={"datasetId": f"{job_id}-in", "dataset": {}})
        call("POST", f"/datasets/{job_id}-in:upload", files={"file": ("a.jsonl", jsonl(lines))})
        created = call("POST", "/batchInferenceJobs", params={"batchInferenceJobId": job_id},
                       json={"model": MODEL, "inputDatasetId": f"{job_id}-in"})  # fmt: skip
        assert created.status_code == 200, created.text

    def state(job_id: str) -> dict:
        return call("GET", f"/batchInferenceJobs/{job_id}").json()

    run("gone-job", [line(f"c{i}", "Tell me a story.", max_tokens=64) for i in range(20)])
    deadline = time.monotonic() + 60
    while state("gone-job")["state"] != "JOB_STATE_RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert call("POST", "/batchInferenceJobs/gone-job:cancel").json()["state"] == (
        "JOB_STATE_CANCELLED"
    )
    assert call("DELETE", "/datasets/gone-job-output").status_code == 200
    run("after-job", [line("one", "hi", max_tokens=1)])  # one job at a time: after the first
    while state("after-job")["state"] != "JOB_STATE_COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert call("GET", "/datasets/gone-job-output").status_code == 404
    http.close()
    folder = server.log_path.parent / f"data-{server.port}" / "datasets" / ACCOUNT
    assert not (folder / "gone-job-output").exists()


def test_an_input_deleted_while_a_batch_is_created_from_it(server):
    """A batch's input is read in a thread; deleted meanwhile (no job read it yet, so the
    delete was allowed), the batch was still created, and failed at once for want of its
    input (6 of 6), or the read was a 500. Now either the batch is made and the delete refused,
    or the delete wins and the create is the 4xx of a missing input."""
    many = jsonl([line(f"c{i}", "hi", max_tokens=1) for i in range(20_000)])
    fw = f"/v1/accounts/{ACCOUNT}"

    async def rounds() -> list[tuple[int, int]]:
        seen = []
        async with httpx.AsyncClient(headers=server.headers, timeout=60) as c:
            for k in range(2):
                ups = await c.post(server.url + "/v1/files", data={"purpose": "batch"},
                                   files={"file": ("many.jsonl", many)})  # fmt: skip
                file_id = ups.json()["id"]
                if k % 2:  # Fireworks' job over the file's dataset
                    create = c.post(server.url + f"{fw}/batchInferenceJobs",
                                    json={"model": MODEL, "inputDatasetId": file_id})  # fmt: skip
                else:
                    create = c.post(server.url + "/v1/batches", json={
                        "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"})  # fmt: skip

                async def delete() -> httpx.Response:
                    await asyncio.sleep(0.05)  # the create is reading the file
                    return await c.delete(server.url + f"/v1/files/{file_id}")  # noqa: B023

                made, deleted = await asyncio.gather(create, delete())
                seen.append((made.status_code, deleted.status_code))
                if made.status_code == 200:
                    job = made.json()
                    cancel = (
                        f"/v1/batches/{job['id']}/cancel" if "id" in job
                        else f"{fw}/batchInferenceJobs/{job['name'].rsplit('/', 1)[-1]}:cancel"
                    )  # fmt: skip
                    await c.post(server.url + cancel)
        return seen

    seen = asyncio.run(rounds())
    assert all(s in ((200, 400), (404, 200), (400, 200)) for s in seen), seen
    server.wait_idle()


def test_an_uploaded_files_dataset_takes_no_other_file(client, server):
    """A file uploaded through /v1/files is a dataset of its own (the file's id) to Fireworks'
    API, whose :upload could add a file to it: a batch of it counted the lines of its one file
    and then ran every file's. Its content is fixed now: the upload is a 400."""
    uploaded = client.files.create(file=("fixed.jsonl", jsonl([line("a", "hi")])), purpose="batch")
    url = f"{server.url}/v1/accounts/{ACCOUNT}/datasets/{uploaded.id}:upload"
    r = httpx.post(url, headers=server.headers, files={"file": ("more.jsonl", b"{}\n")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "FAILED_PRECONDITION", r.text
    assert uploaded.id in r.json()["error"]["message"]
    assert client.files.content(uploaded.id).read() == jsonl([line("a", "hi")])
