"""The batch job's parts alone: reading an input file, the job's parameters, and the result rows
of BatchStore (a line's result is written once, and not after its job stopped running)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from girandole.batch.files import FileStore
from girandole.batch.lines import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    MESSAGES,
    RESPONSES,
    InputError,
    parse_parameters,
    read_input,
    request_body,
)
from girandole.batch.runner import line_result
from girandole.batch.store import CANCELLED, RUNNING, BatchStore, LineResult
from girandole.registry.keystore import Database


def jsonl(*items) -> bytes:
    return "".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items).encode()


def test_read_input_lines_and_endpoints():
    data = jsonl(
        {"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}},
        "",
        {"custom_id": "b", "body": {"prompt": "Once"}},
        {"custom_id": "c", "url": "/v1/completions", "method": "POST", "body": {"prompt": "x"}},
        {"custom_id": "d", "url": "/embeddings", "body": {"input": "x"}},
        {"custom_id": "e", "url": "/inference/v1/responses", "body": {"input": "x"}},
        {"custom_id": "f", "url": "/v1/messages", "body": {"model": "own", "messages": []}},
    )
    lines = read_input(data, 10)
    assert [(line.line, line.custom_id, line.url) for line in lines] == [
        (0, "a", CHAT),
        (1, "b", COMPLETIONS),
        (2, "c", COMPLETIONS),
        (3, "d", EMBEDDINGS),
        (4, "e", RESPONSES),
        (5, "f", MESSAGES),
    ]
    # only generating lines take the job's parameters; an embeddings request has no stream
    params = {"max_tokens": 5}
    assert request_body(lines[3], "m", params) == {"input": "x", "model": "m"}
    assert request_body(lines[4], "m", params) == {"input": "x", "model": "m", "stream": False}
    # a job without a model of its own (a message batch): each line runs the one it names
    assert request_body(lines[5], "", params) == {"model": "own", "messages": [], "stream": False}
    # token counts from every usage shape: chat's, and Responses'/Messages' input and output
    for usage in ({"prompt_tokens": 7, "completion_tokens": 3,
                   "prompt_tokens_details": {"cached_tokens": 2}},
                  {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 2}},
                  {"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2}):  # fmt: skip
        result = line_result(lines[5], 200, {"usage": usage}, "r5")
        assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (7, 3, 2)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xff\n", "UTF-8"),
        (jsonl("[1]"), "line 1: expected a JSON object"),
        (jsonl({"custom_id": "", "body": {}}), "line 1: custom_id"),
        (jsonl({"custom_id": "x" * 600, "body": {}}), "line 1: custom_id"),
        (jsonl({"custom_id": "a", "body": "hi"}), "line 1: body must be a JSON object"),
        (jsonl({"custom_id": "a", "method": "GET", "body": {}}), "method must be POST"),
        (
            jsonl({"custom_id": "a", "body": {"prompt": "x"}}, {"custom_id": "a", "body": {}}),
            "line 2: custom_id 'a' is used again (first on line 1)",
        ),
        (jsonl(*({"custom_id": str(i), "body": {"prompt": "x"}} for i in range(4))), "more than 3"),
        (
            jsonl({"custom_id": "a", "body": {"input": "x"}}),
            "line 1: a body with input needs a url",
        ),
        (jsonl({"custom_id": "a", "url": ["/v1/completions"], "body": {}}), "line 1: url"),
        (jsonl({"custom_id": "a", "url": "/v1/moderations", "body": {}}), "/v1/embeddings"),
    ],
)
def test_read_input_errors_name_the_line(data, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_input(data, 3)


def test_parameters_fill_what_the_body_leaves():
    params = parse_parameters(
        {"maxTokens": 5, "temperature": 0.5, "topK": 3, "extraBody": '{"stop": ["\\n"], "seed": 1}'}
    )
    assert params == {"max_tokens": 5, "temperature": 0.5, "top_k": 3, "stop": ["\n"], "seed": 1}
    (line,) = read_input(jsonl({"custom_id": "a", "body": {"prompt": "x", "max_tokens": 9,
                                                         "model": "other", "stream": True}}), 1)  # fmt: skip
    body = request_body(line, "accounts/a/models/m", params)
    assert body["max_tokens"] == 9 and body["temperature"] == 0.5  # the body's own value wins
    assert body["model"] == "accounts/a/models/m" and body["stream"] is False
    with pytest.raises(InputError, match="extraBody is not valid JSON"):
        parse_parameters({"extraBody": "{"})
    with pytest.raises(InputError, match="must be a JSON object"):
        parse_parameters({"extraBody": "[1]"})
    with pytest.raises(InputError, match="inferenceParameters.bogus"):
        parse_parameters({"bogus": 1})


def test_a_line_result_is_written_once_and_only_while_its_job_runs(tmp_path):
    store = BatchStore(Database(None), tmp_path)
    store.insert_job(
        "acme", "j", "key1", {"state": RUNNING, "jobProgress": {"totalInputRequests": 2}}
    )
    (line,) = read_input(jsonl({"custom_id": "a", "body": {"prompt": "x"}}), 1)
    ok = {"id": "cmpl-1", "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                   "prompt_tokens_details": {"cached_tokens": 1}}}  # fmt: skip
    result = line_result(line, 200, ok, "cmpl-1")
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (3, 2, 1)
    assert store.record_result("acme", "j", result)
    assert not store.record_result("acme", "j", result)  # the line has its result already
    progress = store.get_job("acme", "j")["jobProgress"]
    assert progress["totalProcessedRequests"] == 1 and progress["percent"] == 50
    assert progress["inputTokens"] == 3 and progress["cachedInputTokenCount"] == 1

    store.save_job("acme", "j", {"state": CANCELLED, "jobProgress": {"totalInputRequests": 2}})
    late = LineResult(1, "b", False, {"custom_id": "b"})
    assert not store.record_result("acme", "j", late)  # finished after the cancel: not written
    assert store.done_lines("acme", "j") == {0}
    error = line_result(
        line, 400, {"error": {"code": "invalid_request_error", "message": "no"}}, "req-2"
    )
    assert not error.ok and error.body["error"] == {
        "code": "invalid_request_error",
        "message": "no",
    }
    assert error.body["response"]["status_code"] == 400


def test_a_file_joins_its_dataset_only_while_the_dataset_exists(tmp_path):
    """Bytes on their way into a dataset wait outside the datasets' folders, and join under
    the store's lock only if `check` passes: a dataset deleted meanwhile does not come back
    on disk. What a stopped server left half-written is removed when the next one starts."""
    store = BatchStore(Database(None), tmp_path)
    store.insert_dataset("acme", "d", {})
    assert store.write_file("acme", "d", "a.jsonl", b"{}\n").read_bytes() == b"{}\n"
    store.delete_dataset("acme", "d")

    def gone() -> None:
        raise LookupError("deleted")

    with pytest.raises(LookupError):
        store.write_file("acme", "d", "b.jsonl", b"{}\n", gone)
    assert not (tmp_path / "acme" / "d").exists()
    assert not list((tmp_path / ".partial").iterdir())
    (tmp_path / ".partial" / "left").write_bytes(b"half")
    BatchStore(Database(None), tmp_path)
    assert not list((tmp_path / ".partial").iterdir())


def test_the_runners_look_for_work_reads_only_the_jobs_not_ended(tmp_path):
    """runnable_jobs (the runner's look for work, every 5 s on the event loop) parsed every job
    ever made in Python: 20,000 ended jobs, 119 ms a look. It now finds the few jobs not ended
    by an index on their state, whatever the number ended."""
    from girandole.batch.store import COMPLETED, PENDING, WRITING_RESULTS

    db = Database(None)
    store = BatchStore(db, tmp_path)
    store.insert_job("acme", "first", None, {"state": PENDING})
    for i in range(2000):
        store.insert_job("acme", f"ended-{i}", None, {"state": COMPLETED if i % 2 else CANCELLED})
    store.insert_job("other", "second", None, {"state": RUNNING})
    store.insert_job("acme", "third", None, {"state": WRITING_RESULTS})
    assert store.runnable_jobs() == [("acme", "first"), ("other", "second"), ("acme", "third")]
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT account, job_id FROM batch_jobs"
        " WHERE json_extract(body, '$.state') IN (?, ?, ?) ORDER BY created",
        (PENDING, RUNNING, WRITING_RESULTS),
    )
    assert any("USING INDEX batch_jobs_state" in row[-1] for row in plan), plan


def test_unwritten_outputs_are_the_cancelled_or_failed_jobs_whose_output_is_not_ready(tmp_path):
    """Asked at start-up: it parsed every job ever made in Python. Now one query, by the state
    index and the output datasets' keys; the same answer: cancelled jobs, in order of creation,
    whose output dataset exists and is not READY, in any account; and failed ones (an older
    server left their output UPLOADING)."""
    from girandole.batch.store import COMPLETED, FAILED, dataset_name

    store = BatchStore(Database(None), tmp_path)

    def job(account: str, job_id: str, state: str, output_state: str | None) -> None:
        output = f"{job_id}-out"
        if output_state is not None:
            store.insert_dataset(account, output, {"state": output_state})
        body = {"state": state, "outputDatasetId": dataset_name(account, output)}
        store.insert_job(account, job_id, None, body)

    job("acme", "cut", CANCELLED, "UPLOADING")
    job("acme", "written", CANCELLED, "READY")
    job("acme", "no-output", CANCELLED, None)  # deleted since: nothing to write
    job("acme", "done", COMPLETED, "UPLOADING")
    job("acme", "running", RUNNING, "UPLOADING")
    job("other", "cut", CANCELLED, "STATE_UNSPECIFIED")
    job("other", "also-cut", CANCELLED, "UPLOADING")
    job("acme", "failed", FAILED, "UPLOADING")
    job("acme", "failed-written", FAILED, "READY")
    assert store.unwritten_outputs() == [
        ("acme", "cut", CANCELLED),
        ("other", "cut", CANCELLED),
        ("other", "also-cut", CANCELLED),
        ("acme", "failed", FAILED),
    ]


def test_a_listing_counts_each_jobs_progress_as_its_own_read_does(tmp_path):
    """list_jobs sums every job's result rows in one query (a query per job made a list of
    5,000 jobs take 0.42 s, on the event loop); each job's progress is what reading it alone
    gives."""
    store = BatchStore(Database(None), tmp_path)
    for k in range(4):
        store.insert_job("acme", f"j{k}", None,
                         {"state": RUNNING, "jobProgress": {"totalInputRequests": 4}})  # fmt: skip
        for line in range(k):  # job k has k results, the odd lines failed
            store.record_result("acme", f"j{k}", LineResult(
                line, f"c{line}", line % 2 == 0, {}, prompt_tokens=3 + line,
                completion_tokens=2 * line, cached_tokens=line))  # fmt: skip
    store.insert_job("other", "x", None, {"state": RUNNING})
    store.record_result("other", "x", LineResult(0, "c", True, {}, prompt_tokens=99))
    listed = store.list_jobs("acme")
    assert len(listed) == 4
    for k, job in enumerate(listed):
        alone = store.with_progress("acme", f"j{k}", {"jobProgress": {"totalInputRequests": 4}})
        assert job["jobProgress"] == alone["jobProgress"]
        assert job["jobProgress"]["totalProcessedRequests"] == k
    assert listed[3]["jobProgress"]["inputTokens"] == 3 + 4 + 5


def test_a_dataset_made_with_its_files_is_there_whole_or_not_at_all(tmp_path):
    """add_dataset moves the files in, then commits the row with what `also` writes: a failure
    in the transaction leaves no row, folder or temporary file. A folder no row names (a server
    killed between the two) is removed at the next start; the datasets the rows name stay,
    an UPLOADING one (Fireworks': created, its :upload to come) included."""
    db_path, folder = tmp_path / "girandole.db", tmp_path / "datasets"
    store = BatchStore(Database(db_path), folder)
    partial = store.partial_path()
    partial.write_bytes(b"{}\n")

    def refused(run) -> None:
        run("INSERT INTO datasets (account, dataset_id, body) VALUES ('acme', 'x', '{}')")
        raise LookupError("refused")

    with pytest.raises(LookupError):
        store.add_dataset("acme", "made", {"state": "READY"}, {"a.jsonl": partial}, refused)
    assert store.get_dataset("acme", "made") is None and store.get_dataset("acme", "x") is None
    assert not (folder / "acme" / "made").exists() and not partial.exists()

    partial = store.partial_path()
    partial.write_bytes(b"{}\n")
    assert store.add_dataset("acme", "made", {"state": "READY"}, {"a.jsonl": partial})
    assert [p.name for p in store.dataset_files("acme", "made")] == ["a.jsonl"]
    again = store.partial_path()
    again.write_bytes(b"other\n")
    assert not store.add_dataset("acme", "made", {}, {"a.jsonl": again})  # exists: untouched
    assert store.dataset_bytes("acme", "made") == b"{}\n" and not again.exists()

    store.insert_dataset("acme", "waiting", {"state": "UPLOADING"})  # no file yet
    store.insert_dataset("acme", "half", {"state": "UPLOADING"})
    store.write_file("acme", "half", "a.jsonl", b"{}\n")  # placed, not yet marked READY
    (folder / "acme" / "orphan").mkdir()
    (folder / "acme" / "orphan" / "a.jsonl").write_bytes(b"{}\n")
    (folder / "other" / "orphan").mkdir(parents=True)
    store.db.close()
    store = BatchStore(Database(db_path), folder)
    assert sorted(p.name for p in (folder / "acme").iterdir()) == ["half", "made"]
    assert not (folder / "other" / "orphan").exists()
    assert store.get_dataset("acme", "waiting") == {"state": "UPLOADING"}
    assert store.dataset_bytes("acme", "half") == b"{}\n"


def _failing_deletes(db: Database, table: str) -> None:
    """Make every DELETE from `table` fail, as a full disk, an I/O error or a kill would stop
    the statement after the first of a multi-statement write."""
    db.execute(
        f"CREATE TEMP TRIGGER fail_{table} BEFORE DELETE ON {table}"
        " BEGIN SELECT RAISE(ABORT, 'stopped here'); END"
    )


def test_a_file_and_its_dataset_are_deleted_together(tmp_path):
    """DELETE /v1/files/{id} of an upload removed the file's row, then its dataset's: stopped in
    between, the dataset and its bytes stayed with no file naming them. Both rows go in one
    transaction now: stopped, the file is still listed and whole."""
    db = Database(None)
    store = BatchStore(db, tmp_path)
    files = FileStore(store)
    partial = store.partial_path()
    partial.write_bytes(b"{}\n")
    files.add_upload("acme", "file-1", {"state": "READY"}, "a.jsonl", "a.jsonl", "batch", partial)
    _failing_deletes(db, "datasets")
    with pytest.raises(sqlite3.DatabaseError, match="stopped here"):
        files.delete("acme", "file-1")
    assert files.get("acme", "file-1") is not None
    assert files.path_of("acme", files.get("acme", "file-1")).read_bytes() == b"{}\n"
    db.execute("DROP TRIGGER fail_datasets")
    assert files.delete("acme", "file-1")
    assert files.get("acme", "file-1") is None and store.get_dataset("acme", "file-1") is None
    assert not (tmp_path / "acme" / "file-1").exists()


def test_a_job_is_deleted_with_its_results_and_datasets_or_not_at_all(tmp_path):
    """delete_job removed the results, then the job (a message batch's datasets after it):
    stopped in between, a job stayed with its progress gone to 0, or datasets of no job."""
    db = Database(None)
    store = BatchStore(db, tmp_path)
    store.insert_job(
        "acme", "j", None, {"state": RUNNING, "jobProgress": {"totalInputRequests": 1}}
    )
    store.record_result("acme", "j", LineResult(0, "a", True, {}))
    store.insert_dataset("acme", "j-input", {})
    store.write_file("acme", "j-input", "requests.jsonl", b"{}\n")
    for table in ("batch_jobs", "datasets"):
        _failing_deletes(db, table)
        with pytest.raises(sqlite3.DatabaseError, match="stopped here"):
            store.delete_job("acme", "j", ("j-input",))
        assert store.get_job("acme", "j")["jobProgress"]["totalProcessedRequests"] == 1
        assert store.dataset_bytes("acme", "j-input") == b"{}\n"
        db.execute(f"DROP TRIGGER fail_{table}")
    store.delete_job("acme", "j", ("j-input",))
    assert store.get_job("acme", "j") is None and store.done_lines("acme", "j") == set()
    assert store.get_dataset("acme", "j-input") is None
    assert not (tmp_path / "acme" / "j-input").exists()


def test_a_job_is_made_with_its_datasets_or_not_at_all(tmp_path):
    """A batch's datasets (a message batch's requests with their file, the output) were made one
    by one before its job: stopped in between, they stayed as datasets of no job, and a retried
    Fireworks create found its output's id taken (a 400). insert_job now writes them with the
    job in one transaction."""
    db = Database(None)
    store = BatchStore(db, tmp_path)

    def datasets() -> dict:
        requests = store.written(b'{"custom_id": "a"}\n')
        return {"j-input": ({"state": "READY"}, {"r.jsonl": requests}), "j-output": ({}, {})}

    db.execute(
        "CREATE TEMP TRIGGER fail_jobs BEFORE INSERT ON batch_jobs"
        " BEGIN SELECT RAISE(ABORT, 'stopped here'); END"
    )
    with pytest.raises(sqlite3.DatabaseError, match="stopped here"):
        store.insert_job("acme", "j", None, {"state": RUNNING}, datasets())
    assert store.list_datasets("acme") == [] and not (tmp_path / "acme" / "j-input").exists()
    assert not list((tmp_path / ".partial").iterdir())
    db.execute("DROP TRIGGER fail_jobs")

    assert store.insert_job("acme", "j", None, {"state": RUNNING}, datasets())
    assert store.dataset_bytes("acme", "j-input") == b'{"custom_id": "a"}\n'
    assert store.get_dataset("acme", "j-output") == {}
    # the job exists, or one of the datasets does: nothing written
    assert not store.insert_job("acme", "j", None, {}, {"k-output": ({}, {})})
    assert store.get_dataset("acme", "k-output") is None
    assert not store.insert_job("acme", "k", None, {}, {"j-output": ({"x": 1}, {})})
    assert store.get_job("acme", "k") is None and store.get_dataset("acme", "j-output") == {}
    assert not list((tmp_path / ".partial").iterdir())
