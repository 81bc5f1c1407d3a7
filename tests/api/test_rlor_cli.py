"""`girandole rlorj` run as a subprocess against a real `girandole serve` (a tiny Llama as its own
model, finetune_server.py) started with --max-rlor-trainers 1: a keep-alive job created with
--wait is RUNNING when the command returns; `step` over a local JSONL (uploaded first) writes its
model and shows the step; get, list, cancel, resume (`step --wait` then waits for the policy to
load) and delete; a second keep-alive job past the server's one trainer is its 429, exit 1; a job
over a dataset waits until COMPLETED."""

from __future__ import annotations

import json

import pytest
from api_helpers import cli_runner
from finetune_server import ACCOUNT, FinetuneServer
from test_rlor_jobs import rollouts

JOBS = f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs"
TINY = f"accounts/{ACCOUNT}/models/tiny"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama_dir):
    s = FinetuneServer(tmp_path_factory.mktemp("rlor-cli"), tiny_llama_dir, JOBS, "--max-rlor-trainers", "1")  # fmt: skip
    yield s
    s.api.stop_server(s.server)


@pytest.fixture(scope="module")
def girandole(srv):
    return cli_runner(srv.server.url, srv.key, ACCOUNT)


def test_rlorj_keep_alive_steps(srv, girandole, tmp_path):
    data = tmp_path / "scored.jsonl"
    data.write_bytes(rollouts())
    created = girandole(
        "rlorj", "create", "--keep-alive", "--base-model", TINY, "--learning-rate", "0.02",
        "--method", "DAPO", "--kl-beta", "0.01", "--hot-load-deployment-id", "tiny",
        "--job-id", "cli-loop", "--wait",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "JOB_STATE_RUNNING" in created.stdout and "DAPO (klBeta 0.01)" in created.stdout
    assert f"accounts/{ACCOUNT}/deployments/tiny" in created.stdout
    # the server holds one trainer (--max-rlor-trainers 1): a second is its 429
    second = girandole("rlorj", "create", "--keep-alive", "--base-model", TINY, "--job-id", "cli-2")
    assert second.returncode == 1, second.stdout
    assert "1 keep-alive trainers already run on this server" in second.stderr
    assert "--max-rlor-trainers" in second.stderr and "(HTTP 429)" in second.stderr

    stepped = girandole("rlorj", "step", "cli-loop", "--dataset", str(data), "--output-model", "cli-loop-1", "--json")  # fmt: skip
    assert stepped.returncode == 0, stepped.stderr
    job = json.loads(stepped.stdout)
    assert job["jobProgress"]["step"] == 1 and job["jobProgress"]["rollouts"] == 4, job
    assert job["latestOutputModel"] == f"accounts/{ACCOUNT}/models/cli-loop-1"
    assert job["hotLoadStatus"]["code"] == "OK" and "step 1  loss " in stepped.stderr
    model = srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/cli-loop-1").json()
    assert model["state"] == "READY" and model["kind"] == "HF_PEFT_ADDON", model
    assert "step 1 ran; outputModel" in job["status"]["message"], job

    shown = girandole("rlorj", "get", "cli-loop")
    assert shown.returncode == 0 and "Latest Output Model" in shown.stdout and "step 1  loss" in shown.stdout  # fmt: skip
    listed = girandole("rlorj", "list")
    assert "cli-loop" in listed.stdout and f"accounts/{ACCOUNT}/models/cli-loop-1" in listed.stdout

    assert "JOB_STATE_CANCELLED" in girandole("rlorj", "cancel", "cli-loop").stdout
    resumed = girandole("rlorj", "resume", "cli-loop", "--json")
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["state"] == "JOB_STATE_PENDING"
    # --wait: until the resumed job's policy is loaded, then the step (step 2: it goes on)
    stepped = girandole("rlorj", "step", "cli-loop", "--dataset", str(data), "--output-model", "cli-loop-2", "--wait", "--json")  # fmt: skip
    assert stepped.returncode == 0, stepped.stderr
    job = json.loads(stepped.stdout)
    assert job["jobProgress"]["step"] == 2 and job["hotLoadStatus"]["code"] == "OK", job
    # the step before the resume's adapter was swapped out, as between steps of one run
    loaded = {m.model for m in srv.sdk().lora.list().deployed_models if m.deployment.endswith("/tiny")}  # fmt: skip
    assert loaded == {f"accounts/{ACCOUNT}/models/cli-loop-2"}, loaded
    # an unknown job, a step without its model: the server's 4xx / the parser's, exit status
    missing = girandole("rlorj", "step", "nope", "--dataset", str(data), "--output-model", "x")
    assert missing.returncode == 1 and "not found (HTTP 404)" in missing.stderr
    assert girandole("rlorj", "step", "cli-loop", "--dataset", str(data)).returncode == 2
    deleted = girandole("rlorj", "delete", "cli-loop")
    assert deleted.returncode == 0 and "deleted cli-loop" in deleted.stdout
    assert girandole("rlorj", "get", "cli-loop").returncode == 1


def test_rlorj_over_a_dataset_waits_until_completed(srv, girandole, tmp_path):
    data = tmp_path / "scored.jsonl"
    data.write_bytes(rollouts())
    created = girandole(
        "rlorj", "create", "--dataset", str(data), "--base-model", TINY, "--epochs", "2",
        "--output-model", "cli-offline", "--job-id", "cli-offline", "--wait",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "JOB_STATE_COMPLETED" in created.stdout and "100%  epoch 2  loss" in created.stderr
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/cli-offline").json()["state"] == "READY"
    # a keep-alive job with a dataset: the server's 400 names the field
    refused = girandole("rlorj", "create", "--keep-alive", "--dataset", "cli-offline-train", "--base-model", TINY)  # fmt: skip
    assert refused.returncode == 1 and "leave dataset unset" in refused.stderr


def test_max_rlor_trainers_from_flag_and_variable(monkeypatch):
    """--max-rlor-trainers (and GIRANDOLE_MAX_RLOR_TRAINERS) sets the cap; 2 without them."""
    import argparse

    from girandole.api.server import add_serve_parser, settings_from_args

    def parse(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        return settings_from_args(parser.parse_args(["serve", *argv])).max_rlor_trainers

    assert parse() == 2 and parse("--max-rlor-trainers", "5") == 5
    monkeypatch.setenv("GIRANDOLE_MAX_RLOR_TRAINERS", "3")
    assert parse() == 3
