"""Fireworks' supervised fine-tuning jobs against a real `girandole serve` (a tiny Llama as its
own model), with the fireworks-ai SDK: a dataset uploaded, a job created and polled until
COMPLETED, its output model READY in the catalog, loaded as a LoRA (deployedModels) and
answering the trained string to a chat completion; the 400s of bad fields, 404, 403 for another
account's key, cancel, resume, delete and list paging; jobs taking turns across accounts, and the
cap on an account's waiting jobs (--max-pending-finetune-jobs)."""

from __future__ import annotations

import fireworks
import openai
import pytest
from finetune_server import ACCOUNT, ANSWER, OTHER, FinetuneServer, rows

JOBS = f"/v1/accounts/{ACCOUNT}/supervisedFineTuningJobs"
OTHER_JOBS = f"/v1/accounts/{OTHER}/supervisedFineTuningJobs"
PENDING_CAP = 3  # --max-pending-finetune-jobs: the other tests have at most 3 jobs waiting


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama_dir):
    s = FinetuneServer(
        tmp_path_factory.mktemp("sft-api"), tiny_llama_dir, JOBS,
        "--max-pending-finetune-jobs", str(PENDING_CAP),
    )  # fmt: skip
    s.dataset("zebra", rows())
    s.dataset("broken", rows() + b'{"messages": [{"role": "user", "content": "q"}]}\n')
    # valid rows, but the tiny Llama's template (Llama 2's) wants user/assistant turns in turn
    s.dataset("out-of-turn", rows() + b'{"messages": [{"role": "assistant", "content": "a"}]}\n')
    yield s
    s.api.stop_server(s.server)


