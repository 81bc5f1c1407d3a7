"""Fireworks' model upload over REST against one real `girandole serve` (a tiny random Llama as
account `acme`'s own model), with the fireworks-ai SDK's `client.models` as a Fireworks user
calls it: create a model (UPLOADING), PUT its files to the signed URLs of
`:getUploadEndpoint` (httpx, as to a bucket), `:validateUpload` (READY), then deploy it: a LoRA
adapter as a DeployedModel on the server's own deployment, a base model as a deployment of its
own; each answers a completion. And every refusal on the way, in Fireworks' error shape."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import fireworks
import httpx
import pytest
from api_helpers import api_conftest

from girandole.registry.keystore import DB_NAME, Database

ACCOUNT, OTHER = "acme", "other"
KEY = "upload-key"
OWN_MODEL = f"accounts/{ACCOUNT}/models/tiny"
OWN_DEPLOYMENT = f"accounts/{ACCOUNT}/deployments/tiny"
MODELS = f"/v1/accounts/{ACCOUNT}/models"


def write_adapter(folder: Path, seed: int = 3) -> Path:
    """A PEFT LoRA adapter of the tiny Llama (hidden 64, 4 heads of 16, 2 KV heads, 2 layers)
    on q_proj and v_proj, with large random weights: its greedy text is not the base's."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    rank, gen = 4, torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for target, out in (("q_proj", 64), ("v_proj", 32)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 64, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 4 * rank,
              "target_modules": ["q_proj", "v_proj"], "bias": "none"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


