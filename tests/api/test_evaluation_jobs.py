"""Fireworks' evaluation jobs against a real server with the fireworks-ai SDK: a job scores every
row of a dataset with an evaluator (one row raising, one not JSON), writes the output dataset
(READY, each row with its evaluation_result) and its metrics; its log by a signed URL; delete of
a running job stops it; the 400s of bad fields, 409, 404, 403, list."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import fireworks
import httpx
import pytest
from evaluator_server import ACCOUNT, EvaluatorServer, criteria, evaluator_server

from girandole.registry.secret_box import KEY_FILE, new_key

JOBS = f"/v1/accounts/{ACCOUNT}/evaluationJobs"
EVALUATOR = f"accounts/{ACCOUNT}/evaluators/exact"


def row(answer: str, truth: str) -> dict:
    messages = [{"role": "user", "content": "capital of France?"}, {"role": "assistant", "content": answer}]  # fmt: skip
    return {"messages": messages, "ground_truth": truth}


ROWS = [row("Paris", "paris"), row("Lyon", "Paris"), row("boom", "x"), row(" PARIS ", "Paris")]


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[EvaluatorServer]:
    with evaluator_server(tmp_path_factory.mktemp("evaluation-jobs")) as server:
        assert server.evaluator("exact")["state"] == "ACTIVE"
        two = [*criteria(), {**criteria({"main.py": SHORT})[0], "name": "short"}]
        assert server.evaluator("two", criteria=two)["state"] == "ACTIVE"
        lines = "".join(json.dumps(r) + "\n" for r in ROWS) + "not json\n"
        server.dataset("answers", lines.encode())
        server.dataset("slow", (json.dumps(row("slow", "x")) + "\n").encode())
        yield server


def job_body(output: str, **fields) -> dict:
    return {
        "evaluator": EVALUATOR,
        "inputDataset": f"accounts/{ACCOUNT}/datasets/answers",
        "outputDataset": f"accounts/{ACCOUNT}/datasets/{output}",
        **fields,
    }


def test_a_job_scores_every_row_and_writes_the_output_dataset(srv: EvaluatorServer) -> None:
    fw = srv.sdk()
    created = fw.evaluation_jobs.create(
        evaluation_job_id="first",
        evaluation_job={
            "evaluator": EVALUATOR,
            "input_dataset": f"accounts/{ACCOUNT}/datasets/answers",
            "output_dataset": f"accounts/{ACCOUNT}/datasets/scored",
            "display_name": "First",
        },
    )
    assert created.name == f"{JOBS[4:]}/first"
    assert created.state in ("JOB_STATE_CREATING", "JOB_STATE_RUNNING")
    done = srv.wait(f"{JOBS}/first", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED", done["status"]
    job = fw.evaluation_jobs.get("first")
    assert job.metrics == {"meanScore": 2 / 3, "scoredRows": 3.0, "failedRows": 2.0}
    assert json.loads(job.output_stats)["rowCount"] == 5

    dataset = fw.datasets.get("scored")
    assert (dataset.state, dataset.example_count) == ("READY", "5")
    urls = fw.datasets.get_download_endpoint("scored").filename_to_signed_urls
    out = [json.loads(line) for line in httpx.get(urls["results.jsonl"]).text.splitlines()]
    assert [r.get("messages") for r in out[:4]] == [r["messages"] for r in ROWS]
    results = [r["evaluation_result"] for r in out]
    assert results[0] == {"score": 1.0, "reason": "exact", "metrics": {"length": 5.0}}
    assert results[1]["score"] == 0.0 and results[3]["score"] == 1.0
    assert results[2] == {"error": "ValueError: cannot score boom"}
    assert "not JSON" in results[4]["error"] and out[4]["line"] == "not json"

    log = fw.evaluation_jobs.get_log_endpoint("first")
    text = httpx.get(log.execution_log_signed_uri).text
    assert "line 3: ValueError: cannot score boom" in text
    assert [j.name for j in fw.evaluation_jobs.list()] == [job.name]


# a second criterion (its own main.py): 1 for an answer of at most 5 characters
SHORT = """
def evaluate(messages, **kwargs):
    answer = messages[-1]["content"]
    return {"score": float(len(answer) <= 5), "reason": "short", "metrics": {"words": 1}}
