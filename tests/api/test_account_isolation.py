"""One account's key never sees or touches another account's things, over the whole HTTP surface
in one table, against one real `girandole serve` (a tiny random Llama as account A's own model)
with keys of two accounts.

Account A (`testing`, the server's `--api-key`) makes one object of each kind: a file, an OpenAI
batch (and its output file), a Fireworks dataset and batch inference job (and its output
dataset), an Anthropic message batch, a stored response, a conversation with an item, a
deployment (at zero replicas) and a LoRA DeployedModel on it, and a user with an API key.
Account B (`other`, a key of the keys database) has a deployment of its own model, so that its
inference requests can name A's objects, and a dataset, which its id under A's account name must
not reach. Then B asks for each of A's objects and models by every route that reads, changes,
deletes, cancels or runs it (`CASES`: one line a route), and gets exactly what it gets for an id
that does not exist (the same status, code and message), a 404 (a 400 naming the field where the
id is in the body) or, for control-plane paths under A's account, a 403 PERMISSION_DENIED; a
request that names no model does not run on A's (the server's own); B's lists, /metrics and
/health name none of A's objects; B's batches do not run A's model; and A's objects are
unchanged afterwards.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import api_conftest

from girandole.registry.keystore import DB_NAME, Database
from girandole.registry.models import ModelCatalog

A, B = "testing", "other"
MODEL_A = f"accounts/{A}/models/tiny"  # the server's own model
BASE_A = f"accounts/{A}/models/tiny-a"  # a catalog model of A: its deployment's
LORA_A = f"accounts/{A}/models/tiny-lora"  # a LoRA adapter of BASE_A
MODEL_B = f"accounts/{B}/models/tiny-b"
KEY_A = "isolation-key-a"
DEPLOYMENT_A, DEPLOYMENT_B = "a-dep", "b-dep"
DATASET_A, JOB_A = "a-data", "a-job"
DATASET_B = "b-data"
PLACEHOLDER = re.compile(r"\{(\w+)\}")
REQUEST_ID = re.compile(r'"request_id":\s*"[^"]*"')  # each answer's own


@dataclass
class World:
    """The server, B's key, and A's objects (A's key is KEY_A)."""

    server: Any
    key_b: str
    ids: dict[str, str] = field(default_factory=dict)  # placeholder -> A's id or name
    b_response: str = ""  # a stored response of B's own
    key_b_id: str = ""
    before: dict[str, Any] = field(default_factory=dict)  # OWN_VIEWS as A read them first
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    def http(self, method: str, path: str, key: str = KEY_A, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return self.client.request(method, self.server.url + path, headers=headers, **kw)

    def ok(self, method: str, path: str, key: str = KEY_A, **kw) -> Any:
        r = self.http(method, path, key, **kw)
        assert r.status_code == 200, (method, path, r.text)
        return r.json()

    def until(self, path: str, done, timeout: float = 60, key: str = KEY_A) -> Any:
        deadline = time.monotonic() + timeout
        while not done(body := self.ok("GET", path, key)):
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        return body


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def write_stub_adapter(folder: Path) -> Path:
    """A LoRA adapter folder as the registry checks it. It is only ever loaded on a deployment at
    zero replicas, which reads no weights: only its DeployedModel record exists."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def make_objects(w: World) -> None:
    """Account A's objects (each finished, so that nothing changes them but a request), and B's
    deployment and a stored response of its own."""
    ids = w.ids
    ids.update(
        model=MODEL_A, own_deployment=f"accounts/{A}/deployments/tiny", lora=LORA_A,
        base_model=BASE_A, shape="tiny-a-fast",  # a built-in shape of BASE_A's
    )  # fmt: skip
    line = {"prompt": "hi", "max_tokens": 1, "model": MODEL_A}
    request = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": line}
    upload = w.ok(
        "POST", "/v1/files", files={"file": ("in.jsonl", jsonl([request]))},
        data={"purpose": "batch"},
    )  # fmt: skip
    ids["file"] = upload["id"]
    batch = {
        "input_file_id": ids["file"],
        "endpoint": "/v1/completions",
        "completion_window": "24h",
    }
    ids["batch"] = w.ok("POST", "/v1/batches", json=batch)["id"]

    datasets = f"/v1/accounts/{A}/datasets"
    w.ok("POST", datasets, json={"datasetId": DATASET_A, "dataset": {"displayName": "mine"}})
    form = {"file": ("in.jsonl", jsonl([{"custom_id": "a", "body": line}]))}
    w.ok("POST", f"{datasets}/{DATASET_A}:upload", files=form)
    ids["dataset"] = DATASET_A
    job = {"model": MODEL_A, "inputDatasetId": DATASET_A}
    w.ok("POST", f"/v1/accounts/{A}/batchInferenceJobs", params={"batchInferenceJobId": JOB_A},
         json=job)  # fmt: skip
    ids["job"] = JOB_A

    params = {"model": MODEL_A, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    requests = [{"custom_id": "m", "params": params}]
    ids["msgbatch"] = w.ok("POST", "/v1/messages/batches", json={"requests": requests})["id"]

    turn = {"model": MODEL_A, "input": "hi", "max_output_tokens": 1}
    ids["response"] = w.ok("POST", "/v1/responses", json=turn)["id"]
    items = [{"type": "message", "role": "user", "content": "hello"}]
    conv = w.ok("POST", "/v1/conversations", json={"items": items, "metadata": {"k": "v"}})
    ids["conversation"] = conv["id"]
    ids["item"] = w.ok("GET", f"/v1/conversations/{conv['id']}/items")["data"][0]["id"]

    w.ok(
        "POST", f"/v1/accounts/{A}/deployments",
        params={"deploymentId": DEPLOYMENT_A, "disableAutoDeploy": "true"},
        json={"baseModel": BASE_A, "minReplicaCount": 0},
    )  # fmt: skip
    ids["deployment"] = DEPLOYMENT_A
    adapter = {"model": LORA_A, "deployment": f"accounts/{A}/deployments/{DEPLOYMENT_A}"}
    lora = w.ok("POST", f"/v1/accounts/{A}/deployedModels", json=adapter)
    ids["deployed_model"] = lora["name"].rsplit("/", 1)[-1]

    # every batch ended, its results written
    batch = w.until(f"/v1/batches/{ids['batch']}", lambda b: b["status"] == "completed")
    ids["output_file"] = batch["output_file_id"]
    job = w.until(
        f"/v1/accounts/{A}/batchInferenceJobs/{JOB_A}",
        lambda j: j["state"] == "JOB_STATE_COMPLETED",
    )
    ids["output_dataset"] = job["outputDatasetId"].rsplit("/", 1)[-1]
    # the batch inference jobs the OpenAI batch and the message batch are
    ids["batch_job"] = ids["batch"].replace("_", "-", 1)
    ids["msgbatch_job"] = ids["msgbatch"].replace("_", "-", 1)
    w.until(f"/v1/messages/batches/{ids['msgbatch']}", lambda b: b["processing_status"] == "ended")

    # a user of A and its key (A's key, the --api-key, is A's admin)
    ids["user"] = "isolated-user"
    w.ok("POST", f"/v1/accounts/{A}/users", params={"userId": ids["user"]}, json={"role": "user"})
    made = w.ok("POST", f"/v1/accounts/{A}/users/{ids['user']}/apiKeys", json={"apiKey": {}})
    ids["user_key"] = made["keyId"]

    # a secret of A's (its value is never answered, to anyone)
    ids["secret"] = "a-token"
    secret = {"name": ids["secret"], "keyName": "A_TOKEN", "value": "a-secret-value"}
    w.ok("POST", f"/v1/accounts/{A}/secrets", json=secret)

    # B's own, for its lists and its requests that name A's objects
    w.ok(
        "POST", f"/v1/accounts/{B}/deployments", w.key_b, params={"deploymentId": DEPLOYMENT_B},
        json={"baseModel": MODEL_B},
    )  # fmt: skip
    w.until(
        f"/v1/accounts/{B}/deployments/{DEPLOYMENT_B}",
        lambda d: d["state"] == "READY" and d["replicaCount"] == 1,
        key=w.key_b,
    )
    dataset_b = {"datasetId": DATASET_B, "dataset": {}}
    w.ok("POST", f"/v1/accounts/{B}/datasets", w.key_b, json=dataset_b)
    turn = {"model": MODEL_B, "input": "hi", "max_output_tokens": 1}
    w.b_response = w.ok("POST", "/v1/responses", w.key_b, json=turn)["id"]


# What A reads of each of its objects, before and after B's tries.
OWN_VIEWS = (
    "/v1/files/{file}",
    "/v1/files/{file}/content",
    "/v1/files/{output_file}/content",
    "/v1/batches/{batch}",
    "/v1/messages/batches/{msgbatch}",
    "/v1/messages/batches/{msgbatch}/results",
    "/v1/responses/{response}",
    "/v1/responses/{response}/input_items",
    "/v1/conversations/{conversation}",
    "/v1/conversations/{conversation}/items",
    "/v1/accounts/{A}/datasets/{dataset}",
    "/v1/accounts/{A}/datasets/{output_dataset}",
    "/v1/accounts/{A}/batchInferenceJobs/{job}",
    "/v1/accounts/{A}/batchInferenceJobs/{batch_job}",
    "/v1/accounts/{A}/batchInferenceJobs/{msgbatch_job}",
    "/v1/accounts/{A}/datasets/{file}",
    "/v1/accounts/{A}/deployments/{deployment}",
    "/v1/accounts/{A}/deployedModels/{deployed_model}",
    "/v1/models/" + MODEL_A,
    "/v1/accounts/{A}/users/{user}",
    "/v1/accounts/{A}/users/{user}/apiKeys",
    "/v1/accounts/{A}/secrets/{secret}",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    conftest = api_conftest()
    tmp = tmp_path_factory.mktemp("isolation")
    data = tmp / "data"
    tiny = conftest.write_tiny_llama_for_ops(tmp / "tiny")
    db = Database(data / DB_NAME)
    key_b, info_b = db.create_key(B)
    catalog = ModelCatalog(db, [])
    catalog.add(BASE_A, str(tiny))
    catalog.add(LORA_A, str(write_stub_adapter(tmp / "lora")), base=BASE_A)
    catalog.add(MODEL_B, str(tiny))
    db.close()
    server = conftest.start_server(
        tmp, "--model", str(tiny), "--model-id", "tiny", "--account", A, "--api-key", KEY_A,
        "--chat-template", "chatml", "--kv-cache-gb", "0.02", "--data-dir", str(data),
        api_key=KEY_A,
    )  # fmt: skip
    w = World(server, key_b)
    w.key_b_id = info_b.id
    try:
        make_objects(w)
        w.before = {path: view(w, path) for path in OWN_VIEWS}
        yield w
    finally:
        w.client.close()
        conftest.stop_server(server)


def fill(template: str, ids: dict[str, str]) -> str:
    """`template` with each `{name}` of `ids` (and `{A}`, `{B}`: the accounts) filled in."""
    values = {"A": A, "B": B, **ids}
    return PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), template)


def fake(value: str) -> str:
    """An id or name of the same shape as `value` that names nothing."""
    if re.fullmatch(r"[0-9a-f]{4}", value[-4:]):  # a random hex id
        return value[:-4] + "0000"
    return value + "-gone"


def view(w: World, template: str) -> Any:
    r = w.http("GET", fill(template, w.ids))
    assert r.status_code == 200, (template, r.text)
    return r.json() if "json" in r.headers["content-type"] else r.text


# (method, path, body): B's request for one of A's objects; {name} is A's id of that name
# (World.ids), {A} and {B} the accounts. `*` before the method: a control-plane path under A's
# account, a 403 PERMISSION_DENIED; every other one gets the 404 (or the 400 naming the field)
# of an id that does not exist.
FORM = "<a multipart form with one file>"  # the body of :upload
CHAT = [{"role": "user", "content": "x"}]
# fmt: off
CASES: list[tuple[str, str, Any]] = [
    # OpenAI files and batches
    ("GET", "/v1/files/{file}", None),
    ("GET", "/v1/files/{file}/content", None),
    ("DELETE", "/v1/files/{file}", None),
    ("GET", "/v1/files/{output_file}", None),
    ("GET", "/v1/files/{output_file}/content", None),
    ("DELETE", "/v1/files/{output_file}", None),
    ("GET", "/v1/files?after={file}", None),
    ("POST", "/v1/batches", {"input_file_id": "{file}", "endpoint": "/v1/completions",
                             "completion_window": "24h"}),
    ("GET", "/v1/batches/{batch}", None),
    ("POST", "/v1/batches/{batch}/cancel", None),
    ("GET", "/v1/batches?after={batch}", None),
    ("GET", "/inference/v1/batches/{batch}", None),
    # Anthropic message batches
    ("GET", "/v1/messages/batches/{msgbatch}", None),
    ("POST", "/v1/messages/batches/{msgbatch}/cancel", None),
    ("GET", "/v1/messages/batches/{msgbatch}/results", None),
    ("DELETE", "/v1/messages/batches/{msgbatch}", None),
    ("GET", "/v1/messages/batches?after_id={msgbatch}", None),
    ("GET", "/v1/messages/batches?before_id={msgbatch}", None),
    # stored responses
    ("GET", "/v1/responses/{response}", None),
    ("GET", "/v1/responses/{response}?stream=true", None),
    ("GET", "/v1/responses/{response}/input_items", None),
    ("POST", "/v1/responses/{response}/cancel", None),
    ("DELETE", "/v1/responses/{response}", None),
    ("GET", "/v1/responses?after={response}", None),
    ("GET", "/v1/responses?before={response}", None),
    ("POST", "/v1/responses", {"model": MODEL_B, "input": "x", "max_output_tokens": 1,
                               "previous_response_id": "{response}"}),
    ("POST", "/v1/responses/input_tokens", {"model": MODEL_B, "input": "x",
                                            "previous_response_id": "{response}"}),
    # conversations
    ("GET", "/v1/conversations/{conversation}", None),
    ("POST", "/v1/conversations/{conversation}", {"metadata": {"k": "changed"}}),
    ("DELETE", "/v1/conversations/{conversation}", None),
    ("GET", "/v1/conversations/{conversation}/items", None),
    ("POST", "/v1/conversations/{conversation}/items",
     {"items": [{"type": "message", "role": "user", "content": "injected"}]}),
    ("GET", "/v1/conversations/{conversation}/items/{item}", None),
    ("DELETE", "/v1/conversations/{conversation}/items/{item}", None),
    ("POST", "/v1/responses", {"model": MODEL_B, "input": "x", "max_output_tokens": 1,
                               "conversation": "{conversation}"}),
    # A's models and deployments by name: to describe, run, count tokens with
    ("GET", "/v1/models/{model}", None),
    ("GET", "/v1/models/{own_deployment}", None),
    ("GET", "/v1/models/accounts/{A}/deployments/{deployment}", None),
    ("GET", "/v1/models/{lora}", None),
    ("POST", "/v1/completions", {"model": "{model}", "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/completions", {"model": "{own_deployment}", "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/completions", {"model": MODEL_B + "#{own_deployment}", "prompt": "x",
                                 "max_tokens": 1}),
    ("POST", "/v1/completions", {"model": "accounts/{A}/deployments/{deployment}",
                                 "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/completions", {"model": "{lora}", "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/completions", {"model": "{lora}#accounts/{B}/deployments/" + DEPLOYMENT_B,
                                 "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "{model}", "max_tokens": 1, "messages": CHAT}),
    ("POST", "/v1/embeddings", {"model": "{model}", "input": "x"}),
    ("POST", "/v1/messages", {"model": "{model}", "max_tokens": 1, "messages": CHAT}),
    ("POST", "/v1/messages/count_tokens", {"model": "{model}", "messages": CHAT}),
    ("POST", "/v1/responses", {"model": "{model}", "input": "x", "max_output_tokens": 1}),
    ("POST", "/v1/responses/input_tokens", {"model": "{model}", "input": "x"}),
    ("POST", "/v1/tokenize", {"model": "{model}", "prompt": "x"}),
    ("POST", "/v1/detokenize", {"model": "{model}", "tokens": [1]}),
    ("POST", "/v1/rerank", {"model": "{model}", "query": "x", "documents": ["y"]}),
    ("POST", "/v2/rerank", {"model": "{model}", "query": "x", "documents": ["y"]}),
    # ... and A's model as the one a request that names none runs on: the server's own
    ("POST", "/tokenize", {"prompt": "x"}),
    ("POST", "/v1/tokenize", {"messages": CHAT}),
    ("POST", "/detokenize", {"tokens": [1]}),
    ("POST", "/inference/v1/detokenize", {"tokens": [1]}),
    ("POST", "/v1/rerank", {"query": "x", "documents": ["y"]}),
    ("POST", "/v2/rerank", {"query": "x", "documents": ["y"]}),
    ("POST", "/v1/responses/input_tokens", {"input": "x"}),
    # the control plane under A's account: 403
    ("*GET", "/v1/accounts/{A}/deployments", None),
    ("*POST", "/v1/accounts/{A}/deployments?deploymentId=x", {"baseModel": "{base_model}"}),
    ("*GET", "/v1/accounts/{A}/deployments/{deployment}", None),
    ("*PATCH", "/v1/accounts/{A}/deployments/{deployment}", {"displayName": "changed"}),
    ("*PATCH", "/v1/accounts/{A}/deployments/{deployment}:scale", {"replicaCount": 1}),
    ("*DELETE", "/v1/accounts/{A}/deployments/{deployment}", None),
    ("*POST", "/v1/accounts/{A}/deployments/{deployment}:undelete", None),
    ("*GET", "/v1/accounts/{A}/models", None),
    ("*GET", "/v1/accounts/{A}/models/tiny-a", None),
    ("*POST", "/v1/accounts/{A}/models", {"modelId": "x", "model": {"kind": "HF_BASE_MODEL"}}),
    ("*PATCH", "/v1/accounts/{A}/models/tiny-a", {"displayName": "changed"}),
    ("*DELETE", "/v1/accounts/{A}/models/tiny-lora", None),
    ("*POST", "/v1/accounts/{A}/models/tiny-a:getUploadEndpoint",
     {"filenameToSize": {"config.json": 3}}),
    ("*GET", "/v1/accounts/{A}/models/tiny-a:validateUpload", None),
    ("*POST", "/inference/v1/accounts/{A}/models/tiny-a:validateUpload", None),
    ("*GET", "/v1/accounts/{A}/models/tiny-a:getDownloadEndpoint", None),
    ("*GET", "/v1/accounts/{A}/metrics", None),
    ("*GET", "/v1/accounts/{A}/datasets", None),
    ("*POST", "/v1/accounts/{A}/datasets", {"datasetId": "x", "dataset": {}}),
    ("*GET", "/v1/accounts/{A}/datasets/{dataset}", None),
    ("*PATCH", "/v1/accounts/{A}/datasets/{dataset}", {"displayName": "changed"}),
    ("*DELETE", "/v1/accounts/{A}/datasets/{dataset}", None),
    ("*POST", "/v1/accounts/{A}/datasets/{dataset}:upload", FORM),
    ("*POST", "/v1/accounts/{A}/datasets/{dataset}:getUploadEndpoint",
     {"filenameToSize": {"x.jsonl": 3}}),
    ("*POST", "/v1/accounts/{A}/datasets/{dataset}:validateUpload", None),
    ("*GET", "/v1/accounts/{A}/datasets/{output_dataset}:getDownloadEndpoint", None),
    ("*GET", "/v1/accounts/{A}/batchInferenceJobs", None),
    ("*POST", "/v1/accounts/{A}/batchInferenceJobs",
     {"model": "{model}", "inputDatasetId": "{dataset}"}),
    ("*GET", "/v1/accounts/{A}/batchInferenceJobs/{job}", None),
    ("*GET", "/v1/accounts/{A}/batchInferenceJobs/{batch_job}", None),
    ("*GET", "/v1/accounts/{A}/datasets/{file}", None),
    ("*DELETE", "/v1/accounts/{A}/batchInferenceJobs/{job}", None),
    ("*POST", "/v1/accounts/{A}/batchInferenceJobs/{job}:cancel", None),
    ("*GET", "/v1/accounts/{A}/supervisedFineTuningJobs", None),
    ("*POST", "/v1/accounts/{A}/supervisedFineTuningJobs",
     {"dataset": "{dataset}", "baseModel": "{model}"}),
    ("*GET", "/v1/accounts/{A}/supervisedFineTuningJobs/x", None),
    ("*DELETE", "/v1/accounts/{A}/supervisedFineTuningJobs/x", None),
    ("*POST", "/v1/accounts/{A}/supervisedFineTuningJobs/x:cancel", None),
    ("*POST", "/inference/v1/accounts/{A}/supervisedFineTuningJobs/x:resume", None),
    ("*GET", "/v1/accounts/{A}/dpoJobs", None),
    ("*POST", "/v1/accounts/{A}/dpoJobs",
     {"dataset": "{dataset}", "trainingConfig": {"baseModel": "{model}"}}),
    ("*GET", "/v1/accounts/{A}/dpoJobs/x", None),
    ("*DELETE", "/v1/accounts/{A}/dpoJobs/x", None),
    ("*POST", "/v1/accounts/{A}/dpoJobs/x:cancel", None),
    ("*POST", "/inference/v1/accounts/{A}/dpoJobs/x:resume", None),
    ("*GET", "/v1/accounts/{A}/dpoJobs/x:getMetricsFileEndpoint", None),
    ("*GET", "/v1/accounts/{A}/reinforcementFineTuningJobs", None),
    ("*POST", "/v1/accounts/{A}/reinforcementFineTuningJobs",
     {"dataset": "{dataset}", "evaluator": "e", "trainingConfig": {"baseModel": "{model}"}}),
    ("*GET", "/v1/accounts/{A}/reinforcementFineTuningJobs/x", None),
    ("*DELETE", "/v1/accounts/{A}/reinforcementFineTuningJobs/x", None),
    ("*POST", "/v1/accounts/{A}/reinforcementFineTuningJobs/x:cancel", None),
    ("*POST", "/inference/v1/accounts/{A}/reinforcementFineTuningJobs/x:resume", None),
    ("*GET", "/v1/accounts/{A}/rlorTrainerJobs", None),
    ("*POST", "/v1/accounts/{A}/rlorTrainerJobs",
     {"keepAlive": True, "trainingConfig": {"baseModel": "{model}"}}),
    ("*GET", "/v1/accounts/{A}/rlorTrainerJobs/x", None),
    ("*DELETE", "/v1/accounts/{A}/rlorTrainerJobs/x", None),
    ("*POST", "/v1/accounts/{A}/rlorTrainerJobs/x:cancel", None),
    ("*POST", "/inference/v1/accounts/{A}/rlorTrainerJobs/x:resume", None),
    ("*POST", "/v1/accounts/{A}/rlorTrainerJobs/x:executeTrainStep",
     {"dataset": "{dataset}", "outputModel": "x"}),
    ("*GET", "/v1/accounts/{A}/deployedModels", None),
    ("*POST", "/v1/accounts/{A}/deployedModels",
     {"model": "{lora}", "deployment": "accounts/{A}/deployments/{deployment}"}),
    ("*GET", "/v1/accounts/{A}/deployedModels/{deployed_model}", None),
    ("*PATCH", "/v1/accounts/{A}/deployedModels/{deployed_model}", {"displayName": "changed"}),
    ("*DELETE", "/v1/accounts/{A}/deployedModels/{deployed_model}", None),
    ("*GET", "/inference/v1/accounts/{A}/deployments/{deployment}", None),
    ("*GET", "/v1/accounts/{A}/deploymentShapes", None),
    ("*GET", "/v1/accounts/{A}/deploymentShapes/{shape}", None),
    ("*GET", "/v1/accounts/{A}/deploymentShapes/{shape}/versions", None),
    ("*GET", "/inference/v1/accounts/{A}/deploymentShapes/{shape}/versions/1", None),
    ("*POST", "/v1/accounts/{A}/deploymentShapeVersions:match",
     {"createDeploymentRequest": {"parent": "accounts/{A}",
                                  "deployment": {"baseModel": "{base_model}"}}}),
    # A's ids under B's own account: 404 (or the 400 naming the field)
    ("GET", "/v1/accounts/{B}/deployments/{deployment}", None),
    ("PATCH", "/v1/accounts/{B}/deployments/{deployment}", {"displayName": "changed"}),
    ("PATCH", "/v1/accounts/{B}/deployments/{deployment}:scale", {"replicaCount": 1}),
    ("DELETE", "/v1/accounts/{B}/deployments/{deployment}", None),
    ("POST", "/v1/accounts/{B}/deployments/{deployment}:undelete", None),
    ("POST", "/v1/accounts/{B}/deployments?validateOnly=true", {"baseModel": "{base_model}"}),
    ("PATCH", "/v1/accounts/{B}/deployments/" + DEPLOYMENT_B, {"baseModel": "{base_model}"}),
    ("POST", "/v1/accounts/{B}/deployments?validateOnly=true", {"baseModel": "{lora}"}),
    ("POST", "/v1/accounts/{B}/deployments?validateOnly=true",
     {"baseModel": MODEL_B, "deploymentShape": "accounts/{A}/deploymentShapes/{shape}"}),
    ("POST", "/v1/accounts/{B}/deployments?validateOnly=true",
     {"baseModel": MODEL_B, "deploymentShape": "{shape}"}),
    ("GET", "/v1/accounts/{B}/deploymentShapes/{shape}", None),
    ("GET", "/v1/accounts/{B}/deploymentShapes/{shape}/versions/1", None),
    ("GET", "/v1/accounts/{B}/deploymentShapes?targetModel={base_model}", None),
    ("POST", "/v1/accounts/{B}/deploymentShapeVersions:match",
     {"createDeploymentRequest": {"parent": "accounts/{B}",
                                  "deployment": {"baseModel": "{base_model}"}}}),
    ("GET", "/v1/accounts/{B}/models/tiny-a", None),
    ("PATCH", "/v1/accounts/{B}/models/tiny-a", {"displayName": "changed"}),
    ("DELETE", "/v1/accounts/{B}/models/tiny-a", None),
    ("POST", "/v1/accounts/{B}/models/tiny-a:getUploadEndpoint",
     {"filenameToSize": {"config.json": 3}}),
    ("GET", "/v1/accounts/{B}/models/tiny-a:validateUpload", None),
    ("GET", "/v1/accounts/{B}/models/tiny-a:getDownloadEndpoint", None),
    ("POST", "/v1/accounts/{B}/models",
     {"modelId": "b-lora", "model": {"kind": "HF_PEFT_ADDON",
                                     "peftDetails": {"baseModel": "{base_model}"}}}),
    ("GET", "/v1/accounts/{B}/datasets/{dataset}", None),
    ("PATCH", "/v1/accounts/{B}/datasets/{dataset}", {"displayName": "changed"}),
    ("DELETE", "/v1/accounts/{B}/datasets/{dataset}", None),
    ("POST", "/v1/accounts/{B}/datasets/{dataset}:upload", FORM),
    ("POST", "/v1/accounts/{B}/datasets/{dataset}:getUploadEndpoint",
     {"filenameToSize": {"x.jsonl": 3}}),
    ("POST", "/v1/accounts/{B}/datasets/{dataset}:validateUpload", None),
    ("GET", "/v1/accounts/{B}/datasets/{output_dataset}:getDownloadEndpoint", None),
    ("POST", "/v1/accounts/{B}/datasets",
     {"datasetId": "copy", "dataset": {}, "sourceDatasetId": "accounts/{A}/datasets/{dataset}"}),
    # ... B's own dataset's id, and A's job as a source, under A's name: a 400, never B's own
    ("POST", "/v1/accounts/{B}/datasets",
     {"datasetId": "copy", "dataset": {}, "sourceDatasetId": "accounts/{A}/datasets/" + DATASET_B}),
    ("POST", "/v1/accounts/{B}/datasets",
     {"datasetId": "from-job",
      "dataset": {"sourceJobName": "accounts/{A}/batchInferenceJobs/{job}"}}),
    ("GET", "/v1/accounts/{B}/batchInferenceJobs/{job}", None),
    ("GET", "/v1/accounts/{B}/batchInferenceJobs/{batch_job}", None),
    ("DELETE", "/v1/accounts/{B}/batchInferenceJobs/{batch_job}", None),
    ("POST", "/v1/accounts/{B}/batchInferenceJobs/{msgbatch_job}:cancel", None),
    ("GET", "/v1/accounts/{B}/datasets/{file}", None),
    ("DELETE", "/v1/accounts/{B}/datasets/{file}", None),
    ("GET", "/v1/accounts/{B}/datasets/{msgbatch_job}-input:getDownloadEndpoint", None),
    ("DELETE", "/v1/accounts/{B}/batchInferenceJobs/{job}", None),
    ("POST", "/v1/accounts/{B}/batchInferenceJobs/{job}:cancel", None),
    ("POST", "/v1/accounts/{B}/batchInferenceJobs",
     {"model": MODEL_B, "inputDatasetId": "{dataset}"}),
    ("POST", "/v1/accounts/{B}/batchInferenceJobs",
     {"model": MODEL_B, "inputDatasetId": "accounts/{A}/datasets/{dataset}"}),
    ("POST", "/v1/accounts/{B}/batchInferenceJobs", {"model": "{model}", "inputDatasetId": "x"}),
    ("GET", "/v1/accounts/{B}/deployedModels/{deployed_model}", None),
    ("PATCH", "/v1/accounts/{B}/deployedModels/{deployed_model}", {"displayName": "changed"}),
    ("DELETE", "/v1/accounts/{B}/deployedModels/{deployed_model}", None),
    ("POST", "/v1/accounts/{B}/deployedModels",
     {"model": "{lora}", "deployment": "accounts/{B}/deployments/" + DEPLOYMENT_B}),
    ("POST", "/v1/accounts/{B}/deployedModels",
     {"model": "{lora}", "deployment": "accounts/{A}/deployments/{deployment}"}),
    # secrets: A's under A's account (403), and named under B's (404, or a 400 naming `name`)
    ("*GET", "/v1/accounts/{A}/secrets", None),
    ("*POST", "/v1/accounts/{A}/secrets", {"name": "x", "keyName": "X", "value": "v"}),
    ("*GET", "/v1/accounts/{A}/secrets/{secret}", None),
    ("*PATCH", "/v1/accounts/{A}/secrets/{secret}", {"keyName": "CHANGED", "value": "v"}),
    ("*DELETE", "/v1/accounts/{A}/secrets/{secret}", None),
    ("GET", "/v1/accounts/{B}/secrets/{secret}", None),
    ("PATCH", "/v1/accounts/{B}/secrets/{secret}", {"keyName": "CHANGED", "value": "v"}),
    ("DELETE", "/v1/accounts/{B}/secrets/{secret}", None),
    ("POST", "/v1/accounts/{B}/secrets",
     {"name": "accounts/{A}/secrets/{secret}", "keyName": "B_TOKEN", "value": "v"}),
    # users and their API keys
    ("*POST", "/v1/accounts/{A}/users?userId=x", {"role": "user"}),
    ("*GET", "/v1/accounts/{A}/users", None),
    ("*GET", "/v1/accounts/{A}/users/{user}", None),
    ("*PATCH", "/v1/accounts/{A}/users/{user}", {"role": "admin"}),
    ("*DELETE", "/v1/accounts/{A}/users/{user}", None),
    ("*DELETE", "/inference/v1/accounts/{A}/users/{user}", None),
    ("*POST", "/v1/accounts/{A}/users/{user}/apiKeys", {"apiKey": {}}),
    ("*GET", "/v1/accounts/{A}/users/{user}/apiKeys", None),
    ("*GET", "/inference/v1/accounts/{A}/users/{user}/apiKeys", None),
    ("*POST", "/v1/accounts/{A}/users/{user}/apiKeys:delete", {"keyId": "{user_key}"}),
    ("GET", "/v1/accounts/{B}/users/{user}", None),
    # the account itself
    ("*GET", "/v1/accounts/{A}", None),
    ("*GET", "/inference/v1/accounts/{A}?readMask=name", None),
]
# fmt: on


def filled(value: Any, ids: dict[str, str]) -> Any:
    """`value` (a path or body) with the placeholders filled from `ids`."""
    return json.loads(fill(json.dumps(value), ids)) if value is not None else None


def send(
    w: World, key: str, method: str, path: str, body: Any, ids: dict[str, str]
) -> httpx.Response:
    """One case's request with `key`, its placeholders filled from `ids`."""
    if body == FORM:
        return w.http(method, fill(path, ids), key, files={"file": ("x.jsonl", b"{}\n")})
    return w.http(method, fill(path, ids), key, json=filled(body, ids))


@pytest.mark.parametrize("method, path, body", CASES, ids=[f"{m} {p}" for m, p, _ in CASES])
def test_another_accounts_key_finds_nothing(world, method, path, body):
    """B's answer for A's ids is, but for the ids it names, its answer for ids of nothing."""
    w = world
    denied = method.startswith("*")
    method = method.lstrip("*")
    used = [name for name in w.ids if "{" + name + "}" in path + json.dumps(body)]
    ghosts = {name: fake(value) for name, value in w.ids.items()}
    got = send(w, w.key_b, method, path, body, w.ids)
    absent = send(w, w.key_b, method, path, body, ghosts)  # for ids that do not exist
    if denied:
        assert got.status_code == 403, got.text
        assert got.json()["error"]["code"] == "PERMISSION_DENIED"
    else:
        assert got.status_code in (400, 404), got.text
    assert absent.status_code == got.status_code, (got.text, absent.text)
    seen = got.text
    for name in used:
        seen = seen.replace(w.ids[name], ghosts[name])
    assert REQUEST_ID.sub("", seen) == REQUEST_ID.sub("", absent.text)
    if method == "GET":  # the owner's key reads it: the route did find A's object
        own = send(w, KEY_A, method, path, body, w.ids)
        assert (own.status_code, own.text) != (got.status_code, got.text)


LISTS = (
    "/v1/files",
    "/v1/batches",
    "/v1/messages/batches",
    "/v1/responses",
    "/v1/models",
    "/inference/v1/models",
    "/v1/accounts/fireworks/models",
    "/v1/accounts/{B}/models",
    "/v1/accounts/{B}/deploymentShapes",
    "/v1/accounts/fireworks/deploymentShapes",
    "/v1/accounts/{B}/deployments?showDeleted=true",
    "/v1/accounts/{B}/datasets",
    "/v1/accounts/{B}/batchInferenceJobs",
    "/v1/accounts/{B}/deployedModels",
    "/v1/accounts/{B}/users",
    "/v1/accounts/{B}/secrets",
    "/v1/accounts",
)


@pytest.mark.parametrize("path", LISTS)
def test_another_accounts_lists_name_nothing_of_its(world, path):
    r = world.http("GET", fill(path, world.ids), world.key_b)
    assert r.status_code == 200, r.text
    for name, value in world.ids.items():
        assert value not in r.text, (name, r.text)
    assert f"accounts/{A}/" not in r.text
    if path == "/v1/responses":  # B's own, not A's
        assert [x["id"] for x in r.json()["data"]] == [world.b_response]


@pytest.mark.parametrize("path", ["/metrics", "/health"])
def test_unauthenticated_reports_name_no_stored_object(world, path):
    r = httpx.get(world.server.url + path, timeout=30)
    assert r.status_code == 200
    for name in ("file", "output_file", "batch", "batch_job", "msgbatch", "msgbatch_job",
                 "response", "conversation", "item", "dataset", "output_dataset", "job",
                 "deployed_model"):  # fmt: skip
        assert world.ids[name] not in r.text, name
    assert world.b_response not in r.text


def test_a_dataset_names_the_key_that_made_it(world):
    mine = world.ok("GET", f"/v1/accounts/{A}/datasets/{DATASET_A}")
    theirs = world.ok("GET", f"/v1/accounts/{B}/datasets/{DATASET_B}", world.key_b)
    assert (mine["createdBy"], theirs["createdBy"]) == ("static-0", world.key_b_id)


def test_another_accounts_batches_do_not_run_its_model(world):
    """A batch runs its lines with its key: B's lines naming A's model are refused as they are
    when B sends them itself (an OpenAI batch when it is created, a message batch's line as an
    errored result), as lines naming a model that does not exist."""
    w = world
    answers = []
    for model in (MODEL_A, fake(MODEL_A)):
        body = {"model": model, "prompt": "x", "max_tokens": 1}
        line = {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": body}
        form = {"file": ("in.jsonl", jsonl([line]))}
        upload = w.ok("POST", "/v1/files", w.key_b, files=form, data={"purpose": "batch"})
        batch = {"input_file_id": upload["id"], "endpoint": "/v1/completions",
                 "completion_window": "24h"}  # fmt: skip
        r = w.http("POST", "/v1/batches", w.key_b, json=batch)
        answers.append((r.status_code, REQUEST_ID.sub("", r.text)))
        w.ok("DELETE", f"/v1/files/{upload['id']}", w.key_b)
    assert answers[0][0] == 404 and answers[0] == answers[1], answers

    results = []
    for model in (MODEL_A, fake(MODEL_A)):
        params = {"model": model, "max_tokens": 1, "messages": CHAT}
        requests = [{"custom_id": "b", "params": params}]
        made = w.ok("POST", "/v1/messages/batches", w.key_b, json={"requests": requests})
        path = f"/v1/messages/batches/{made['id']}"
        w.until(path, lambda b: b["processing_status"] == "ended", key=w.key_b)
        r = w.http("GET", path + "/results", w.key_b)
        assert r.status_code == 200, r.text
        results.append(json.loads(r.text)["result"])
    assert results[0]["type"] == "errored", results
    assert results[0]["error"]["error"]["type"] == "not_found_error"
    assert REQUEST_ID.sub("", json.dumps(results[0])) == REQUEST_ID.sub("", json.dumps(results[1]))


def test_another_account_may_use_the_same_ids(world):
    """Ids that the caller chooses are each account's own: B creating a dataset, a job or a
    deployment of an id that A has is no conflict (a 409 would say that A has one)."""
    w = world
    datasets = f"/v1/accounts/{B}/datasets"
    w.ok("POST", datasets, w.key_b, json={"datasetId": DATASET_A, "dataset": {}})
    form = {"file": ("in.jsonl", jsonl([{"custom_id": "b", "body": {"prompt": "x"}}]))}
    w.ok("POST", f"{datasets}/{DATASET_A}:upload", w.key_b, files=form)
    job = {"model": MODEL_B, "inputDatasetId": DATASET_A, "inferenceParameters": {"maxTokens": 1}}
    jobs = f"/v1/accounts/{B}/batchInferenceJobs"
    w.ok("POST", jobs, w.key_b, params={"batchInferenceJobId": JOB_A}, json=job)
    w.until(f"{jobs}/{JOB_A}", lambda j: j["state"] == "JOB_STATE_COMPLETED", key=w.key_b)
    w.ok("DELETE", f"{jobs}/{JOB_A}", w.key_b)
    w.ok("DELETE", f"{datasets}/{DATASET_A}", w.key_b)
    w.ok("DELETE", f"{datasets}/{JOB_A}-output", w.key_b)
    w.ok(
        "POST", f"/v1/accounts/{B}/deployments", w.key_b,
        params={"deploymentId": DEPLOYMENT_A, "validateOnly": "true"}, json={"baseModel": MODEL_B},
    )  # fmt: skip


def test_its_objects_are_unchanged(world):
    """After every case above: A reads each of its objects as before."""
    for path in OWN_VIEWS:
        assert view(world, path) == world.before[path], path
