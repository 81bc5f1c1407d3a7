"""Fireworks' RLOR trainer jobs (`client.reinforcement_fine_tuning_steps`) against a real `girandole
serve` (a tiny Llama as its own model), with the fireworks-ai SDK: a keep-alive job loads its
policy and runs the user's steps over datasets of scored rollouts; each step's output model is
served at once and moves the completion's log-probability toward the rewarded answer (step
after step: fails if the advantage's sign is wrong or a step does nothing); the hot-load
deployment swaps to each step's adapter; steps of a job run one at a time (409); a resumed job
goes on from its last step (its step 3 as a job never stopped); a step whose hot load fails
stands (hotLoadStatus says why); a job over a dataset COMPLETES with its output model;
forward-only steps report the loss and write no model; cancel, resume, list, delete; the 400s of
bad fields and rows, 404s, and another account's 403."""

from __future__ import annotations

import json
import threading
import time

import fireworks
import httpx
import pytest
from finetune_server import ACCOUNT, FinetuneServer

JOBS = f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs"
DEPLOYMENT = f"accounts/{ACCOUNT}/deployments/tiny"
GOOD, BAD = " Zebra", " Walrus"  # the rewarded answer and the other
PROMPTS = ["hello", "what is up"]


def rollouts(prompts: list[str] = PROMPTS) -> bytes:
    """Raw rows: each prompt answered GOOD (reward 1) and BAD (reward 0)."""
    lines = [
        {"prompt": p, "completion": c, "reward": r}
        for p in prompts
        for c, r in ((GOOD, 1.0), (BAD, 0.0))
    ]  # fmt: skip
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_rollouts() -> bytes:
    """Chat rows scored as eval-protocol writes them (evaluation_result.score)."""
    lines = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
         "evaluation_result": {"score": s}, "ground_truth": "Zebra"}
        for p in PROMPTS
        for c, s in (("Zebra", 0.9), ("Walrus", 0.1))
    ]  # fmt: skip
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama_dir):
    s = FinetuneServer(tmp_path_factory.mktemp("rlor-api"), tiny_llama_dir, JOBS)
    s.dataset("rollouts", rollouts())
    s.dataset("chat", chat_rollouts())
    s.dataset("many", rollouts([f"prompt number {i}" for i in range(30)]))
    bad = {
        "no-reward": b'{"prompt": "a", "completion": "b"}\n',
        "text-reward": b'{"prompt": "a", "completion": "b", "reward": 1}\n{"prompt": "a", "completion": "c", "reward": "high"}\n',  # fmt: skip
        "no-answer": b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "reward": 1}\n',  # fmt: skip
        "both": b'{"messages": [], "prompt": "a", "completion": "b", "reward": 1}\n',
        "empty": b'{"prompt": "a", "completion": "", "reward": 1}\n',
    }
    for name, data in bad.items():
        s.dataset(name, data)
    yield s
    s.api.stop_server(s.server)