"""


def test_several_criteria_score_the_mean_of_theirs(srv: EvaluatorServer) -> None:
    """An evaluator of two CODE_SNIPPETS criteria (each its own main.py): a row's score is the
    mean of theirs, each one's score in `criteria`; a row that fails under one fails, naming it."""
    body = job_body("two-out", evaluator=f"accounts/{ACCOUNT}/evaluators/two")
    r = srv.http("POST", JOBS, json={"evaluationJobId": "two", "evaluationJob": body})
    assert r.status_code == 200, r.text
    done = srv.wait(f"{JOBS}/two", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED", done["status"]
    assert done["metrics"] == {"meanScore": 2 / 3, "scoredRows": 3.0, "failedRows": 2.0}
    urls = srv.sdk().datasets.get_download_endpoint("two-out").filename_to_signed_urls
    results = [json.loads(line)["evaluation_result"] for line in httpx.get(urls["results.jsonl"]).text.splitlines()]  # fmt: skip
    assert results[0] == {
        "score": 1.0, "reason": "exact: exact; short: short",
        "metrics": {"length": 5.0, "words": 1.0}, "criteria": {"exact": 1.0, "short": 1.0},
    }  # fmt: skip
    assert [r.get("criteria") for r in results[1:4]] == [
        {"exact": 0.0, "short": 1.0}, None, {"exact": 1.0, "short": 0.0},
    ]  # fmt: skip
    assert [r.get("score") for r in results[1:4]] == [0.5, None, 0.5]
    assert results[2] == {"error": "criterion exact: ValueError: cannot score boom"}


def test_deleting_a_running_job_stops_it(srv: EvaluatorServer) -> None:
    body = job_body("slow-out", inputDataset=f"accounts/{ACCOUNT}/datasets/slow")
    r = srv.http("POST", JOBS, json={"evaluationJobId": "stuck", "evaluationJob": body})
    assert r.status_code == 200, r.text
    srv.wait(f"{JOBS}/stuck", ("JOB_STATE_RUNNING",))
    wait_for(lambda: len(evaluator_children()) == 1)  # scoring the slow row
    r = srv.http("DELETE", f"/v1/accounts/{ACCOUNT}/evaluators/exact")
    assert r.status_code == 400 and "used by evaluation job" in r.json()["error"]["message"]
    # nor its datasets deleted or given a file: the input it read, the output it fills
    datasets = f"/v1/accounts/{ACCOUNT}/datasets"
    for r, dataset, role in (
        (srv.http("DELETE", f"{datasets}/slow"), "slow", "input"),
        (srv.http("DELETE", f"{datasets}/slow-out"), "slow-out", "output"),
        (
            srv.http("POST", f"{datasets}/slow-out:upload", files={"file": ("x.jsonl", b"{}\n")}),
            "slow-out",
            "output",
        ),  # fmt: skip
    ):
        assert r.status_code == 400 and r.json()["error"]["code"] == "FAILED_PRECONDITION", r.text
        assert (
            f"Dataset accounts/{ACCOUNT}/datasets/{dataset} is the {role} of evaluation job"
            f" accounts/{ACCOUNT}/evaluationJobs/stuck, which has not ended (JOB_STATE_RUNNING):"
            " delete the job or wait for it first"
        ) in r.json()["error"]["message"], r.text
    srv.sdk().evaluation_jobs.delete("stuck")
    assert srv.http("GET", f"{JOBS}/stuck").status_code == 404
    wait_for(lambda: evaluator_children() == [])  # the child killed, not left to its timeout
    # the output dataset stays, never filled
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/datasets/slow-out").json()["state"] == "UPLOADING"  # fmt: skip


def evaluator_children() -> list[int]:
    """The evaluator child processes this (the server's) process started."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"evaluators/child.py" in cmdline:
            found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (
            {"evaluationJob": job_body("o", awsS3Config={"iamRoleArn": "arn"})},
            "evaluationJob.awsS3Config",
            "S3",
        ),  # fmt: skip
        (
            {"evaluationJob": job_body("o"), "leaderboardIds": ["l"]},
            "leaderboardIds",
            "leaderboards",
        ),  # fmt: skip
        (
            {"evaluationJob": job_body("o", evaluator=f"accounts/{ACCOUNT}/evaluators/nope")},
            "evaluationJob.evaluator",
            "does not exist",
        ),  # fmt: skip
        (
            {"evaluationJob": job_body("o", evaluator="accounts/other/evaluators/e")},
            "evaluationJob.evaluator",
            "another account",
        ),  # fmt: skip
        (
            {"evaluationJob": job_body("o", inputDataset="nope")},
            "evaluationJob.inputDataset",
            "does not exist",
        ),  # fmt: skip
        ({"evaluationJob": job_body("answers")}, "evaluationJob.outputDataset", "must differ"),
        (
            {"evaluationJob": {"evaluator": EVALUATOR}},
            "evaluationJob.inputDataset",
            "Field required",
        ),  # fmt: skip
        (
            {"evaluationJob": job_body("o"), "evaluationJobId": "Bad_Id"},
            "evaluationJobId",
            "not a valid id",
        ),  # fmt: skip
    ],
)
def test_bad_fields_are_400_naming_the_field(srv: EvaluatorServer, body: dict, param: str, says: str) -> None:  # fmt: skip
    r = srv.http("POST", JOBS, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_existing_output_409_an_evaluator_not_active_400_404_and_403(srv: EvaluatorServer) -> None:
    r = srv.http("POST", JOBS, json={"evaluationJob": job_body("answers-copy", outputDataset="slow")})  # fmt: skip
    assert r.status_code == 409 and r.json()["error"]["param"] == "evaluationJob.outputDataset"
    failed = srv.evaluator("fails", criteria=criteria(entry_func="missing"))
    assert failed["state"] == "BUILD_FAILED"
    body = job_body("o", evaluator=failed["name"])
    r = srv.http("POST", JOBS, json={"evaluationJob": body})
    assert r.status_code == 400 and "is BUILD_FAILED, not ACTIVE" in r.json()["error"]["message"]
    with pytest.raises(fireworks.NotFoundError):
        srv.sdk().evaluation_jobs.get("nope")
    assert srv.http("GET", JOBS, key=srv.other_key).status_code == 403
    r = srv.http("POST", JOBS, json={"evaluationJob": job_body("o")}, key=srv.reader_key)
    assert r.status_code == 403


HANGS = "import time\n\ntime.sleep(600)  # at import: its build never ends by itself\n"


def test_a_server_stopped_mid_job_kills_its_child_and_fails_the_job_at_start(tmp_path) -> None:
    """The children of a running job and of a build that hangs (loading its code) are killed as
    the server stops, not left to their timeouts; the job FAILS at the next start, the build
    runs again (and is killed again)."""
    with evaluator_server(tmp_path) as srv:
        srv.evaluator("exact")
        srv.dataset("slow", (json.dumps(row("slow", "x")) + "\n").encode())
        body = job_body("out", inputDataset=f"accounts/{ACCOUNT}/datasets/slow")
        r = srv.http("POST", JOBS, json={"evaluationJobId": "cut", "evaluationJob": body})
        assert r.status_code == 200, r.text
        srv.wait(f"{JOBS}/cut", ("JOB_STATE_RUNNING",))
        wait_for(lambda: len(evaluator_children()) == 1)
        hang = {"evaluatorId": "hangs", "evaluator": {"criteria": criteria({"main.py": HANGS})}}
        assert srv.http("POST", f"/v1/accounts/{ACCOUNT}/evaluatorsV2", json=hang).status_code == 200  # fmt: skip
        wait_for(lambda: len(evaluator_children()) == 2)  # the job's, and the build's
        stopping = time.monotonic()
    assert evaluator_children() == []  # killed as the server stopped, not left to its timeout
    # the build's child at once, not at its load timeout (30 s, which the stop waited for)
    assert time.monotonic() - stopping < 10
    with evaluator_server(tmp_path) as srv:
        job = srv.http("GET", f"{JOBS}/cut").json()
        assert job["state"] == "JOB_STATE_FAILED"
        assert job["status"]["message"] == "the server stopped while it ran"
        assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/evaluators/exact").json()["state"] == "ACTIVE"  # fmt: skip
        assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/evaluators/hangs").json()["state"] == "BUILDING"  # fmt: skip
        wait_for(lambda: len(evaluator_children()) == 1)  # its build, again
    assert evaluator_children() == []


ENV_CODE = """
import os


def evaluate(messages, **kwargs):
    return {"score": 1, "reason": os.environ.get("MY_TOKEN", "")}
"""


def test_the_evaluator_sees_the_accounts_secrets_as_its_environment(srv: EvaluatorServer) -> None:
    fw = srv.sdk()
    fw.secrets.create(name="token", key_name="MY_TOKEN", value="s3cret-value")
    assert srv.evaluator("env", criteria=criteria({"main.py": ENV_CODE}))["state"] == "ACTIVE"
    body = job_body("env-out", evaluator=f"accounts/{ACCOUNT}/evaluators/env")
    r = srv.http("POST", JOBS, json={"evaluationJobId": "env", "evaluationJob": body})
    assert r.status_code == 200, r.text
    assert srv.wait(f"{JOBS}/env", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))["state"] == "JOB_STATE_COMPLETED"  # fmt: skip
    urls = fw.datasets.get_download_endpoint("env-out").filename_to_signed_urls
    first = json.loads(httpx.get(urls["results.jsonl"]).text.splitlines()[0])
    assert first["evaluation_result"]["reason"] == "s3cret-value"
    # the secrets' key changed (registry/secret_box.py): the job fails, naming the secret
    key_file = srv.data / KEY_FILE
    old_key = key_file.read_bytes()
    key_file.write_text(new_key())
    try:
        body = job_body("env-out-2", evaluator=f"accounts/{ACCOUNT}/evaluators/env")
        r = srv.http("POST", JOBS, json={"evaluationJobId": "env2", "evaluationJob": body})
        assert r.status_code == 200, r.text
        done = srv.wait(f"{JOBS}/env2", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
        assert done["state"] == "JOB_STATE_FAILED", done
        assert done["status"]["code"] == "FAILED_PRECONDITION", done["status"]
        assert f"secret accounts/{ACCOUNT}/secrets/token cannot be decrypted" in done["status"]["message"]  # fmt: skip
    finally:
        key_file.write_bytes(old_key)


BIG_CODE = """
def evaluate(messages, **kwargs):
    block = bytearray(400 * 1024 * 1024)  # within the default 2048 MiB, past 256
    return len(block) > 0
"""


def test_the_evaluator_limits_are_the_servers_settings(tmp_path) -> None:
    """--evaluator-timeout 0.5 fails a slow row in half a second (not the default 30), the next
    row scored by a fresh child; --evaluator-memory 256 makes a 400 MiB allocation the row's
    MemoryError."""
    flags = ("--evaluator-timeout", "0.5", "--evaluator-memory", "256")
    with evaluator_server(tmp_path, *flags, "--max-evaluator-processes", "1") as srv:
        assert srv.evaluator("exact")["state"] == "ACTIVE"
        assert srv.evaluator("big", criteria=criteria({"main.py": BIG_CODE}))["state"] == "ACTIVE"
        rows = [row("slow", "x"), row("Paris", "paris")]
        srv.dataset("slow", "".join(json.dumps(r) + "\n" for r in rows).encode())
        jobs = {"timed": EVALUATOR, "big": f"accounts/{ACCOUNT}/evaluators/big"}
        started = time.monotonic()
        for job_id, evaluator in jobs.items():
            body = job_body(f"{job_id}-out", evaluator=evaluator,
                            inputDataset=f"accounts/{ACCOUNT}/datasets/slow")  # fmt: skip
            r = srv.http("POST", JOBS, json={"evaluationJobId": job_id, "evaluationJob": body})
            assert r.status_code == 200, r.text
        for job_id in jobs:
            done = srv.wait(f"{JOBS}/{job_id}", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"), 20)
            assert done["state"] == "JOB_STATE_COMPLETED", done["status"]
        assert time.monotonic() - started < 20
        fw = srv.sdk()

        def results(output: str) -> list[dict]:
            urls = fw.datasets.get_download_endpoint(output).filename_to_signed_urls
            lines = httpx.get(urls["results.jsonl"]).text.splitlines()
            return [json.loads(line)["evaluation_result"] for line in lines]

        assert results("timed-out") == [
            {"error": "timed out after 0.5 s"},
            {"score": 1.0, "reason": "exact", "metrics": {"length": 5.0}},
        ]
        big = results("big-out")
        assert [r.get("error", "")[:11] for r in big] == ["MemoryError"] * 2, big
        assert_one_child_at_a_time(srv, tmp_path / "stamps.txt")


# each row's scoring, as the child saw it: its pid, when it began and ended (appended to a file)
STAMPS = """
import os, time


def evaluate(messages, **kwargs):
    began = time.time()
    time.sleep(0.05)
    with open({path!r}, "a") as out:
        out.write(f"{{os.getpid()}} {{began}} {{time.time()}}\\n")
    return 1
"""


def assert_one_child_at_a_time(srv: EvaluatorServer, stamps: Path) -> None:
    """--max-evaluator-processes 1: two evaluation jobs created together score their rows in
    two children (one each), never both at once (the rows' times, as the code wrote them)."""
    code = criteria({"main.py": STAMPS.format(path=str(stamps))})
    assert srv.evaluator("stamps", criteria=code)["state"] == "ACTIVE"
    srv.dataset("three", "".join(json.dumps(row("Paris", "Paris")) + "\n" for _ in range(3)).encode())  # fmt: skip
    for job_id in ("one", "two"):
        body = job_body(f"{job_id}-out", evaluator=f"accounts/{ACCOUNT}/evaluators/stamps",
                        inputDataset=f"accounts/{ACCOUNT}/datasets/three")  # fmt: skip
        r = srv.http("POST", JOBS, json={"evaluationJobId": job_id, "evaluationJob": body})
        assert r.status_code == 200, r.text
    for job_id in ("one", "two"):
        done = srv.wait(f"{JOBS}/{job_id}", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"), 20)
        assert done["metrics"]["scoredRows"] == 3, done
    rows = sorted(tuple(map(float, line.split())) for line in stamps.read_text().splitlines())
    assert len(rows) == 6 and len({pid for pid, _, _ in rows}) == 2, rows
    by_start = sorted(rows, key=lambda r: r[1])
    for before, after in zip(by_start, by_start[1:]):
        assert after[1] >= before[2], (before, after)  # began after the one before it ended
