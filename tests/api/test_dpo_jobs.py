"""Fireworks' DPO jobs against a real `girandole serve` (a tiny Llama as its own model), with the
fireworks-ai SDK: a preference dataset uploaded, a job created and polled until COMPLETED, its
output model READY, loaded as a LoRA and, by the completions API's echoed log-probabilities,
preferring the chosen answer to the rejected one far more than the base model does; the 400s
of bad fields, rows and loss methods, 404, 403 for another account's key, cancel, resume,
delete and list."""

from __future__ import annotations

import json

import fireworks
import httpx
import openai
import pytest
from finetune_server import ACCOUNT, QUESTIONS, FinetuneServer, pairs

JOBS = f"/v1/accounts/{ACCOUNT}/dpoJobs"
TINY = f"accounts/{ACCOUNT}/models/tiny"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama_dir):
    s = FinetuneServer(tmp_path_factory.mktemp("dpo-api"), tiny_llama_dir, JOBS)
    s.dataset("prefs", pairs())
    s.dataset("two", pairs(QUESTIONS[:2]))
    s.dataset("sft-rows", b'{"messages": [{"role": "user", "content": "q"}]}\n')
    s.dataset("broken", pairs() + b'{"input": {"messages": []}, "preferred_output": []}\n')
    yield s
    s.api.stop_server(s.server)


def margin(client: openai.OpenAI, model: str, tiny_llama_dir, question: str) -> float:
    """logp(chosen) - logp(rejected) after the chat prompt, from the echoed log-probabilities of
    the tokens the trainer counts (the same rendering: girandole.finetune.preference)."""
    from girandole.finetune.preference import encode_pair
    from girandole.tokenizer.chat_template import chat_template_for
    from girandole.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    row = json.loads(pairs([question]))
    conversations = tuple([*[{**m, "weight": 0} for m in row["input"]["messages"]], *row[f]] for f in ("preferred_output", "non_preferred_output"))  # fmt: skip
    encoded = encode_pair(tok, chat_template_for(tok), conversations, 2048, "row")
    out = []
    for ex in (encoded.chosen, encoded.rejected):
        r = client.completions.create(model=model, prompt=ex.ids, echo=True, logprobs=1, max_tokens=0)  # fmt: skip
        logprobs = r.choices[0].logprobs.token_logprobs
        out.append(sum(lp for lp, trained in zip(logprobs, ex.trained) if trained))
    return out[0] - out[1]


