"""LoRA addons against a real `girandole serve` (a tiny Llama as its own model): adapters added
with `girandole models add --base`, loaded with the fireworks-ai SDK's `client.lora` and the
`girandole lora` CLI, addressed by name with the openai client (with and without
`#deployment`), listed in /v1/models, refused with a 4xx when they do not fit, and merged into
a deployment created from one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import fireworks
import httpx
import openai
import pytest
from lora_helpers import write_peft_adapter

from girandole.registry.keystore import Database

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "acme"
OWN = f"accounts/{ACCOUNT}/deployments/tiny"


def _api_conftest():
    """tests/api/conftest.py (start_server, stop_server), under a name of its own."""
    spec = importlib.util.spec_from_file_location(
        "_girandole_api_conftest", ROOT / "tests/api/conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def girandole(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "girandole.cli", *args],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=120,
    )


def model(name: str) -> str:
    return f"accounts/{ACCOUNT}/models/{name}"


class LoraServer:
    def __init__(self, tmp: Path, tiny_llama_dir: Path, adapters: dict[str, Path]) -> None:
        import transformers as tf

        self.api = _api_conftest()
        self.data = tmp / "data"
        db = Database.in_folder(self.data)
        self.key, _ = db.create_key(ACCOUNT)
        db.close()
        # an adapter of another architecture (shapes that do not fit the tiny Llama)
        qwen = tf.Qwen3ForCausalLM(
            tf.Qwen3Config(
                vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            )
        )  # fmt: skip
        write_peft_adapter(qwen, tmp / "qwen-adapter")
        for name, source, base in (
            ("lora-a", adapters["a1"], "tiny"),
            ("lora-b", adapters["a2"], "tiny"),
            ("lora-qwen", tmp / "qwen-adapter", "tiny"),
            ("lora-other", adapters["a3"], "other-base"),
        ):
            added = girandole(
                "models", "add", "--data-dir", str(self.data), "--account", ACCOUNT,
                name, str(source), "--base", model(base),
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            assert "LoRA adapter of" in added.stdout
        self.server = self.api.start_server(
            tmp, "--model", str(tiny_llama_dir), "--model-id", "tiny", "--account", ACCOUNT,
            "--kv-cache-gb", "0.02", "--data-dir", str(self.data), "--max-loras", "2",
            api_key=self.key,
        )  # fmt: skip
        self.env = {"GIRANDOLE_BASE_URL": self.server.url, "GIRANDOLE_API_KEY": self.key}

    def sdk(self) -> fireworks.Fireworks:
        return fireworks.Fireworks(
            api_key=self.key, account_id=ACCOUNT, base_url=self.server.url, max_retries=0
        )

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(api_key=self.key, base_url=self.server.url + "/v1", max_retries=0)

    def complete(self, name: str, prompt: str = "Once upon a time") -> str:
        out = self.openai().completions.create(
            model=name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        return out.choices[0].text

    def http(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.request(method, self.server.url + path, headers=headers, timeout=60, **kw)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "girandole.cli", *args, "--account", ACCOUNT],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=120,
        )


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama_dir, llama_adapters):
    s = LoraServer(tmp_path_factory.mktemp("lora-api"), tiny_llama_dir, llama_adapters)
    yield s
    s.api.stop_server(s.server)


def test_sdk_load_list_get_update_unload(srv):
    fw = srv.sdk()
    base = srv.complete(model("tiny"))
    loaded = fw.lora.load(model=model("lora-a"), deployment=OWN)
    assert loaded.model == model("lora-a") and loaded.deployment == OWN
    assert loaded.state == "DEPLOYED" and loaded.default is True
    assert loaded.name.startswith(f"accounts/{ACCOUNT}/deployedModels/lora-a-")
    dm_id = loaded.name.rsplit("/", 1)[1]

    assert [d.name for d in fw.lora.list()] == [loaded.name]
    got = fw.lora.get(dm_id)
    assert got.model == model("lora-a") and got.state == "DEPLOYED"
    updated = fw.lora.update(dm_id, display_name="my adapter", description="test")
    assert updated.display_name == "my adapter" and updated.description == "test"
    assert fw.lora.get(dm_id).display_name == "my adapter"

    # the openai client addresses the adapter by name, with or without the deployment
    with_adapter = srv.complete(model("lora-a"))
    assert with_adapter != base
    assert srv.complete(f"{model('lora-a')}#{OWN}") == with_adapter
    assert srv.complete(model("tiny")) == base  # the base model is unchanged beside it

    listed = {m["id"]: m for m in srv.http("GET", "/v1/models").json()["data"]}
    assert model("lora-a") in listed and f"{model('lora-a')}#{OWN}" in listed
    # each listed id is also one the openai client can retrieve, the same entry
    for name in (model("lora-a"), f"{model('lora-a')}#{OWN}"):
        assert srv.openai().models.retrieve(name).id == name
        got = srv.http("GET", "/v1/models/" + name.replace("#", "%23"))
        assert got.json() == listed[name]

    assert fw.lora.unload(dm_id) == {}
    assert list(fw.lora.list()) == []
    gone = srv.http(
        "POST", "/v1/completions", json={"model": model("lora-a"), "prompt": "hi", "max_tokens": 2}
    )
    assert gone.status_code == 404, gone.text
    with pytest.raises(fireworks.NotFoundError):
        fw.lora.get(dm_id)


def test_adapters_side_by_side_and_chat(srv):
    fw = srv.sdk()
    a = fw.lora.load(model=model("lora-a"), deployment=OWN)
    b = fw.lora.load(model=model("lora-b"), deployment="tiny")
    try:
        outs = {name: srv.complete(model(name)) for name in ("lora-a", "lora-b", "tiny")}
        assert len(set(outs.values())) == 3
        chat = srv.openai().chat.completions.create(
            model=model("lora-b"),
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            temperature=0,
        )
        assert chat.model == model("lora-b") and chat.choices[0].message.content is not None
    finally:
        fw.lora.unload(a.name.rsplit("/", 1)[1])
        fw.lora.unload(b.name.rsplit("/", 1)[1])


def test_adapters_that_do_not_fit_are_400(srv):
    def load(body: dict) -> httpx.Response:
        return srv.http("POST", f"/v1/accounts/{ACCOUNT}/deployedModels", json=body)

    r = load({"model": model("lora-qwen"), "deployment": OWN})
    assert r.status_code == 400 and "trained for another base model" in r.json()["error"]["message"]
    r = load({"model": model("lora-other"), "deployment": OWN})
    assert r.status_code == 400 and "is for base model" in r.json()["error"]["message"]
    r = load({"model": model("tiny"), "deployment": OWN})
    assert r.status_code == 400 and "not a LoRA adapter" in r.json()["error"]["message"]
    r = load({"model": model("nope"), "deployment": OWN})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = load({"model": model("lora-a"), "deployment": f"accounts/{ACCOUNT}/deployments/nope"})
    assert r.status_code == 404
    r = load({"model": model("lora-a")})
    assert r.status_code == 400 and "deployment is required" in r.json()["error"]["message"]
    r = load({"model": model("lora-a"), "deployment": OWN, "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]
    assert srv.http("GET", f"/v1/accounts/{ACCOUNT}/deployedModels").json()["deployedModels"] == []
    r = srv.http(
        "POST", "/v1/completions", json={"model": model("lora-b"), "prompt": "hi", "max_tokens": 2}
    )
    assert r.status_code == 404  # in the registry, loaded nowhere


def test_concurrent_loads_of_one_adapter_store_one_record(srv):
    """Six loads of the same adapter on the same deployment at once: one 200, five 409s."""
    import asyncio

    async def loads() -> list[httpx.Response]:
        url = srv.server.url + f"/v1/accounts/{ACCOUNT}/deployedModels"
        body = {"model": model("lora-b"), "deployment": OWN}
        headers = {"Authorization": f"Bearer {srv.key}"}
        async with httpx.AsyncClient(headers=headers, timeout=60) as client:
            return await asyncio.gather(*(client.post(url, json=body) for _ in range(6)))

    codes = sorted(r.status_code for r in asyncio.run(loads()))
    assert codes == [200, 409, 409, 409, 409, 409], codes
    records = srv.http("GET", f"/v1/accounts/{ACCOUNT}/deployedModels").json()["deployedModels"]
    assert [r["model"] for r in records] == [model("lora-b")]
    srv.sdk().lora.unload(records[0]["name"].rsplit("/", 1)[1])


def test_cli_load_list_unload(srv):
    loaded = srv.cli("lora", "load", "lora-b", "--deployment", "tiny")
    assert loaded.returncode == 0, loaded.stderr
    assert model("lora-b") in loaded.stdout and "DEPLOYED" in loaded.stdout
    again = srv.cli("lora", "load", "lora-b", "--deployment", "tiny")
    assert again.returncode == 1 and "already loaded" in again.stderr
    listed = srv.cli("lora", "list")
    assert listed.returncode == 0 and model("lora-b") in listed.stdout
    assert srv.complete(model("lora-b")) != srv.complete(model("tiny"))
    unloaded = srv.cli("lora", "unload", "lora-b")
    assert unloaded.returncode == 0, unloaded.stderr
    assert srv.cli("lora", "list").stdout.strip() == ""
    missing = srv.cli("lora", "unload", "lora-b")
    assert missing.returncode == 1 and "not loaded" in missing.stderr


def test_cli_reads_names_as_the_server_does(srv):
    """`girandole lora` turned `<a>/<m>` into accounts/<a>/models/<a>/<m> (not found), dropped
    the account of `--deployment <a>/<d>` (loading on --account's deployment <d> instead), and
    put a `get` id into the URL as it came (`get ''` was a KeyError traceback, `a?b` a query)."""
    loaded = srv.cli("lora", "load", f"{ACCOUNT}/lora-b", "--deployment", f"{ACCOUNT}/tiny")
    assert loaded.returncode == 0, loaded.stderr
    assert model("lora-b") in loaded.stdout and OWN in loaded.stdout
    try:
        other = srv.cli("lora", "load", "lora-a", "--deployment", "other/tiny")
        assert other.returncode == 1 and "accounts/other/deployments/tiny" in other.stderr
        for bad in ("", "a?b"):
            got = srv.cli("lora", "get", bad)
            assert got.returncode == 1 and "not a DeployedModel id" in got.stderr, got.stderr
        bad = srv.cli("lora", "load", "lora b", "--deployment", "tiny")
        assert bad.returncode == 1 and "not a model name" in bad.stderr
    finally:
        unloaded = srv.cli("lora", "unload", f"{ACCOUNT}/lora-b")
        assert unloaded.returncode == 0, unloaded.stderr
    assert srv.cli("lora", "list").stdout.strip() == ""


def test_deployment_of_an_adapter_merges_it(srv):
    fw = srv.sdk()
    created = fw.deployments.create(base_model=model("lora-a"), deployment_id="merged")
    assert created.base_model == model("lora-a")
    deadline = time.monotonic() + 120
    while fw.deployments.get("merged").state != "READY":
        assert fw.deployments.get("merged").state != "FAILED"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    merged = srv.complete(f"{model('lora-a')}#accounts/{ACCOUNT}/deployments/merged")
    assert merged == srv.complete(model("lora-a"))  # by name: its one deployment
    assert merged != srv.complete(model("tiny"))
    fw.deployments.delete("merged", hard=True)


def test_a_deleted_deployment_takes_its_adapters_along(srv):
    """A DeployedModel on a deleted deployment served nothing but still won: a soft-deleted
    default sent the adapter's bare name to a 404 though another deployment held it, and
    /v1/models listed it; after a hard delete its record stayed, so a new deployment of the
    same id ran the adapter without anyone loading it there (on any base model)."""
    fw = srv.sdk()
    side = f"accounts/{ACCOUNT}/deployments/side"

    def wait_ready() -> None:
        deadline = time.monotonic() + 120
        while fw.deployments.get("side").state != "READY":
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def status(name: str) -> int:
        body = {"model": name, "prompt": "hi", "max_tokens": 2}
        return srv.http("POST", "/v1/completions", json=body).status_code

    fw.deployments.create(base_model=model("tiny"), deployment_id="side")
    wait_ready()
    on_side = fw.lora.load(model=model("lora-a"), deployment=side)
    on_own = fw.lora.load(model=model("lora-a"), deployment=OWN)
    assert on_side.default and not on_own.default
    side_id, own_id = on_side.name.rsplit("/", 1)[1], on_own.name.rsplit("/", 1)[1]
    try:
        fw.deployments.delete("side")
        assert srv.complete(model("lora-a")) == srv.complete(f"{model('lora-a')}#{OWN}")
        assert status(f"{model('lora-a')}#{side}") == 404
        listed = [m["id"] for m in srv.http("GET", "/v1/models").json()["data"]]
        assert f"{model('lora-a')}#{side}" not in listed and model("lora-a") in listed
        # the deleted deployment's DeployedModel was still listed, DEPLOYED and the default,
        # while the bare name ran on OWN: it is gone, as a hard delete has it, and the
        # default is the one that serves the bare name
        assert [(d.name, d.default) for d in fw.lora.list()] == [(on_own.name, True)]
        assert fw.lora.get(own_id).default is True
        path = f"/v1/accounts/{ACCOUNT}/deployedModels/{side_id}"
        for method in ("GET", "PATCH", "DELETE"):
            r = srv.http(method, path, **({"json": {}} if method == "PATCH" else {}))
            assert r.status_code == 404 and on_side.name in r.json()["error"]["message"], r.text

        fw.deployments.undelete("side", body={})  # its DeployedModels come back with it
        wait_ready()
        shown = {d.name: (d.default, d.state) for d in fw.lora.list()}
        assert shown == {on_side.name: (True, "DEPLOYED"), on_own.name: (False, "DEPLOYED")}
        assert srv.complete(model("lora-a")) == srv.complete(f"{model('lora-a')}#{side}")

        fw.deployments.delete("side", hard=True)
        assert [d.name for d in fw.lora.list()] == [on_own.name]
        assert fw.lora.get(on_own.name.rsplit("/", 1)[1]).default is True
        fw.deployments.create(base_model=model("tiny"), deployment_id="side")
        wait_ready()
        assert status(f"{model('lora-a')}#{side}") == 404  # not loaded on the new one
    finally:
        fw.lora.unload(own_id)
        fw.deployments.delete("side", hard=True)


def test_an_adapter_folder_is_not_added_as_a_model(llama_adapters, tmp_path):
    """`girandole models add NAME ADAPTER-FOLDER` without --base stored the adapter as a base
    model: a deployment of it then failed to load (no config.json). It is refused, naming
    --base."""
    data = str(tmp_path / "data")
    added = girandole("models", "add", "--data-dir", data, "lonely", str(llama_adapters["a1"]))
    assert added.returncode == 1 and "--base" in added.stderr, (added.stdout, added.stderr)
    listed = girandole("models", "list", "--data-dir", data, "--json")
    assert "lonely" not in listed.stdout


def test_an_adapter_never_runs_on_another_base(srv, llama_adapters):
    """A DeployedModel was trusted as loaded: once the registry named another base for its
    adapter (removed and added again with another --base), requests still ran the adapter on
    the deployment's model, which was never checked against it. Such a record serves nothing
    (404, and not in /v1/models) until the adapter is loaded where it fits."""
    fw, data = srv.sdk(), str(srv.data)

    def add(base: str) -> None:
        added = girandole(
            "models", "add", "--data-dir", data, "--account", ACCOUNT,
            "lora-moved", str(llama_adapters["a2"]), "--base", model(base),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr

    def listed() -> list[str]:
        return [m["id"] for m in srv.http("GET", "/v1/models").json()["data"]]

    add("tiny")
    loaded = fw.lora.load(model=model("lora-moved"), deployment=OWN)
    try:
        srv.complete(model("lora-moved"))
        assert model("lora-moved") in listed()
        assert (
            girandole("models", "remove", "--data-dir", data, model("lora-moved")).returncode == 0
        )
        add("other-base")
        body = {"model": model("lora-moved"), "prompt": "hi", "max_tokens": 2}
        for name in (model("lora-moved"), f"{model('lora-moved')}#{OWN}"):
            r = srv.http("POST", "/v1/completions", json={**body, "model": name})
            assert r.status_code == 404, r.text
        assert model("lora-moved") not in listed()
        # its DeployedModel said status OK while it served nothing: the status says why
        path = f"/v1/accounts/{ACCOUNT}/deployedModels/{loaded.name.rsplit('/', 1)[1]}"
        shown = srv.http("GET", path)
        status = shown.json()["status"]
        assert status["code"] == "FAILED_PRECONDITION", status
        assert model("other-base") in status["message"] and OWN in status["message"], status
    finally:
        fw.lora.unload(loaded.name.rsplit("/", 1)[1])
        girandole("models", "remove", "--data-dir", data, model("lora-moved"))


def test_an_adapter_removed_from_the_registry_is_not_listed(srv, llama_adapters):
    """`girandole models remove` of a loaded adapter: requests for it were 404s, but /v1/models
    still listed it (and `#deployment`) as a model to use. It is listed again once it is back."""
    fw, data = srv.sdk(), str(srv.data)

    def add() -> None:
        added = girandole(
            "models", "add", "--data-dir", data, "--account", ACCOUNT,
            "lora-gone", str(llama_adapters["a2"]), "--base", model("tiny"),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr

    def listed() -> list[str]:
        return [m["id"] for m in srv.http("GET", "/v1/models").json()["data"]]

    add()
    loaded = fw.lora.load(model=model("lora-gone"), deployment=OWN)
    try:
        names = (model("lora-gone"), f"{model('lora-gone')}#{OWN}")
        assert set(names) <= set(listed())
        assert girandole("models", "remove", "--data-dir", data, names[0]).returncode == 0
        for name in names:
            body = {"model": name, "prompt": "hi", "max_tokens": 2}
            assert srv.http("POST", "/v1/completions", json=body).status_code == 404
            assert srv.http("GET", "/v1/models/" + name.replace("#", "%23")).status_code == 404
            assert name not in listed()
        # its DeployedModel said status OK while it served nothing: the status says why
        path = f"/v1/accounts/{ACCOUNT}/deployedModels/{loaded.name.rsplit('/', 1)[1]}"
        status = srv.http("GET", path).json()["status"]
        assert status["code"] == "NOT_FOUND" and "model registry" in status["message"], status
        listing = srv.http("GET", f"/v1/accounts/{ACCOUNT}/deployedModels").json()
        assert [d["status"] for d in listing["deployedModels"] if d["name"] == loaded.name] == [
            status
        ]
        add()
        assert set(names) <= set(listed())
        srv.complete(names[1])
        assert srv.http("GET", path).json()["status"] == {"code": "OK", "message": ""}
    finally:
        fw.lora.unload(loaded.name.rsplit("/", 1)[1])
        girandole("models", "remove", "--data-dir", data, model("lora-gone"))


def test_an_adapter_added_again_from_another_folder_runs_the_new_weights(srv, llama_adapters):
    """A loaded adapter removed from the registry and added again under its name from another
    folder kept running the old folder's weights (the replica held the name): it now reads
    the folder the registry names."""
    fw, data = srv.sdk(), str(srv.data)

    def add(folder: str) -> None:
        added = girandole(
            "models", "add", "--data-dir", data, "--account", ACCOUNT,
            "lora-swap", str(llama_adapters[folder]), "--base", model("tiny"),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr

    add("a1")
    swap = fw.lora.load(model=model("lora-swap"), deployment=OWN)
    b = fw.lora.load(model=model("lora-b"), deployment=OWN)  # the a2 folder
    try:
        assert srv.complete(model("lora-swap")) != srv.complete(model("lora-b"))
        assert girandole("models", "remove", "--data-dir", data, model("lora-swap")).returncode == 0
        add("a2")
        assert srv.complete(model("lora-swap")) == srv.complete(model("lora-b"))
    finally:
        fw.lora.unload(swap.name.rsplit("/", 1)[1])
        fw.lora.unload(b.name.rsplit("/", 1)[1])
        girandole("models", "remove", "--data-dir", data, model("lora-swap"))
