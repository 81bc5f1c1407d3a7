"""`girandole sftj`, `girandole dpoj` and `girandole rftj` run as subprocesses against a real `girandole serve` (a
tiny Llama as its own model, finetune_server.py): a job created from a local JSONL with --wait
until COMPLETED and its output model listed; get, list, cancel, resume and delete; the server's
4xx message and exit status 1 for an unknown dataset, and for a job that FAILED."""

from __future__ import annotations

import json

import pytest
from api_helpers import cli_runner
from finetune_server import ACCOUNT, SHARE, FinetuneServer, pairs, prompts, rows

TINY = f"accounts/{ACCOUNT}/models/tiny"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama_dir):
    s = FinetuneServer(
        tmp_path_factory.mktemp("finetune-cli"), tiny_llama_dir,
        f"/v1/accounts/{ACCOUNT}/supervisedFineTuningJobs",
    )  # fmt: skip
    yield s
    s.api.stop_server(s.server)


@pytest.fixture(scope="module")
def girandole(srv):
    return cli_runner(srv.server.url, srv.key, ACCOUNT)


def test_sftj_from_a_local_file(srv, girandole, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(rows())
    created = girandole(
        "sftj", "create", "--dataset", str(data), "--base-model", TINY, "--output-model",
        "cli-sft", "--epochs", "2", "--learning-rate", "5e-3", "--lora-rank", "4",
        "--job-id", "cli-sft", "--display-name", "from the cli", "--wait",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "JOB_STATE_COMPLETED" in created.stdout and f"{TINY}" in created.stdout
    assert "100%  epoch 2  loss" in created.stderr  # the progress lines of --wait
    model = srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/cli-sft").json()
    assert model["state"] == "READY" and model["kind"] == "HF_PEFT_ADDON"
    dataset = srv.http("GET", f"/v1/accounts/{ACCOUNT}/datasets/cli-sft-train").json()
    assert dataset["state"] == "READY"

    got = json.loads(girandole("sftj", "get", f"accounts/{ACCOUNT}/supervisedFineTuningJobs/cli-sft", "--json").stdout)  # fmt: skip
    assert (got["loraRank"], got["epochs"], got["displayName"]) == (4, 2, "from the cli")
    assert got["dataset"] == f"accounts/{ACCOUNT}/datasets/cli-sft-train"
    listed = girandole("sftj", "list")
    assert listed.returncode == 0 and "cli-sft" in listed.stdout and "COMPLETED" in listed.stdout
    assert "OUTPUT MODEL" in listed.stdout and f"accounts/{ACCOUNT}/models/cli-sft" in listed.stdout
    # a COMPLETED job does not resume: the server's 400, exit 1
    resumed = girandole("sftj", "resume", "cli-sft")
    assert resumed.returncode == 1 and "only a CANCELLED or FAILED job resumes" in resumed.stderr
    deleted = girandole("sftj", "delete", "cli-sft")
    assert deleted.returncode == 0 and "deleted cli-sft" in deleted.stdout
    missing = girandole("sftj", "get", "cli-sft")
    assert missing.returncode == 1 and "not found (HTTP 404)" in missing.stderr


def test_dpoj_create_wait_cancel_resume(srv, girandole, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(pairs())
    created = girandole(
        "dpoj", "create", "--dataset", str(data), "--base-model", TINY, "--epochs", "1",
        "--beta", "0.2", "--method", "ORPO", "--job-id", "cli-dpo", "--wait", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["state"] == "JOB_STATE_COMPLETED", job
    assert job["lossConfig"]["method"] == "ORPO" and job["lossConfig"]["dpo"]["beta"] == 0.2
    assert job["trainingConfig"]["outputModel"] == f"accounts/{ACCOUNT}/models/cli-dpo"
    listed = girandole("dpoj", "list")
    assert "cli-dpo" in listed.stdout and "cli-sft" not in listed.stdout

    # uploaded by an earlier job: named by its id; cancelled at once, resumed, cancelled again
    pending = girandole(
        "dpoj", "create", "--dataset", "cli-dpo-train", "--base-model", TINY, "--epochs", "50",
        "--job-id", "cli-dpo-2",
    )  # fmt: skip
    assert pending.returncode == 0, pending.stderr
    cancelled = girandole("dpoj", "cancel", "cli-dpo-2")
    assert cancelled.returncode == 0 and "JOB_STATE_CANCELLED" in cancelled.stdout
    resumed = girandole("dpoj", "resume", "cli-dpo-2", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert girandole("dpoj", "delete", "cli-dpo-2").returncode == 0


def test_rftj_create_wait(srv, girandole, tmp_path):
    assert srv.evaluator("cli-share", SHARE)["state"] == "ACTIVE"
    data = tmp_path / "prompts.jsonl"
    data.write_bytes(prompts(["hello", "what is up"]))
    held = tmp_path / "held.jsonl"
    held.write_bytes(prompts(["count"]))
    created = girandole(
        "rftj", "create", "--dataset", str(data), "--base-model", TINY, "--evaluator",
        "cli-share", "--method", "DAPO", "--kl-beta", "0.05", "--max-output-tokens", "6",
        "--response-candidates-count", "2", "--temperature", "0.9", "--top-k", "40",
        "--evaluation-dataset", str(held), "--job-id", "cli-rft", "--wait",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "JOB_STATE_COMPLETED" in created.stdout, created.stdout
    assert "DAPO (klBeta 0.05)" in created.stdout
    assert "100%  epoch 1  loss" in created.stderr and "  reward " in created.stderr
    assert f"accounts/{ACCOUNT}/evaluators/cli-share" in created.stdout
    job = json.loads(girandole("rftj", "get", "cli-rft", "--json").stdout)
    assert job["evaluationDataset"] == f"accounts/{ACCOUNT}/datasets/cli-rft-eval"
    assert 0 <= job["jobProgress"]["evalReward"] <= 1, job["jobProgress"]
    assert job["inferenceParameters"] == {
        "maxOutputTokens": 6, "temperature": 0.9, "topP": 1.0, "topK": 40,
        "responseCandidatesCount": 2,
    }  # fmt: skip
    listed = girandole("rftj", "list")
    assert "cli-rft" in listed.stdout and "cli-dpo" not in listed.stdout
    missing = girandole("rftj", "create", "--dataset", "cli-rft-train", "--base-model", TINY, "--evaluator", "nope")  # fmt: skip
    assert missing.returncode == 1 and "evaluators/nope does not exist" in missing.stderr


def test_errors_are_the_servers_4xx(girandole, tmp_path):
    unknown = girandole("sftj", "create", "--dataset", "no-such", "--base-model", TINY)
    assert unknown.returncode == 1
    assert f"dataset: dataset accounts/{ACCOUNT}/datasets/no-such not found (HTTP 404)" in unknown.stderr  # fmt: skip
    bad = girandole("dpoj", "create", "--dataset", "no-such", "--base-model", TINY, "--beta", "0.9")
    assert bad.returncode == 1 and "lossConfig.dpo.beta must be" in bad.stderr
    # valid rows the tiny Llama's template refuses when it trains: FAILED, its message, exit 1
    out_of_turn = tmp_path / "out-of-turn.jsonl"
    out_of_turn.write_bytes(rows() + b'{"messages": [{"role": "assistant", "content": "a"}]}\n')
    failed = girandole("sftj", "create", "--dataset", str(out_of_turn), "--base-model", TINY, "--wait")  # fmt: skip
    assert failed.returncode == 1 and "JOB_STATE_FAILED" in failed.stdout
    assert "is JOB_STATE_FAILED: dataset row 7" in failed.stderr
    unreadable = girandole("sftj", "create", "--dataset", str(tmp_path / "none.jsonl"), "--base-model", TINY)  # fmt: skip
    assert unreadable.returncode == 1 and "cannot read" in unreadable.stderr