def test_train_deploy_and_prefer_the_chosen_answer(srv, tiny_llama_dir):
    fw = srv.sdk()
    job = fw.dpo_jobs.create(
        dataset="prefs", dpo_job_id="pref-job", display_name="prefs",
        training_config={"base_model": TINY, "epochs": 4, "learning_rate": 5e-3, "batch_size_samples": 2},
        loss_config={"method": "DPO", "dpo": {"beta": 0.1}},
    )  # fmt: skip
    assert job.name == f"accounts/{ACCOUNT}/dpoJobs/pref-job"
    assert job.state in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert job.training_config.output_model == f"accounts/{ACCOUNT}/models/pref-job"
    assert job.training_config.lora_rank == 8 and job.loss_config.dpo.beta == 0.1
    assert job.dataset == f"accounts/{ACCOUNT}/datasets/prefs"
    done = srv.wait("pref-job", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED", done
    assert done["jobProgress"]["percent"] == 100 and done["jobProgress"]["rewardAccuracy"] == 1
    got = fw.dpo_jobs.get("pref-job")
    assert got.completed_time is not None and got.created_by and got.loss_config.method == "DPO"

    name = f"accounts/{ACCOUNT}/models/pref-job"
    model = srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/pref-job").json()
    assert model["state"] == "READY" and model["kind"] == "HF_PEFT_ADDON"
    assert model["peftDetails"]["baseModel"] == TINY
    loaded = fw.lora.load(model=name, deployment=f"accounts/{ACCOUNT}/deployments/tiny")
    client = openai.OpenAI(api_key=srv.key, base_url=srv.server.url + "/v1", max_retries=0)
    for question in ("hello", "a question never seen"):
        base = margin(client, TINY, tiny_llama_dir, question)
        tuned = margin(client, name, tiny_llama_dir, question)
        assert tuned > base + 20, (question, base, tuned)
    fw.lora.unload(loaded.name.rsplit("/", 1)[1])

    # the output model is taken; delete keeps the model
    body = {"dataset": "prefs", "trainingConfig": {"baseModel": "tiny", "outputModel": "pref-job"}}
    r = srv.http("POST", JOBS, json=body)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["param"] == "trainingConfig.outputModel"
    # every step's numbers, at a signed URL that needs no key
    url = fw.dpo_jobs.get_metrics_file_endpoint("pref-job").signed_url
    steps = [json.loads(line) for line in httpx.get(url, timeout=30).text.splitlines()]
    assert [m["step"] for m in steps] == list(range(1, 13)), steps
    assert steps[-1]["loss"] < steps[0]["loss"] and "rewardMargin" in steps[0]
    assert httpx.get(url.replace("signature=", "signature=0"), timeout=30).status_code == 403
    fw.dpo_jobs.delete("pref-job")
    with pytest.raises(fireworks.NotFoundError):
        fw.dpo_jobs.get("pref-job")
    assert httpx.get(url, timeout=30).status_code == 404
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/models/pref-job").status_code == 200


def with_training(**fields) -> dict:
    return {"dataset": "prefs", "trainingConfig": {"baseModel": "tiny", **fields}}


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"trainingConfig": {"baseModel": "tiny"}}, "dataset", "dataset is required"),
        ({"dataset": "prefs"}, "trainingConfig.baseModel", "exactly one of baseModel"),
        (with_training(warmStartFrom="x"), "trainingConfig.baseModel", "exactly one"),
        (with_training(epochs=0), "trainingConfig.epochs", "at least 1"),
        (with_training(loraRank=12), "trainingConfig.loraRank", "power of two"),
        (with_training(region="US_IOWA_1"), "trainingConfig.region", "regions"),
        (with_training(bogus=1), "trainingConfig.bogus", "bogus"),
        ({**with_training(), "wandbConfig": {"enabled": True}}, "wandbConfig", "Weights & Biases"),
        ({**with_training(), "useReservation": True}, "useReservation", "not supported"),
        ({**with_training(), "dataset": "nope"}, "dataset", "not found"),
        ({**with_training(), "dataset": "sft-rows"}, "dataset", "line 1: a row is an object"),
        ({**with_training(), "dataset": "broken"}, "dataset", "line 7: preferred_output must"),
        ({**with_training(), "dataset": "two"}, "dataset", "needs at least 3"),
        ({**with_training(), "lossConfig": {"method": "GRPO"}}, "lossConfig.method", "rollouts"),
        ({**with_training(), "lossConfig": {"method": "DAPO"}}, "lossConfig.method", "DAPO"),
        (
            {**with_training(), "lossConfig": {"method": "X"}},
            "lossConfig.method",
            "must be DPO or ORPO",
        ),
        (
            {**with_training(), "lossConfig": {"dpo": {"beta": 0.5}}},
            "lossConfig.dpo.beta",
            "less than 0.5",
        ),  # fmt: skip
        (
            {**with_training(), "lossConfig": {"klBeta": 0}},
            "lossConfig.klBeta",
            "more than 0",
        ),  # fmt: skip
        (
            {**with_training(), "lossConfig": {"klBeta": 0.2, "dpo": {"beta": 0.1}}},
            "lossConfig.klBeta",
            "disagree",
        ),  # fmt: skip
    ],
)
def test_bad_fields_are_400(srv, body, param, says):
    r = srv.http("POST", JOBS, json=body)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert says in error["message"] and (error.get("param") or "") == param, error