def score(srv: FinetuneServer, model: str, prompt: str = "hello") -> float:
    """log p(GOOD) - log p(BAD) after `prompt` under `model` (echoed prompt logprobs)."""
    total = 0.0
    for answer, sign in ((GOOD, 1), (BAD, -1)):
        body = {"model": model, "prompt": prompt + answer, "echo": True, "logprobs": 1, "max_tokens": 0}  # fmt: skip
        r = srv.http("POST", "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        total += sign * sum(x for x in r.json()["choices"][0]["logprobs"]["token_logprobs"] if x is not None)  # fmt: skip
    return total


def keep_alive(srv: FinetuneServer, job_id: str, **fields) -> dict:
    body = {"keepAlive": True, "trainingConfig": {"baseModel": "tiny", "learningRate": 0.02}, **fields}  # fmt: skip
    r = srv.http("POST", f"{JOBS}?rlorTrainerJobId={job_id}", json=body)
    assert r.status_code == 200, r.text
    return srv.wait(job_id, ("JOB_STATE_RUNNING", "JOB_STATE_FAILED"))


def test_keep_alive_steps_train_serve_and_hot_load(srv):
    fw = srv.sdk()
    job = fw.reinforcement_fine_tuning_steps.create(
        rlor_trainer_job_id="loop", keep_alive=True, hot_load_deployment_id="tiny",
        training_config={"base_model": "tiny", "learning_rate": 0.02},
        loss_config={"method": "GRPO", "kl_beta": 0.01},
    )  # fmt: skip
    assert job.name == f"{JOBS[4:]}/loop" and job.keep_alive and job.hot_load_deployment_id == DEPLOYMENT  # fmt: skip
    assert job.training_config.lora_rank == 8 and job.state in ("JOB_STATE_PENDING", "JOB_STATE_CREATING")  # fmt: skip
    assert (
        srv.wait("loop", ("JOB_STATE_RUNNING", "JOB_STATE_FAILED"))["state"] == "JOB_STATE_RUNNING"
    )
    base = score(srv, "tiny")
    scores = []
    for step in (1, 2):
        out = f"accounts/{ACCOUNT}/models/loop-{step}"
        done = fw.reinforcement_fine_tuning_steps.execute("loop", dataset="rollouts", output_model=out)  # fmt: skip
        progress = done["jobProgress"]
        assert progress["step"] == step and progress["rollouts"] == 4 and progress["groups"] == 2, done  # fmt: skip
        assert progress["meanReward"] == 0.5 and progress["skippedGroups"] == 0 and progress["kl"] >= 0  # fmt: skip
        assert out in done["status"]["message"] and DEPLOYMENT in done["status"]["message"]
        model = srv.http("GET", f"/v1/{out}").json()
        assert model["state"] == "READY" and model["kind"] == "HF_PEFT_ADDON", model
        scores.append(score(srv, out))
        # the hot-load deployment holds this step's adapter only: the last one swapped out
        loaded = {m.model for m in fw.lora.list().deployed_models if m.deployment == DEPLOYMENT}
        assert loaded == {out}, loaded
    # each step moves the policy toward the rewarded answer
    assert base < scores[0] < scores[1], (base, scores)
    assert score(srv, f"accounts/{ACCOUNT}/models/loop-2#{DEPLOYMENT}") == pytest.approx(scores[1], abs=1e-3)  # fmt: skip
    r = srv.http("POST", "/v1/completions", json={"model": f"accounts/{ACCOUNT}/models/loop-1#{DEPLOYMENT}", "prompt": "hi", "max_tokens": 1})  # fmt: skip
    assert r.status_code == 404, r.text
    # an output model that exists
    r = srv.http("POST", f"{JOBS}/loop:executeTrainStep", json={"dataset": "rollouts", "outputModel": "loop-1"})  # fmt: skip
    assert r.status_code == 409 and r.json()["error"]["param"] == "outputModel", r.text
    # chat rows, scored by evaluation_result
    done = fw.reinforcement_fine_tuning_steps.execute("loop", dataset="chat", output_model="loop-3")
    assert done["jobProgress"]["step"] == 3 and done["jobProgress"]["meanReward"] == pytest.approx(0.5)  # fmt: skip
    url = srv.http("GET", f"{JOBS}/loop:getMetricsFileEndpoint").json()["signedUrl"]
    lines = [json.loads(line) for line in httpx.get(url, timeout=30).text.splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3], lines

    # one step at a time: a second while a long one runs is a 409
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(r=srv.http("POST", f"{JOBS}/loop:executeTrainStep", json={"dataset": "many", "outputModel": "loop-4"})))  # fmt: skip
    thread.start()
    started = srv.data / "rlor-jobs" / ACCOUNT / "loop" / "step.jsonl"
    deadline = time.monotonic() + 30
    while b"prompt number" not in (started.read_bytes() if started.exists() else b""):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = srv.http("POST", f"{JOBS}/loop:executeTrainStep", json={"dataset": "rollouts", "outputModel": "loop-5"})  # fmt: skip
    thread.join()
    assert r.status_code == 409 and r.json()["error"]["code"] == "ABORTED", r.text
    assert first["r"].status_code == 200 and first["r"].json()["jobProgress"]["step"] == 4

    fw.reinforcement_fine_tuning_steps.delete("loop")  # stops the trainer; the models stay
    assert srv.http("GET", f"{JOBS}/loop").status_code == 404
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/loop-2").status_code == 200