def test_train_deploy_and_query_the_adapter(srv):
    fw = srv.sdk()
    job = fw.supervised_fine_tuning_jobs.create(
        dataset="zebra", base_model=f"accounts/{ACCOUNT}/models/tiny", epochs=10,
        learning_rate=5e-3, batch_size_samples=1, supervised_fine_tuning_job_id="zebra-job",
        display_name="zebra",
    )  # fmt: skip
    assert job.name == f"accounts/{ACCOUNT}/supervisedFineTuningJobs/zebra-job"
    assert job.state in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert job.output_model == f"accounts/{ACCOUNT}/models/zebra-job" and job.lora_rank == 8
    done = srv.wait("zebra-job", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED", done
    got = fw.supervised_fine_tuning_jobs.get("zebra-job")
    assert got.job_progress.percent == 100 and got.job_progress.epoch == 10
    assert got.completed_time is not None and got.created_by

    model = srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/zebra-job").json()
    assert model["state"] == "READY" and model["kind"] == "HF_PEFT_ADDON"
    assert model["peftDetails"]["baseModel"] == f"accounts/{ACCOUNT}/models/tiny"

    name = f"accounts/{ACCOUNT}/models/zebra-job"
    loaded = fw.lora.load(model=name, deployment=f"accounts/{ACCOUNT}/deployments/tiny")
    client = openai.OpenAI(api_key=srv.key, base_url=srv.server.url + "/v1", max_retries=0)

    def chat(model: str) -> str:
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "a new question"}],
            max_tokens=12, temperature=0,
        )  # fmt: skip
        return out.choices[0].message.content.strip()

    assert chat(name) == ANSWER
    assert chat(f"accounts/{ACCOUNT}/models/tiny") != ANSWER
    fw.lora.unload(loaded.name.rsplit("/", 1)[1])

    # a warm start continues the adapter, at its rank, on its base model
    r = srv.http("POST", JOBS, json={"dataset": "zebra", "warmStartFrom": name, "loraRank": 16})
    assert r.status_code == 400 and "has rank 8" in r.json()["error"]["message"]
    warm = fw.supervised_fine_tuning_jobs.create(
        dataset="zebra", warm_start_from=name, learning_rate=1e-4,
        supervised_fine_tuning_job_id="zebra-warm",
    )  # fmt: skip
    assert warm.lora_rank == 8 and warm.base_model is None
    assert srv.wait("zebra-warm", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))["state"] == "JOB_STATE_COMPLETED"  # fmt: skip
    model = srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/zebra-warm").json()
    assert model["peftDetails"]["baseModel"] == f"accounts/{ACCOUNT}/models/tiny"

    # a second job may not write the same model; delete keeps the model
    r = srv.http("POST", JOBS, json={"dataset": "zebra", "baseModel": "tiny", "outputModel": "zebra-job"})  # fmt: skip
    assert r.status_code == 409 and r.json()["error"]["param"] == "outputModel"
    fw.supervised_fine_tuning_jobs.delete("zebra-job")
    with pytest.raises(fireworks.NotFoundError):
        fw.supervised_fine_tuning_jobs.get("zebra-job")
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/zebra-job").status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"baseModel": "tiny"}, "dataset", "dataset is required"),
        ({"dataset": "zebra"}, "baseModel", "exactly one of baseModel"),
        (
            {"dataset": "zebra", "baseModel": "tiny", "warmStartFrom": "x"},
            "baseModel",
            "exactly one",
        ),  # fmt: skip
        ({"dataset": "zebra", "baseModel": "nope"}, "baseModel", "not a model this account"),
        ({"dataset": "zebra", "warmStartFrom": "tiny"}, "warmStartFrom", "not a LoRA adapter"),
        ({"dataset": "nope", "baseModel": "tiny"}, "dataset", "not found"),
        ({"dataset": "broken", "baseModel": "tiny"}, "dataset", "line 7: no assistant message"),
        ({"dataset": "zebra", "baseModel": "tiny", "epochs": 0}, "epochs", "at least 1"),
        (
            {"dataset": "zebra", "baseModel": "tiny", "learningRate": -1},
            "learningRate",
            "positive",
        ),  # fmt: skip
        ({"dataset": "zebra", "baseModel": "tiny", "loraRank": 12}, "loraRank", "power of two"),
        ({"dataset": "zebra", "baseModel": "tiny", "loraRank": 128}, "loraRank", "power of two"),
        ({"dataset": "zebra", "baseModel": "tiny", "batchSize": 0}, "batchSize", "at least 1"),
        ({"dataset": "zebra", "baseModel": "tiny", "batchSize": 10**400}, "batchSize", "at most"),
        (
            {"dataset": "zebra", "baseModel": "tiny", "earlyStop": True},
            "earlyStop",
            "evaluation set",
        ),  # fmt: skip
        (
            {"dataset": "zebra", "baseModel": "tiny", "evaluationDataset": "nope"},
            "evaluationDataset",
            "not found",
        ),  # fmt: skip
        (
            {"dataset": "zebra", "baseModel": "tiny", "wandbConfig": {"enabled": True}},
            "wandbConfig",
            "Weights & Biases",
        ),  # fmt: skip
        ({"dataset": "zebra", "baseModel": "tiny", "isTurbo": True}, "isTurbo", "not supported"),
        ({"dataset": "zebra", "baseModel": "tiny", "nodes": 2}, "nodes", "one machine"),
        (
            {"dataset": "zebra", "baseModel": "tiny", "jinjaTemplate": "{{x}}"},
            "jinjaTemplate",
            "chat template",
        ),  # fmt: skip
        ({"dataset": "zebra", "baseModel": "tiny", "bogus": 1}, "bogus", "bogus"),
        ({"dataset": "accounts/other/datasets/zebra", "baseModel": "tiny"}, "dataset", "dataset"),
    ],
)
def test_bad_fields_are_400(srv, body, param, says):
    r = srv.http("POST", JOBS, json=body)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert says in error["message"] and (error.get("param") or "").endswith(param), error


