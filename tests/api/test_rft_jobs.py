"""Fireworks' reinforcement fine-tuning jobs against a real `girandole serve` (a tiny Llama as
its own model), with the fireworks-ai SDK: an evaluator created (Python code scoring the share of
an answer's characters that are the row's ground_truth), a prompt dataset uploaded, a GRPO job
created and polled until COMPLETED, its rollouts scored by the evaluator (jobProgress and the
metrics file), its output model a READY addon that loads and serves; the 400s of bad fields,
rows, loss methods and evaluators, 404, 403 for another account's key, cancel, resume, delete
and list; a job's evaluator cannot be deleted until it ends; one whose evaluator stops building
before it starts fails, naming it."""

from __future__ import annotations

import json

import fireworks
import httpx
import pytest
from finetune_server import ACCOUNT, SHARE, FinetuneServer, prompts

JOBS = f"/v1/accounts/{ACCOUNT}/reinforcementFineTuningJobs"
TINY = f"accounts/{ACCOUNT}/models/tiny"
SMALL = {"maxOutputTokens": 8, "responseCandidatesCount": 2}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama_dir):
    s = FinetuneServer(tmp_path_factory.mktemp("rft-api"), tiny_llama_dir, JOBS)
    s.dataset("prompts", prompts(["hello", "what is up"]))
    s.dataset("failing", prompts(["hello", "what is up"], fail=True))
    s.dataset("held", prompts(["name a color"]))
    s.dataset("answered", b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')  # fmt: skip
    assert s.evaluator("share", SHARE)["state"] == "ACTIVE"
    assert s.evaluator("broken", "def evaluate(:\n")["state"] == "BUILD_FAILED"
    yield s
    s.api.stop_server(s.server)


def test_train_with_an_evaluator_and_serve_the_adapter(srv):
    fw = srv.sdk()
    job = fw.reinforcement_fine_tuning_jobs.create(
        dataset="prompts", evaluator="share", reinforcement_fine_tuning_job_id="rl",
        training_config={"base_model": TINY, "learning_rate": 1e-2},
        inference_parameters={"max_output_tokens": 8, "response_candidates_count": 2, "temperature": 1.0, "top_k": 50},
        loss_config={"method": "GRPO", "kl_beta": 0.01}, chunk_size=100,
        evaluation_dataset="held",  # held-out prompts: evalReward at each epoch's end
    )  # fmt: skip
    assert job.name == f"accounts/{ACCOUNT}/reinforcementFineTuningJobs/rl"
    assert job.evaluator == f"accounts/{ACCOUNT}/evaluators/share"
    assert job.training_config.output_model == f"accounts/{ACCOUNT}/models/rl"
    assert job.inference_parameters.top_p == 1 and job.inference_parameters.top_k == 50
    assert job.loss_config.kl_beta == 0.01 and job.chunk_size == 100
    assert job.evaluation_dataset == f"accounts/{ACCOUNT}/datasets/held"
    done = srv.wait("rl", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED", done
    progress = done["jobProgress"]
    assert progress["percent"] == 100 and progress["step"] == 2, progress
    assert 0 <= progress["meanReward"] <= 1 and 0 <= progress["skippedGroups"] <= 2
    assert progress["droppedRollouts"] == 0
    assert 0 <= progress["evalReward"] <= 1 and progress["evalFailedRollouts"] == 0, progress
    got = fw.reinforcement_fine_tuning_jobs.get("rl")
    assert got.completed_time is not None and got.loss_config.method == "GRPO"
    # every step's numbers: each step's candidates were scored by the evaluator
    url = srv.http("GET", f"{JOBS}/rl:getMetricsFileEndpoint").json()["signedUrl"]
    steps = [json.loads(line) for line in httpx.get(url, timeout=30).text.splitlines()]
    trained = [m for m in steps if "evalReward" not in m]
    assert [m["step"] for m in trained] == [1, 2] and all("meanReward" in m for m in trained), steps
    assert [(m["epoch"], m["step"]) for m in steps if "evalReward" in m] == [(1, 2)], steps

    name = f"accounts/{ACCOUNT}/models/rl"
    model = srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/rl").json()
    assert model["state"] == "READY" and model["kind"] == "HF_PEFT_ADDON"
    assert model["peftDetails"]["baseModel"] == TINY
    loaded = fw.lora.load(model=name, deployment=f"accounts/{ACCOUNT}/deployments/tiny")
    r = srv.http("POST", "/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    fw.lora.unload(loaded.name.rsplit("/", 1)[1])
    fw.reinforcement_fine_tuning_jobs.delete("rl")
    with pytest.raises(fireworks.NotFoundError):
        fw.reinforcement_fine_tuning_jobs.get("rl")
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/rl").status_code == 200


def test_a_job_whose_evaluations_all_fail_fails(srv):
    """Every candidate's evaluation failed in the epoch: nothing was learnt, so the job FAILS
    naming the evaluator's first error (it used to end COMPLETED)."""
    body = {**job_body(epochs=3), "dataset": "failing", "lossConfig": {"method": "DAPO"}}
    r = srv.http("POST", f"{JOBS}?reinforcementFineTuningJobId=failing", json=body)
    assert r.status_code == 200, r.text
    done = srv.wait("failing", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_FAILED", done
    assert done["status"]["code"] == "INVALID_ARGUMENT", done
    message = done["status"]["message"]
    assert "the evaluator failed on all 4 rollouts of epoch 1" in message, message
    assert "ValueError: this row fails" in message, message
    assert done["jobProgress"]["droppedRollouts"] == 4 and done["jobProgress"]["epoch"] == 1, done
    srv.http("DELETE", f"{JOBS}/failing")


def test_the_evaluator_sees_the_accounts_secrets_not_the_jobs_files(srv):
    """The account's secrets are the evaluator's environment, as for evaluation jobs; they
    reach the training process as its environment, never in the job's folder (spec.json)."""
    srv.sdk().secrets.create(name="rft-token", key_name="RFT_TOKEN", value="s3cret-rft")
    # the value reversed: the code (in the spec) does not hold it
    code = "import os\ndef evaluate(messages, **kw):\n    return float(os.environ.get('RFT_TOKEN', '')[::-1] == 'tfr-terc3s')\n"  # fmt: skip
    assert srv.evaluator("secretive", code)["state"] == "ACTIVE"
    r = srv.http("POST", f"{JOBS}?reinforcementFineTuningJobId=secretive", json={**job_body(), "evaluator": "secretive"})  # fmt: skip
    assert r.status_code == 200, r.text
    done = srv.wait("secretive", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED", done
    assert done["jobProgress"]["meanReward"] == 1  # every answer scored with the secret seen
    folder = srv.data / "rft-jobs" / ACCOUNT / "secretive"
    spec = json.loads((folder / "spec.json").read_text())  # the server's evaluator limits
    assert spec["evaluator"]["limits"] == {"timeoutSeconds": 30.0, "memoryMiB": 2048}
    for path in folder.rglob("*"):
        assert not path.is_file() or b"s3cret-rft" not in path.read_bytes(), path
    srv.http("DELETE", f"{JOBS}/secretive")


def job_body(**training) -> dict:
    return {
        "dataset": "prompts", "evaluator": "share", "inferenceParameters": SMALL,
        "trainingConfig": {"baseModel": "tiny", **training},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({**job_body(), "evaluator": None}, "evaluator", "evaluator is required"),
        ({**job_body(), "evaluator": "nope"}, "evaluator", "does not exist"),
        ({**job_body(), "evaluator": "broken"}, "evaluator", "is BUILD_FAILED, not ACTIVE"),
        ({**job_body(), "dataset": None}, "dataset", "dataset is required"),
        (
            {**job_body(), "dataset": "answered"},
            "dataset",
            "line 1: the last message is the assistant's",
        ),  # fmt: skip
        ({**job_body(), "trainingConfig": {}}, "trainingConfig.baseModel", "exactly one"),
        (job_body(loraRank=12), "trainingConfig.loraRank", "power of two"),
        (job_body(bogus=1), "trainingConfig.bogus", "bogus"),
        (
            {**job_body(), "lossConfig": {"method": "DPO"}},
            "lossConfig.method",
            "create a DPO job (dpoJobs)",
        ),  # fmt: skip
        ({**job_body(), "lossConfig": {"method": "ORPO"}}, "lossConfig.method", "dpoJobs"),
        ({**job_body(), "lossConfig": {"dpo": {"beta": 0.1}}}, "lossConfig.dpo", "dpoJobs"),
        (
            {**job_body(), "lossConfig": {"method": "GSPO_TOKEN"}},
            "lossConfig.method",
            "must be GRPO or DAPO",
        ),  # fmt: skip
        ({**job_body(), "lossConfig": {"klBeta": -1}}, "lossConfig.klBeta", "at least 0"),
        (
            {**job_body(), "inferenceParameters": {"responseCandidatesCount": 1}},
            "inferenceParameters.responseCandidatesCount",
            "from 2",
        ),  # fmt: skip
        (
            {**job_body(), "inferenceParameters": {"temperature": 3}},
            "inferenceParameters.temperature",
            "from 0 to 2",
        ),  # fmt: skip
        (
            {**job_body(), "inferenceParameters": {"topP": 0}},
            "inferenceParameters.topP",
            "more than 0",
        ),  # fmt: skip
        (
            {**job_body(), "inferenceParameters": {"topK": -1}},
            "inferenceParameters.topK",
            "at least 0",
        ),  # fmt: skip
        (
            {**job_body(), "inferenceParameters": {"extraBody": '{"stop": ["x"]}'}},
            "inferenceParameters.extraBody",
            "not supported",
        ),  # fmt: skip
        (
            {**job_body(maxContextLength=8)},
            "inferenceParameters.maxOutputTokens",
            "leaves no room",
        ),  # fmt: skip
        ({**job_body(), "mcpServer": "x"}, "mcpServer", "MCP server"),
        (
            {**job_body(), "maxInferenceReplicaCount": 2},
            "maxInferenceReplicaCount",
            "not supported",
        ),  # fmt: skip
        ({**job_body(), "nodeCount": 2}, "nodeCount", "one machine"),
        ({**job_body(), "evaluationDataset": "answered"}, "evaluationDataset", "line 1"),
        ({**job_body(), "wandbConfig": {"enabled": True}}, "wandbConfig", "Weights & Biases"),
        ({**job_body(), "awsS3Config": {"iamRoleArn": "x"}}, "awsS3Config", "S3"),
        ({**job_body(), "reservationTarget": "r"}, "reservationTarget", "reserved capacity"),
        ({**job_body(), "chunkSize": 0}, "chunkSize", "from 1 to 10000"),
        ({**job_body(), "maxConcurrentRollouts": 0}, "maxConcurrentRollouts", "from 1"),
    ],
)
def test_bad_fields_are_400(srv, body, param, says):
    r = srv.http("POST", JOBS, json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and (error.get("param") or "") == param, error


def test_unknown_job_404_and_other_account_403(srv):
    assert srv.http("GET", f"{JOBS}/nope").status_code == 404
    message = srv.http("POST", f"{JOBS}/nope:cancel").json()["error"]["message"]
    assert "Reinforcement fine-tuning job" in message
    srv.assert_other_account_403()
    assert srv.http("GET", "/inference" + JOBS).status_code == 200
    assert srv.http("POST", JOBS, key=srv.reader_key, json=job_body()).status_code == 403


def test_cancel_resume_list_and_delete(srv):
    fw = srv.sdk()
    slow = {**job_body(epochs=1000), "evalAutoCarveout": True}  # kept: "prompts"' last row held out
    r = srv.http("POST", f"{JOBS}?reinforcementFineTuningJobId=slow", json=slow)
    assert r.status_code == 200 and r.json()["evalAutoCarveout"] is True, r.text
    r = srv.http("POST", f"{JOBS}?reinforcementFineTuningJobId=slow", json=slow)
    assert r.status_code == 409, r.text
    srv.wait("slow", ("JOB_STATE_RUNNING",))
    r = srv.http("DELETE", f"/v1/accounts/{ACCOUNT}/datasets/prompts")
    assert r.status_code == 400 and "reinforcement fine-tuning job" in r.json()["error"]["message"], r.text  # fmt: skip
    # a waiting job's evaluator cannot be deleted (it reads the code when it starts), nor a
    # running one's (its scores stay the evaluator's it was created with) ...
    assert srv.evaluator("gone", SHARE)["state"] == "ACTIVE"
    r = srv.http("POST", f"{JOBS}?reinforcementFineTuningJobId=orphan", json={**job_body(), "evaluator": "gone"})  # fmt: skip
    assert r.status_code == 200, r.text
    for evaluator, job, state in (("gone", "orphan", "PENDING"), ("share", "slow", "RUNNING")):
        r = srv.http("DELETE", f"/v1/accounts/{ACCOUNT}/evaluators/{evaluator}")
        assert r.status_code == 400 and r.json()["error"]["code"] == "FAILED_PRECONDITION", r.text
        assert (
            f"Evaluator accounts/{ACCOUNT}/evaluators/{evaluator} is used by reinforcement"
            f" fine-tuning job accounts/{ACCOUNT}/reinforcementFineTuningJobs/{job}, which has"
            f" not ended (JOB_STATE_{state}): cancel the job or wait for it first"
        ) in r.json()["error"]["message"], r.text
    # ... but it can be changed: one that no longer builds fails the job when it starts
    code = {"main.py": "def score(**_):\n    return 1\n"}  # no evaluate: BUILD_FAILED
    criteria = [{"type": "CODE_SNIPPETS", "codeSnippets": {"fileContents": code, "entryFile": "main.py", "entryFunc": "evaluate"}}]  # fmt: skip
    r = srv.http("PATCH", f"/v1/accounts/{ACCOUNT}/evaluators/gone", json={"criteria": criteria})
    assert r.status_code == 200, r.text
    assert srv.wait("gone", ("BUILD_FAILED",), jobs=f"/v1/accounts/{ACCOUNT}/evaluators")
    cancelled = fw.reinforcement_fine_tuning_jobs.cancel("slow", body={})
    assert cancelled["state"] == "JOB_STATE_CANCELLED"
    orphan = srv.wait("orphan", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert orphan["state"] == "JOB_STATE_FAILED", orphan
    assert orphan["status"]["code"] == "FAILED_PRECONDITION"
    assert (
        f"evaluator accounts/{ACCOUNT}/evaluators/gone is BUILD_FAILED, not ACTIVE"
        in orphan["status"]["message"]
    )
    fw.reinforcement_fine_tuning_jobs.delete("orphan")
    page = fw.reinforcement_fine_tuning_jobs.list(page_size=1)
    assert [j.name.rsplit("/", 1)[1] for j in page.reinforcement_fine_tuning_jobs] == ["slow"]
    resumed = fw.reinforcement_fine_tuning_jobs.resume("slow", body={})
    assert resumed.state == "JOB_STATE_PENDING"
    srv.wait("slow", ("JOB_STATE_RUNNING",))
    fw.reinforcement_fine_tuning_jobs.delete("slow")  # cancels it first
    assert srv.http("GET", f"{JOBS}/slow").status_code == 404


def test_no_evaluator_code_refuses_them(tmp_path):
    """--no-evaluator-code: an RFT job would run an evaluator's code, so it is refused (403) as
    evaluators and evaluation jobs are."""
    from evaluator_server import evaluator_server

    with evaluator_server(tmp_path, "--no-evaluator-code") as server:
        r = server.http("POST", JOBS, json=job_body())
        assert r.status_code == 403 and "--no-evaluator-code" in r.json()["error"]["message"], r.text  # fmt: skip