def step(srv: FinetuneServer, job_id: str, out: str) -> dict:
    r = srv.http("POST", f"{JOBS}/{job_id}:executeTrainStep", json={"dataset": "rollouts", "outputModel": out})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def loaded_score(srv: FinetuneServer, model_id: str) -> float:
    """score() of output model `model_id`, loaded onto the server's own deployment first."""
    name = f"accounts/{ACCOUNT}/models/{model_id}"
    srv.sdk().lora.load(model=name, deployment=DEPLOYMENT)
    return score(srv, name)


def test_resume_goes_on_from_the_last_step_and_a_failed_hot_load_is_a_warning(srv):
    """A job cancelled after step 2 and resumed runs step 3 as a job never stopped does (the
    same loss, the same adapter: the policy and AdamW's state go on, not the base); a step whose
    hot load fails (its deployment deleted) stands, the failure in hotLoadStatus."""
    fw = srv.sdk()
    fw.deployments.create(base_model=f"accounts/{ACCOUNT}/models/tiny", deployment_id="hl", min_replica_count=0)  # fmt: skip
    loss = {"lossConfig": {"klBeta": 0.05}}
    assert keep_alive(srv, "straight", **loss)["state"] == "JOB_STATE_RUNNING"
    job = keep_alive(srv, "paused", hotLoadDeploymentId="hl", **loss)
    assert job["state"] == "JOB_STATE_RUNNING", job
    straight = [step(srv, "straight", f"straight-{n}")["jobProgress"] for n in (1, 2, 3)]
    done = step(srv, "paused", "paused-1")
    assert done["hotLoadStatus"]["code"] == "OK" and done["latestOutputModel"] == f"accounts/{ACCOUNT}/models/paused-1"  # fmt: skip
    # the deployment goes: the step's model is written and served all the same
    r = srv.http("DELETE", f"/v1/accounts/{ACCOUNT}/deployments/hl", params={"hard": "true"})
    assert r.status_code == 200, r.text
    done = step(srv, "paused", "paused-2")
    out = f"accounts/{ACCOUNT}/models/paused-2"
    assert done["state"] == "JOB_STATE_RUNNING" and done["latestOutputModel"] == out, done
    warning = done["hotLoadStatus"]
    assert warning["code"] == "NOT_FOUND" and "not loaded onto accounts/acme/deployments/hl" in warning["message"], warning  # fmt: skip
    assert f"outputModel {out} written; not loaded onto" in done["status"]["message"], done
    assert done["status"]["code"] == "OK" and done["jobProgress"]["step"] == 2
    assert srv.http("GET", f"/v1/{out}").json()["state"] == "READY"
    step_2 = loaded_score(srv, "paused-2")
    assert step_2 == pytest.approx(loaded_score(srv, "straight-2"), abs=1e-3)

    assert fw.reinforcement_fine_tuning_steps.cancel("paused", body={})["state"] == "JOB_STATE_CANCELLED"  # fmt: skip
    assert fw.reinforcement_fine_tuning_steps.resume("paused", body={}).state == "JOB_STATE_PENDING"
    assert srv.wait("paused", ("JOB_STATE_RUNNING", "JOB_STATE_FAILED"))["state"] == "JOB_STATE_RUNNING"  # fmt: skip
    resumed = step(srv, "paused", "paused-3")["jobProgress"]
    # step 3's loss is that of step 2's policy (not the base's: its KL to the base is not 0)
    assert resumed["step"] == 3 and resumed["kl"] > 1e-6, resumed
    assert resumed["loss"] == pytest.approx(straight[2]["loss"], rel=1e-5), (resumed, straight)
    after = loaded_score(srv, "paused-3")
    assert after == pytest.approx(loaded_score(srv, "straight-3"), abs=1e-3)
    assert after > step_2  # it builds on step 2
    url = srv.http("GET", f"{JOBS}/paused:getMetricsFileEndpoint").json()["signedUrl"]
    lines = [json.loads(line) for line in httpx.get(url, timeout=30).text.splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3], lines
    for job_id in ("straight", "paused"):
        fw.reinforcement_fine_tuning_steps.delete(job_id)