def test_a_row_the_template_refuses_fails_the_job_naming_it(srv):
    r = srv.http("POST", f"{JOBS}?supervisedFineTuningJobId=out-of-turn", json={"dataset": "out-of-turn", "baseModel": "tiny"})  # fmt: skip
    assert r.status_code == 200, r.text
    job = srv.wait("out-of-turn", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert job["state"] == "JOB_STATE_FAILED" and "dataset row 7" in job["status"]["message"]
    assert "alternate" in job["status"]["message"] and job["completedTime"]
    # nothing was made, and its output model id is free again
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/out-of-turn").status_code == 404


def test_a_number_past_floats_range_is_400(srv):
    raw = b'{"dataset": "zebra", "baseModel": "tiny", "optimizerWeightDecay": 1e400}'
    r = srv.http("POST", JOBS, content=raw)  # read as JSON whatever its content type
    assert r.status_code == 400 and r.json()["error"]["param"] == "optimizerWeightDecay", r.text


def test_unknown_job_404_and_other_account_403(srv):
    assert srv.http("GET", f"{JOBS}/nope").status_code == 404
    assert srv.http("POST", f"{JOBS}/nope:cancel").status_code == 404
    srv.assert_other_account_403()
    assert srv.http("GET", "/inference" + JOBS).status_code == 200
    # an inference-user key reads jobs, and may not create or stop one
    assert srv.http("GET", JOBS, key=srv.reader_key).status_code == 200
    body = {"dataset": "zebra", "baseModel": "tiny"}
    assert srv.http("POST", JOBS, key=srv.reader_key, json=body).status_code == 403
    assert srv.http("POST", f"{JOBS}/x:cancel", key=srv.reader_key).status_code == 403


def test_cancel_resume_and_list_paging(srv):
    fw = srv.sdk()
    slow = {"dataset": "zebra", "baseModel": "tiny", "epochs": 1000}
    for job_id in ("slow-a", "slow-b"):
        r = srv.http("POST", f"{JOBS}?supervisedFineTuningJobId={job_id}", json=slow)
        assert r.status_code == 200, r.text
    assert srv.http("POST", f"{JOBS}?supervisedFineTuningJobId=slow-a", json=slow).status_code == 409  # fmt: skip
    # a waiting job's datasets cannot be deleted (it failed when its turn came): until it ends
    srv.dataset("gone", rows())
    # the evaluation set a file of /v1/files (a dataset of its own, named by the file's id)
    form = {"file": ("eval.jsonl", rows())}
    upload = srv.http("POST", "/v1/files", data={"purpose": "fine-tune"}, files=form).json()
    gone = {"dataset": "gone", "evaluationDataset": upload["id"], "baseModel": "tiny"}
    assert srv.http("POST", f"{JOBS}?supervisedFineTuningJobId=gone", json=gone).status_code == 200
    deletes = [f"/v1/accounts/{ACCOUNT}/datasets/gone", f"/v1/files/{upload['id']}"]
    for path, what in zip(deletes, ("datasets/gone", f"File {upload['id']}"), strict=True):
        r = srv.http("DELETE", path)
        assert r.status_code == 400 and r.json()["error"]["code"] == "FAILED_PRECONDITION", r.text
        assert (
            f"{what} is the input of supervised fine-tuning job"
            f" accounts/{ACCOUNT}/supervisedFineTuningJobs/gone, which has not ended"
            " (JOB_STATE_PENDING): cancel the job or wait for it first"
        ) in r.json()["error"]["message"], r.text
    # nor changed: a file uploaded now would replace the rows the job was created for
    uploads = [
        srv.http("POST", f"{deletes[0]}:upload", files={"file": ("more.jsonl", rows())}),
        srv.http("POST", f"{deletes[0]}:getUploadEndpoint", json={"filenameToSize": {"a": 9}}),
    ]
    for r in uploads:
        assert r.status_code == 400 and r.json()["error"]["code"] == "FAILED_PRECONDITION", r.text
        assert "supervisedFineTuningJobs/gone, which has not ended" in r.text
    srv.wait("slow-a", ("JOB_STATE_RUNNING",))
    # one job at a time: the second waits
    assert fw.supervised_fine_tuning_jobs.get("slow-b").state == "JOB_STATE_PENDING"
    r = srv.http("POST", f"{JOBS}/slow-a:resume")
    assert r.status_code == 400 and "only a CANCELLED or FAILED" in r.json()["error"]["message"]
    cancelled = fw.supervised_fine_tuning_jobs.cancel("slow-a", body={})
    assert cancelled["state"] == "JOB_STATE_CANCELLED"
    srv.wait("slow-b", ("JOB_STATE_RUNNING",))  # the runner moved on: slow-a's child ended
    page = fw.supervised_fine_tuning_jobs.list(page_size=1)
    assert len(page.supervised_fine_tuning_jobs) == 1 and page.next_page_token
    names = [j.name.rsplit("/", 1)[1] for j in fw.supervised_fine_tuning_jobs.list(page_size=1)]
    assert {"slow-a", "slow-b"} <= set(names)
    r = srv.http("GET", JOBS, params={"filter": "((("})
    assert r.status_code == 400 and r.json()["error"]["param"] == "filter", r.text
    r = srv.http("GET", f"{JOBS}/slow-a", params={"readMask": "name,completedTime"})
    assert set(r.json()) == {"name", "completedTime"}, r.text
    assert srv.http("GET", f"{JOBS}/slow-a", params={"readMask": "nope"}).status_code == 400
    filtered = srv.http("GET", JOBS, params={"filter": 'state="JOB_STATE_CANCELLED"'}).json()
    assert [j["name"].rsplit("/", 1)[1] for j in filtered["supervisedFineTuningJobs"]] == ["slow-a"]
    fw.supervised_fine_tuning_jobs.delete("slow-b")  # cancels it first
    fw.supervised_fine_tuning_jobs.cancel("gone", body={})
    for path in deletes:
        assert srv.http("DELETE", path).status_code == 200, path
    names = [j.name.rsplit("/", 1)[1] for j in fw.supervised_fine_tuning_jobs.list()]
    assert "slow-a" in names and "slow-b" not in names

    resumed = fw.supervised_fine_tuning_jobs.resume("slow-a", body={})
    assert resumed.state == "JOB_STATE_PENDING"
    srv.wait("slow-a", ("JOB_STATE_RUNNING",))
    fw.supervised_fine_tuning_jobs.delete("slow-a")


def test_accounts_take_turns_and_waiting_jobs_are_capped(srv):
    """acme queues three jobs behind its running one, other one job after them: other's starts
    next (acme started one last), not after acme's whole queue. A fourth waiting job of acme is
    a 429 naming the cap, and so is a :resume that would make one."""
    slow = {"dataset": "zebra", "baseModel": "tiny", "epochs": 1000}

    def create(job_id: str, jobs: str = JOBS, key: str | None = None):
        return srv.http("POST", f"{jobs}?supervisedFineTuningJobId={job_id}", key, json=slow)

    assert create("turn-a1").status_code == 200
    srv.wait("turn-a1", ("JOB_STATE_RUNNING",))
    for job_id in ("turn-a2", "turn-a3"):
        assert create(job_id).status_code == 200
    srv.dataset("zebra", rows(), key=srv.other_key, account=OTHER)
    assert create("turn-b1", OTHER_JOBS, srv.other_key).status_code == 200, "other's own cap"
    assert create("turn-a4").status_code == 200  # acme's third waiting job: at the cap
    r = create("turn-a5")
    assert r.status_code == 429 and r.json()["error"]["code"] == "RESOURCE_EXHAUSTED", r.text
    assert f"--max-pending-finetune-jobs {PENDING_CAP}" in r.json()["error"]["message"], r.text
    assert srv.http("GET", f"{JOBS}/turn-a5").status_code == 404

    srv.http("POST", f"{JOBS}/turn-a1:cancel", json={})
    srv.wait("turn-b1", ("JOB_STATE_RUNNING",), jobs=OTHER_JOBS, key=srv.other_key)
    for job_id in ("turn-a2", "turn-a3", "turn-a4"):
        assert srv.http("GET", f"{JOBS}/{job_id}").json()["state"] == "JOB_STATE_PENDING"

    r = srv.http("POST", f"{JOBS}/turn-a1:resume", json={})  # a fourth waiting job
    assert r.status_code == 429 and "--max-pending-finetune-jobs" in r.text, r.text
    srv.http("POST", f"{JOBS}/turn-a4:cancel", json={})
    assert srv.http("POST", f"{JOBS}/turn-a1:resume", json={}).status_code == 200
    for job_id in ("turn-a1", "turn-a2", "turn-a3", "turn-a4"):  # the waiting ones first
        assert srv.http("DELETE", f"{JOBS}/{job_id}").status_code == 200
    assert srv.http("DELETE", f"{OTHER_JOBS}/turn-b1", srv.other_key).status_code == 200