class UploadServer:
    def __init__(self, tmp: Path) -> None:
        self.api = api_conftest()
        data = tmp / "data"
        db = Database(data / DB_NAME)
        self.other_key, _ = db.create_key(OTHER)
        self.reader_key, _ = db.create_key(ACCOUNT, "reader", role="inference-user")
        db.close()
        self.tiny = self.api.write_tiny_llama_for_ops(tmp / "tiny")
        self.adapter = write_adapter(tmp / "adapter")
        self.data = data
        self.server = self.api.start_server(
            tmp, "--model", str(self.tiny), "--model-id", "tiny", "--account", ACCOUNT,
            "--kv-cache-gb", "0.02", "--max-model-len", "256", "--api-key", KEY,
            "--data-dir", str(data), api_key=KEY,
        )  # fmt: skip
        self.client = httpx.Client(timeout=60)

    def sdk(self, key: str = KEY) -> fireworks.Fireworks:
        return fireworks.Fireworks(
            api_key=key, account_id=ACCOUNT, base_url=self.server.url, max_retries=0
        )

    def http(self, method: str, path: str, key: str = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return self.client.request(method, self.server.url + path, headers=headers, **kw)

    def ok(self, method: str, path: str, key: str = KEY, **kw) -> dict:
        r = self.http(method, path, key, **kw)
        assert r.status_code == 200, (method, path, r.text)
        return r.json()

    def upload(self, model_id: str, folder: Path, names: list[str] | None = None) -> None:
        """PUT the files of `folder` (or only `names`) to the model's signed URLs."""
        files = {p.name: p for p in folder.iterdir() if p.is_file()}
        sizes = {n: str(files[n].stat().st_size) for n in names or sorted(files)}
        urls = self.sdk().models.get_upload_endpoint(model_id, filename_to_size=sizes)
        for name, url in urls.filename_to_signed_urls.items():
            assert url.startswith(self.server.url + MODELS + f"/{model_id}/files/{name}?")
            r = self.client.put(url, content=files[name].read_bytes())  # no key: as a bucket's
            assert r.status_code == 200, r.text

    def complete(self, model: str) -> str:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 8,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        return self.ok("POST", "/v1/completions", json=body)["choices"][0]["text"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = UploadServer(tmp_path_factory.mktemp("model-upload"))
    try:
        yield s
    finally:
        s.client.close()
        s.api.stop_server(s.server)


def error_of(r: httpx.Response, status: int, *words: str) -> dict:
    """Fireworks' error body of `r`, a `status` whose message names each of `words`."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    for word in words:
        assert word in error["message"], (word, error)
    return error


def test_a_lora_adapter_uploaded_runs_on_the_servers_own_deployment(srv):
    fw = srv.sdk()
    created = fw.models.create(
        model_id="my-lora",
        model={"kind": "HF_PEFT_ADDON", "display_name": "My LoRA",
               "peft_details": {"base_model": OWN_MODEL, "r": 4,
                                "target_modules": ["q_proj", "v_proj"]}},
    )  # fmt: skip
    assert (created.name, created.state, created.kind) == (
        f"{MODELS[4:]}/my-lora",
        "UPLOADING",
        "HF_PEFT_ADDON",
    )
    assert created.display_name == "My LoRA" and created.peft_details.base_model == OWN_MODEL
    adapter = created.name
    load = {"model": adapter, "deployment": OWN_DEPLOYMENT}
    r = srv.http("POST", f"/v1/accounts/{ACCOUNT}/deployedModels", json=load)
    error_of(r, 400, adapter, "UPLOADING")  # nothing loads it before it is validated

    srv.upload("my-lora", srv.adapter)
    assert fw.models.get("my-lora").state == "UPLOADING"
    fw.models.validate_upload("my-lora")
    assert fw.models.get("my-lora").state == "READY"
    assert (srv.data / "model-uploads" / ACCOUNT / "my-lora" / "adapter_config.json").is_file()
    urls = fw.models.get_download_endpoint("my-lora").filename_to_signed_urls
    assert sorted(urls) == ["adapter_config.json", "adapter_model.safetensors"]
    config = srv.client.get(urls["adapter_config.json"])  # no key, as from a bucket
    assert config.content == (srv.adapter / "adapter_config.json").read_bytes()
    error_of(srv.http("GET", f"{MODELS}/tiny:getDownloadEndpoint"), 400, "not uploaded")

    deployed = srv.ok("POST", f"/v1/accounts/{ACCOUNT}/deployedModels", json=load)
    assert deployed["state"] == "DEPLOYED"
    assert srv.complete(adapter) != srv.complete(OWN_MODEL)  # beside the base, its own text
    r = srv.http("DELETE", f"{MODELS}/my-lora")
    error_of(r, 400, "in use", deployed["name"])
    srv.ok("DELETE", f"/v1/accounts/{ACCOUNT}/deployedModels/{deployed['name'].rsplit('/')[-1]}")
    fw.models.delete("my-lora")
    assert not (srv.data / "model-uploads" / ACCOUNT / "my-lora").exists()
    assert srv.http("GET", f"{MODELS}/my-lora").status_code == 404


def test_a_base_model_uploaded_is_deployed_and_answers(srv):
    fw = srv.sdk()
    fw.models.create(model_id="up-base", model={"kind": "HF_BASE_MODEL", "description": "d"})
    name = f"{MODELS[4:]}/up-base"
    deploy = {"baseModel": name, "minReplicaCount": 0, "maxReplicaCount": 1}
    deployments = f"/v1/accounts/{ACCOUNT}/deployments"
    r = srv.http("POST", deployments, params={"deploymentId": "up-dep"}, json=deploy)
    error_of(r, 400, name, "UPLOADING")

    srv.upload("up-base", srv.tiny, ["config.json"])  # no weights yet
    r = srv.http("GET", f"{MODELS}/up-base:validateUpload")
    error_of(r, 400, "*.safetensors")
    assert fw.models.get("up-base").state == "UPLOADING"  # more files may come
    srv.upload("up-base", srv.tiny, [p.name for p in srv.tiny.iterdir() if p.name != "config.json"])
    fw.models.validate_upload("up-base")
    listed = {m.name: m for m in fw.models.list()}
    assert listed[name].state == "READY" and listed[name].description == "d"
    # READY: its files are fixed
    r = srv.http("POST", f"{MODELS}/up-base:getUploadEndpoint",
                 json={"filenameToSize": {"config.json": "3"}})  # fmt: skip
    error_of(r, 400, "READY")

    srv.ok("POST", deployments, params={"deploymentId": "up-dep"}, json=deploy)
    deadline = time.monotonic() + 120
    while (d := srv.ok("GET", f"{deployments}/up-dep"))["replicaCount"] < 1:
        assert d["state"] != "FAILED" and time.monotonic() < deadline, d
        time.sleep(0.1)
    assert srv.complete(f"{deployments[4:]}/up-dep")  # its own engine, on the uploaded files
    error_of(srv.http("DELETE", f"{MODELS}/up-base"), 400, "in use", "deployments/up-dep")
    srv.ok("DELETE", f"{deployments}/up-dep", params={"hard": "true"})
    fw.models.delete("up-base")


def test_create_refusals(srv):
    def create(body: dict, key: str = KEY) -> httpx.Response:
        return srv.http("POST", MODELS, key, json=body)

    base = {"kind": "HF_BASE_MODEL"}
    error = error_of(create({"modelId": "Bad_Id", "model": base}), 400, "modelId")
    assert error["param"] == "modelId"
    error_of(create({"modelId": "x", "model": {"kind": "FLUMINA_BASE_MODEL"}}), 400, "kind")
    error_of(create({"modelId": "x", "model": {"kind": "HF_PEFT_ADDON"}}), 400, "baseModel")
    error_of(create({"modelId": "x", "model": {"unknown": 1}}), 400, "unknown")
    for unreachable in (f"accounts/{OTHER}/models/theirs", "accounts/fireworks/models/none"):
        peft = {"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": unreachable}}
        error_of(create({"modelId": "x", "model": peft}), 400, "baseModel", unreachable)
    peft = {"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": OWN_MODEL}}
    assert create({"modelId": "an-adapter", "model": peft}).status_code == 200
    on_adapter = {"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": "an-adapter"}}
    error_of(create({"modelId": "x", "model": on_adapter}), 400, "itself a LoRA adapter")
    for taken in ("an-adapter", "tiny"):  # an uploaded model's name, the server's own
        error = error_of(create({"modelId": taken, "model": base}), 409, "already exists")
        assert error["code"] == "ALREADY_EXISTS"
    error_of(create({"modelId": "x", "model": base}, srv.other_key), 403, OTHER)
    error_of(create({"modelId": "x", "model": base}, srv.reader_key), 403, "inference-user")
    assert srv.http("GET", f"{MODELS}/x").status_code == 404  # none of them made it
    srv.ok("DELETE", f"{MODELS}/an-adapter")


def test_upload_refusals(srv):
    fw = srv.sdk()
    fw.models.create(model_id="half", model={"kind": "HF_PEFT_ADDON",
                                             "peft_details": {"base_model": OWN_MODEL}})  # fmt: skip
    endpoint = f"{MODELS}/half:getUploadEndpoint"
    for bad in ("sub/adapter_config.json", "..", "a\\b"):
        r = srv.http("POST", endpoint, json={"filenameToSize": {bad: "3"}})
        error_of(r, 400, "not a valid file name")
    error_of(srv.http("POST", endpoint, json={"filenameToSize": {}}), 400, "filenameToSize")
    error_of(srv.http("POST", endpoint, srv.other_key, json={"filenameToSize": {"a": "1"}}),
             403, OTHER)  # fmt: skip

    config = (srv.adapter / "adapter_config.json").read_bytes()
    url = fw.models.get_upload_endpoint(
        "half", filename_to_size={"adapter_config.json": str(len(config))}
    ).filename_to_signed_urls["adapter_config.json"]
    error_of(srv.client.put(url, content=config + b" "), 400, "declared as")
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    for tampered in ({"signature": "0" * 64}, {"expires": str(int(query["expires"]) - 7200)},
                     {"size": str(len(config) + 1)}):  # fmt: skip
        bad = urlunsplit(parts._replace(query=urlencode({**query, **tampered})))
        error = error_of(srv.client.put(bad, content=config), 403, "signature")
        assert error["code"] == "PERMISSION_DENIED"
    assert srv.client.put(url, content=config).status_code == 200

    # the weights are missing: a 400 naming them, and the model stays UPLOADING
    error_of(srv.http("GET", f"{MODELS}/half:validateUpload", srv.reader_key), 403, "role")
    error_of(srv.http("POST", f"{MODELS}/half:validateUpload"), 400, "adapter_model.safetensors")
    assert fw.models.get("half").state == "UPLOADING"
    assert [m.state for m in fw.models.list() if m.name.endswith("/half")] == ["UPLOADING"]
    srv.ok("DELETE", f"{MODELS}/half")
    error_of(srv.client.put(url, content=config), 404, "half")  # its URL dies with it


def test_update_and_delete(srv):
    fw = srv.sdk()
    fw.models.create(model_id="named", model={"kind": "HF_BASE_MODEL"})
    updated = fw.models.update("named", display_name="Named", description="about it")
    assert (updated.display_name, updated.description) == ("Named", "about it")
    assert fw.models.get("named").display_name == "Named"
    error_of(srv.http("PATCH", f"{MODELS}/named", json={"kind": "HF_PEFT_ADDON"}), 400, "kind")
    error_of(srv.http("PATCH", f"{MODELS}/named", json={"displayName": "x" * 64}), 400,
             "displayName")  # fmt: skip
    for key, word in ((srv.reader_key, "inference-user"), (srv.other_key, OTHER)):
        error_of(srv.http("PATCH", f"{MODELS}/named", key, json={"displayName": "y"}), 403, word)
        error_of(srv.http("DELETE", f"{MODELS}/named", key), 403, word)
    assert srv.ok("GET", f"{MODELS}/named", srv.reader_key)["displayName"] == "Named"
    error_of(srv.http("PATCH", f"{MODELS}/tiny", json={"displayName": "y"}), 400, "built in")
    error_of(srv.http("DELETE", f"{MODELS}/tiny"), 400, "built in")
    fw.models.delete("named")
    error_of(srv.http("DELETE", f"{MODELS}/named"), 404, "named")


def test_prepare_builds_the_packed_cache_a_first_replica_would(srv, tmp_path):
    """`client.models.prepare` (deploy/prepare.py): an uploaded base model big enough for a
    packed-model cache entry gets it in the background, before any deployment loads it; a
    precision is a 400 (every model runs in its own weights'), an UPLOADING model a
    FAILED_PRECONDITION, an inference-user a 403, another account's key a 403."""
    from girandole.model import loader

    big = srv.api.write_tiny_llama_for_ops(  # the tiny one widened past CACHE_MIN_BYTES
        tmp_path / "big", hidden_size=256, intermediate_size=4096, num_hidden_layers=4
    )
    fw = srv.sdk()
    fw.models.create(model_id="big", model={"kind": "HF_BASE_MODEL"})
    prepare = f"{MODELS}/big:prepare"
    error_of(srv.http("POST", prepare, json={}), 400, "UPLOADING")
    srv.upload("big", big)
    fw.models.validate_upload("big")
    folder = srv.data / "model-uploads" / ACCOUNT / "big"
    assert loader._source_bytes(folder) >= loader.CACHE_MIN_BYTES
    cache_file = loader._cache_path(folder)  # where the server's load would map it from
    assert not cache_file.exists()

    error_of(srv.http("POST", prepare, json={"precision": "FP8"}), 400, "precision", "FP8")
    error_of(srv.http("POST", prepare, srv.reader_key, json={}), 403, "inference-user")
    error_of(srv.http("POST", prepare, srv.other_key, json={}), 403, OTHER)
    error_of(srv.http("POST", f"{MODELS}/none:prepare", json={}), 404, "none")
    assert not cache_file.exists()
    assert fw.models.prepare("big") == {}
    assert fw.models.prepare("big", precision="PRECISION_UNSPECIFIED") == {}  # joins the first
    deadline = time.monotonic() + 120
    while not cache_file.exists():
        assert time.monotonic() < deadline, "no packed cache entry after :prepare"
        time.sleep(0.2)
    assert fw.models.prepare("tiny") == {}  # the server's own model: too small to need one
    fw.models.delete("big")
    cache_file.unlink()  # 50 MB the cache would keep for a week