@pytest.fixture(scope="module")
def probe(srv) -> str:
    """A forward-only keep-alive job (after the first test: it deletes its own job, and a
    server holds two trainers at most)."""
    job = keep_alive(srv, "probe", forwardOnly=True, lossConfig={"klBeta": 0.1})
    assert job["state"] == "JOB_STATE_RUNNING", job
    return "probe"


@pytest.mark.parametrize(
    ("dataset", "status", "param", "says"),
    [
        ("no-reward", 400, "dataset", "line 1: give the rollout's score as reward"),
        ("text-reward", 400, "dataset", 'line 2: reward must be a finite number, got "high"'),
        ("no-answer", 400, "dataset", "line 1: messages[1].role must be assistant"),
        ("both", 400, "dataset", "line 1: a row has messages or prompt and completion, not both"),
        ("empty", 400, "dataset", "line 1: completion is empty"),
        ("nope", 404, "dataset", f"dataset accounts/{ACCOUNT}/datasets/nope not found"),
    ],
)
def test_a_steps_bad_rows_are_named(srv, probe, dataset, status, param, says):
    r = srv.http("POST", f"{JOBS}/probe:executeTrainStep", json={"dataset": dataset, "outputModel": "x"})  # fmt: skip
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["param"] == param, error


def test_forward_only_steps_cancel_resume_and_refusals(srv, probe):
    fw = srv.sdk()
    losses = []
    for _ in range(2):
        r = srv.http("POST", f"{JOBS}/probe:executeTrainStep", json={"dataset": "rollouts", "outputModel": "probe-1"})  # fmt: skip
        assert r.status_code == 200, r.text
        losses.append(r.json()["jobProgress"]["loss"])
        assert r.json()["jobProgress"]["kl"] == pytest.approx(0, abs=1e-6)  # still the base
    assert losses[0] != 0 and losses[1] == pytest.approx(losses[0], rel=1e-6)  # no update
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/probe-1").status_code == 404  # no model
    # no outputModel (required, as the SDK's, though a forward-only step writes none)
    r = srv.http("POST", f"{JOBS}/probe:executeTrainStep", json={"dataset": "rollouts"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "outputModel", r.text
    # another account's key: 403 on every route of this account; its own: no such job
    srv.assert_other_account_403()
    r = srv.http("POST", f"{JOBS}/probe:executeTrainStep", key=srv.other_key, json={"dataset": "rollouts", "outputModel": "y"})  # fmt: skip
    assert r.status_code == 403, r.text
    r = srv.http("POST", "/v1/accounts/other/rlorTrainerJobs/probe:executeTrainStep", key=srv.other_key, json={})  # fmt: skip
    assert r.status_code == 404 and "RLOR trainer job accounts/other/rlorTrainerJobs/probe not found" in r.text  # fmt: skip

    cancelled = fw.reinforcement_fine_tuning_steps.cancel("probe", body={})
    assert cancelled["state"] == "JOB_STATE_CANCELLED"
    r = srv.http("POST", f"{JOBS}/probe:executeTrainStep", json={"dataset": "rollouts", "outputModel": "p"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "FAILED_PRECONDITION", r.text
    assert "is JOB_STATE_CANCELLED: a step runs on a RUNNING job" in r.json()["error"]["message"]
    page = fw.reinforcement_fine_tuning_steps.list(filter='state="JOB_STATE_CANCELLED"')
    assert [j.name.rsplit("/", 1)[1] for j in page.rlor_trainer_jobs] == ["probe"]
    assert fw.reinforcement_fine_tuning_steps.resume("probe", body={}).state == "JOB_STATE_PENDING"
    fw.reinforcement_fine_tuning_steps.delete("probe")  # while its policy loads again
    with pytest.raises(fireworks.NotFoundError):
        fw.reinforcement_fine_tuning_steps.get("probe")


def test_jobs_over_a_dataset_complete(srv):
    r = srv.http("POST", f"{JOBS}?rlorTrainerJobId=offline", json={"dataset": "rollouts", "trainingConfig": {"baseModel": "tiny", "learningRate": 0.02, "epochs": 2}, "lossConfig": {"method": "DAPO"}})  # fmt: skip
    assert r.status_code == 200, r.text
    r = srv.http("POST", f"{JOBS}?rlorTrainerJobId=measure", json={"dataset": "rollouts", "forwardOnly": True, "trainingConfig": {"baseModel": "tiny"}})  # fmt: skip
    assert r.status_code == 200 and "outputModel" not in r.json()["trainingConfig"], r.text
    # a step is for keep-alive jobs only
    r = srv.http("POST", f"{JOBS}/offline:executeTrainStep", json={"dataset": "rollouts", "outputModel": "z"})  # fmt: skip
    assert r.status_code == 400 and "is not keep-alive" in r.json()["error"]["message"], r.text
    done = srv.wait("offline", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED", done
    assert done["jobProgress"]["step"] == 2 and done["jobProgress"]["groups"] == 2, done
    out = f"accounts/{ACCOUNT}/models/offline"
    assert done["trainingConfig"]["outputModel"] == out
    srv.sdk().lora.load(model=out, deployment=DEPLOYMENT)
    assert score(srv, out) > score(srv, "tiny")
    # forward only: the loss of the base policy, no model written
    done = srv.wait("measure", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED" and "no model written" in done["status"]["message"], done  # fmt: skip
    assert done["jobProgress"]["loss"] != 0
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/measure").status_code == 404


def body(**fields) -> dict:
    return {"keepAlive": True, "trainingConfig": {"baseModel": "tiny"}, **fields}


@pytest.mark.parametrize(
    ("fields", "status", "param", "says"),
    [
        (
            body(serviceMode=True, trainingConfig={"baseModel": "tiny", "loraRank": 8}),
            400,
            "serviceMode",
            "loraRank must be 0, got 8",
        ),  # fmt: skip
        (
            body(serviceMode=True, trainingConfig={"baseModel": "tiny", "loraRank": 0}),
            400,
            "serviceMode",
            "not served here",
        ),  # fmt: skip
        (body(dataset="rollouts"), 400, "dataset", "leave dataset unset"),
        (body(keepAlive=False), 400, "dataset", "dataset is required"),
        (body(keepAlive=False, dataset="nope"), 404, "dataset", "not found"),
        (
            body(keepAlive=False, dataset="text-reward"),
            400,
            "dataset",
            "line 2: reward must be a finite number",
        ),  # fmt: skip
        (
            body(keepAlive=False, dataset="rollouts", hotLoadDeploymentId="tiny"),
            400,
            "hotLoadDeploymentId",
            "only valid for a keep-alive job",
        ),  # fmt: skip
        (body(hotLoadDeploymentId="nope"), 404, "hotLoadDeploymentId", "not found"),
        (
            body(trainingConfig={"baseModel": "nope"}),
            400,
            "trainingConfig.baseModel",
            "not a model this account can use",
        ),  # fmt: skip
        (
            body(trainingConfig={"baseModel": "tiny", "outputModel": "o"}),
            400,
            "trainingConfig.outputModel",
            "leave trainingConfig.outputModel unset",
        ),  # fmt: skip
        (body(lossConfig={"method": "DPO"}), 400, "lossConfig.method", "dpoJobs"),
        (body(rewardWeights=["a=1"]), 400, "rewardWeights", "one reward"),
        (body(evaluationDataset="rollouts"), 400, "evaluationDataset", "held-out"),
        (body(wandbConfig={"enabled": True}), 400, "wandbConfig", "Weights & Biases"),
        (body(nodeCount=2), 400, "nodeCount", "one machine"),
    ],
)
def test_bad_fields(srv, fields, status, param, says):
    r = srv.http("POST", JOBS, json=fields)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["param"] == param, error


def test_a_resumed_job_needs_not_its_deleted_warm_start_and_counts_on(srv):
    """A warm-started job whose warm start is deleted while it runs: its next step's model is
    written (it was a 500: the output model's base was read from the deleted adapter), and a
    resume goes on from its checkpoint (it failed: `warmStartFrom ... no longer exists`, though
    the checkpoint holds the policy). A forward-only job's step count goes on after a resume
    (it started again from 1: its steps wrote no checkpoint)."""
    fw = srv.sdk()
    assert keep_alive(srv, "seed")["state"] == "JOB_STATE_RUNNING"
    step(srv, "seed", "seed-1")
    fw.reinforcement_fine_tuning_steps.delete("seed")  # frees its trainer; the model stays
    warm = {"keepAlive": True, "trainingConfig": {"warmStartFrom": f"accounts/{ACCOUNT}/models/seed-1", "learningRate": 0.02}}  # fmt: skip
    for job_id in ("warm", "straight"):
        r = srv.http("POST", f"{JOBS}?rlorTrainerJobId={job_id}", json=warm)
        assert r.status_code == 200, r.text
        assert srv.wait(job_id, ("JOB_STATE_RUNNING", "JOB_STATE_FAILED"))["state"] == "JOB_STATE_RUNNING"  # fmt: skip
    straight = [step(srv, "straight", f"straight-w{n}")["jobProgress"] for n in (1, 2, 3)]
    fw.reinforcement_fine_tuning_steps.delete("straight")
    assert step(srv, "warm", "warm-1")["jobProgress"]["step"] == 1
    r = srv.http("DELETE", f"/v1/accounts/{ACCOUNT}/models/seed-1")
    assert r.status_code == 200, r.text
    done = step(srv, "warm", "warm-2")
    assert done["jobProgress"]["step"] == 2 and done["latestOutputModel"].endswith("/warm-2"), done
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/warm-2").json()["state"] == "READY"
    fw.reinforcement_fine_tuning_steps.cancel("warm", body={})
    fw.reinforcement_fine_tuning_steps.resume("warm", body={})
    job = srv.wait("warm", ("JOB_STATE_RUNNING", "JOB_STATE_FAILED"))
    assert job["state"] == "JOB_STATE_RUNNING", job
    resumed = step(srv, "warm", "warm-3")["jobProgress"]
    # step 3 as the job never stopped runs it: from step 2's policy and AdamW state
    assert resumed["step"] == 3 and resumed["loss"] == pytest.approx(straight[2]["loss"], rel=1e-5)
    fw.reinforcement_fine_tuning_steps.delete("warm")

    assert keep_alive(srv, "count", forwardOnly=True)["state"] == "JOB_STATE_RUNNING"
    for n in (1, 2):
        assert step(srv, "count", "unwritten")["jobProgress"]["step"] == n
    fw.reinforcement_fine_tuning_steps.cancel("count", body={})
    fw.reinforcement_fine_tuning_steps.resume("count", body={})
    assert srv.wait("count", ("JOB_STATE_RUNNING", "JOB_STATE_FAILED"))["state"] == "JOB_STATE_RUNNING"  # fmt: skip
    assert step(srv, "count", "unwritten")["jobProgress"]["step"] == 3
    url = srv.http("GET", f"{JOBS}/count:getMetricsFileEndpoint").json()["signedUrl"]
    lines = [json.loads(line) for line in httpx.get(url, timeout=30).text.splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3], lines
    fw.reinforcement_fine_tuning_steps.delete("count")
    # a job made again under a deleted one's id starts from its base, not the old checkpoint
    assert keep_alive(srv, "count", forwardOnly=True)["state"] == "JOB_STATE_RUNNING"
    assert step(srv, "count", "unwritten")["jobProgress"]["step"] == 1
    fw.reinforcement_fine_tuning_steps.delete("count")