def test_an_orpo_job_trains(srv):
    body = {**with_training(batchSizeSamples=3), "lossConfig": {"method": "ORPO"}}
    r = srv.http("POST", f"{JOBS}?dpoJobId=orpo", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["lossConfig"] == {"method": "ORPO", "dpo": {"beta": 0.1}}
    done = srv.wait("orpo", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"))
    assert done["state"] == "JOB_STATE_COMPLETED", done
    assert done["jobProgress"]["step"] == 2 and "rewardAccuracy" in done["jobProgress"]
    # ORPO's loss carries the chosen output's cross-entropy: DPO's starts at log 2
    assert done["jobProgress"]["loss"] > 1, done
    srv.http("DELETE", f"{JOBS}/orpo")


def test_kl_beta_is_the_dpo_beta(srv):
    r = srv.http("POST", f"{JOBS}?dpoJobId=kl", json={**with_training(epochs=1000), "lossConfig": {"klBeta": 0.25}})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["lossConfig"] == {"method": "DPO", "dpo": {"beta": 0.25}}
    srv.http("DELETE", f"{JOBS}/kl")


def test_unknown_job_404_and_other_account_403(srv):
    assert srv.http("GET", f"{JOBS}/nope").status_code == 404
    assert srv.http("GET", f"{JOBS}/nope:getMetricsFileEndpoint").status_code == 404
    assert "DPO job" in srv.http("POST", f"{JOBS}/nope:cancel").json()["error"]["message"]
    srv.assert_other_account_403()
    assert srv.http("GET", "/inference" + JOBS).status_code == 200
    assert srv.http("POST", JOBS, key=srv.reader_key, json=with_training()).status_code == 403


def test_cancel_resume_list_and_delete(srv):
    fw = srv.sdk()
    slow = with_training(epochs=1000)
    assert srv.http("POST", f"{JOBS}?dpoJobId=slow", json=slow).status_code == 200
    assert srv.http("POST", f"{JOBS}?dpoJobId=slow", json=slow).status_code == 409
    running = srv.wait("slow", ("JOB_STATE_RUNNING",))
    assert running["trainingConfig"]["epochs"] == 1000
    # its dataset cannot be deleted while it runs, nor that of a job waiting behind it
    r = srv.http("DELETE", f"/v1/accounts/{ACCOUNT}/datasets/prefs")
    assert r.status_code == 400 and r.json()["error"]["code"] == "FAILED_PRECONDITION", r.text
    assert f"the input of DPO job accounts/{ACCOUNT}/dpoJobs/slow" in r.json()["error"]["message"]
    srv.dataset("waiting", pairs())
    waits = {**with_training(), "dataset": "waiting"}
    r = srv.http("POST", f"{JOBS}?dpoJobId=waits", json=waits)
    assert r.status_code == 200, r.text
    r = srv.http("DELETE", f"/v1/accounts/{ACCOUNT}/datasets/waiting")
    assert r.status_code == 400, r.text
    assert (
        f"accounts/{ACCOUNT}/dpoJobs/waits, which has not ended (JOB_STATE_PENDING)"
        in r.json()["error"]["message"]
    )
    fw.dpo_jobs.delete("waits")  # cancelled: its dataset may go
    assert srv.http("DELETE", f"/v1/accounts/{ACCOUNT}/datasets/waiting").status_code == 200
    cancelled = fw.dpo_jobs.cancel("slow", body={})
    assert cancelled["state"] == "JOB_STATE_CANCELLED"
    page = fw.dpo_jobs.list(page_size=1)
    assert [j.name.rsplit("/", 1)[1] for j in page.dpo_jobs] == ["slow"]
    filtered = srv.http("GET", JOBS, params={"filter": 'state="JOB_STATE_RUNNING"'}).json()
    assert filtered["dpoJobs"] == []
    # the SFT jobs' list holds no DPO job
    sft = srv.http("GET", f"/v1/accounts/{ACCOUNT}/supervisedFineTuningJobs").json()
    assert sft.get("supervisedFineTuningJobs", []) == []
    # an SFT job may have the same id: another collection (and work folder)
    sft_rows = (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    srv.dataset("sft-ok", sft_rows)
    r = srv.http("POST", f"/v1/accounts/{ACCOUNT}/supervisedFineTuningJobs?supervisedFineTuningJobId=slow", json={"dataset": "sft-ok", "baseModel": "tiny", "outputModel": "slow-sft"})  # fmt: skip
    assert r.status_code == 200, r.text
    done = srv.wait("slow", ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"), jobs=f"/v1/accounts/{ACCOUNT}/supervisedFineTuningJobs")  # fmt: skip
    assert done["state"] == "JOB_STATE_COMPLETED", done
    assert fw.dpo_jobs.get("slow").state == "JOB_STATE_CANCELLED"
    resumed = fw.dpo_jobs.resume("slow", body={})
    assert resumed.state == "JOB_STATE_PENDING"
    srv.wait("slow", ("JOB_STATE_RUNNING",))
    fw.dpo_jobs.delete("slow")  # cancels it first
    assert srv.http("GET", f"{JOBS}/slow").status_code == 404
