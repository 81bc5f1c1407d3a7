"""Inference requests reach the deployments' engines: a real `girandole serve` (the tiny EOS model
as its own model) with a second tiny model deployed twice in account acme, `first` (the model's
context) and `second` (a context of 64 tokens, so which one answered shows in the usage), the
real openai client by model name, `#deployment` suffix and `fireworks-deployment` header; scale
to zero and back (503 DEPLOYMENT_SCALING_UP, then 200); another account's key gets 404s;
/v1/models lists what a key can reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from api_helpers import api_conftest

from girandole.registry.keystore import Database

ACCOUNT = "acme"
OWN_MODEL = f"accounts/{ACCOUNT}/models/tiny-eos"
MODEL = f"accounts/{ACCOUNT}/models/tiny-llama"
FIRST = f"accounts/{ACCOUNT}/deployments/first"
SECOND = f"accounts/{ACCOUNT}/deployments/second"
SECOND_CONTEXT = 64
MAX_TOKENS = 80  # more than fits the context of `second`
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


class Routed:
    def __init__(self, tmp: Path) -> None:
        conftest = api_conftest()
        self.conftest = conftest
        data = tmp / "data"
        db = Database.in_folder(data)
        self.key, _ = db.create_key(ACCOUNT)
        self.other_key, _ = db.create_key("other")
        db.close()
        llama = conftest.write_tiny_llama_for_ops(tmp / "tiny-llama")
        config_path = llama / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
        added = subprocess.run(
            [sys.executable, "-m", "girandole.cli", "models", "add", "--data-dir", str(data),
             "--account", ACCOUNT, "tiny-llama", str(llama)],
            capture_output=True, text=True, env=dict(os.environ), timeout=120,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        eos = conftest.write_eos_model(tmp / "eos")
        self.server = conftest.start_server(
            tmp, "--model", str(eos), "--model-id", "tiny-eos", "--account", ACCOUNT,
            "--kv-cache-gb", "0.01", "--data-dir", str(data), api_key=self.key,
        )  # fmt: skip

    def http(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}", **kw.pop("headers", {})}
        return httpx.request(method, self.server.url + path, headers=headers, timeout=60, **kw)

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=key or self.key, base_url=self.server.url + "/v1", max_retries=0
        )

    def deployment(self, deployment_id: str) -> dict:
        r = self.http("GET", f"/v1/accounts/{ACCOUNT}/deployments/{deployment_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, deployment_id: str, ready: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            d = self.deployment(deployment_id)
            if d["state"] == "READY" and d["replicaCount"] == ready:
                return d
            assert d["state"] != "FAILED", d
            assert time.monotonic() < deadline, d
            time.sleep(0.2)


@pytest.fixture(scope="module")
def routed(tmp_path_factory) -> Routed:
    r = Routed(tmp_path_factory.mktemp("routing"))
    try:
        for deployment_id, body in (
            ("first", {"baseModel": MODEL}),
            ("second", {"baseModel": MODEL, "maxContextLength": SECOND_CONTEXT}),
        ):
            created = r.http(
                "POST",
                f"/v1/accounts/{ACCOUNT}/deployments",
                params={"deploymentId": deployment_id},
                json=body,
            )
            assert created.status_code == 200, created.text
            r.wait(deployment_id, 1)
        yield r
    finally:
        r.conftest.stop_server(r.server)


def complete(client: openai.OpenAI, model: str, max_tokens: int = MAX_TOKENS, **kw):
    return client.completions.create(
        model=model,
        prompt="hello world",
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
        **kw,
    )


def test_completions_by_model_suffix_and_header(routed):
    client = routed.openai()
    by_model = complete(client, MODEL)  # the model's default deployment: the first created
    assert by_model.model == MODEL
    assert by_model.usage.completion_tokens == MAX_TOKENS

    suffixed = f"{MODEL}#{SECOND}"
    by_suffix = complete(client, suffixed)
    assert by_suffix.model == suffixed  # the request's string, echoed
    # `second` has 64 tokens of context: the completion is cut to fit it
    prompt = by_suffix.usage.prompt_tokens
    assert by_suffix.usage.completion_tokens == SECOND_CONTEXT - prompt < MAX_TOKENS

    by_header = complete(client, MODEL, extra_headers={"fireworks-deployment": SECOND})
    assert by_header.model == MODEL
    assert by_header.usage.completion_tokens == SECOND_CONTEXT - prompt

    by_name = complete(client, FIRST)  # a deployment name alone
    assert by_name.usage.completion_tokens == MAX_TOKENS

    own = complete(client, OWN_MODEL)  # the server's own model stays on its own engine
    assert own.usage.completion_tokens == MAX_TOKENS
    assert own.choices[0].text != by_model.choices[0].text  # another model answered


def test_chat_and_stream_by_deployment(routed):
    client = routed.openai()
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(
        model=f"{MODEL}#{SECOND}",
        messages=messages,
        max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},
    )
    assert chat.model == f"{MODEL}#{SECOND}" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == SECOND_CONTEXT

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        extra_headers={"fireworks-deployment": FIRST},
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {MODEL}
    assert chunks[-1].usage.completion_tokens == 8


def test_scaled_to_zero_answers_scaling_up_then_serves(routed):
    r = routed.http(
        "PATCH", f"/v1/accounts/{ACCOUNT}/deployments/second:scale", json={"replicaCount": 0}
    )
    assert r.status_code == 200, r.text
    routed.wait("second", 0)
    client = routed.openai()
    with pytest.raises(openai.APIStatusError) as info:
        complete(client, f"{MODEL}#{SECOND}")
    assert info.value.status_code == 503
    assert info.value.body["code"] == "DEPLOYMENT_SCALING_UP", info.value.body
    assert info.value.response.headers["retry-after"]
    assert routed.deployment("second")["desiredReplicaCount"] == 1  # the request started one
    deadline = time.monotonic() + 120
    while True:  # as a client retries
        try:
            done = complete(client, f"{MODEL}#{SECOND}")
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and exc.body["code"] == "DEPLOYMENT_SCALING_UP"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert done.usage.completion_tokens == SECOND_CONTEXT - done.usage.prompt_tokens
    # the default deployment kept serving throughout
    assert complete(client, MODEL).usage.completion_tokens == MAX_TOKENS


def test_a_busy_deployment_is_not_scaled_to_zero(routed):
    r = routed.http(
        "PATCH",
        f"/v1/accounts/{ACCOUNT}/deployments/first",
        json={"autoscalingPolicy": {"scaleToZeroWindow": "2s"}},
    )
    assert r.status_code == 200, r.text
    client = routed.openai()
    try:
        end = time.monotonic() + 6  # three windows of requests
        while time.monotonic() < end:
            assert complete(client, MODEL, max_tokens=2).usage.completion_tokens == 2
            time.sleep(0.5)
        assert routed.deployment("first")["replicaCount"] == 1
    finally:
        r = routed.http(
            "PATCH",
            f"/v1/accounts/{ACCOUNT}/deployments/first",
            json={"autoscalingPolicy": {"scaleToZeroWindow": "1h"}},
        )
        assert r.status_code == 200, r.text
    routed.wait("first", 1)


@pytest.mark.parametrize(
    "model, header",
    [
        (MODEL, None),
        (f"{MODEL}#{FIRST}", None),
        (FIRST, None),
        (MODEL, SECOND),
        (OWN_MODEL, None),
    ],
)
def test_another_accounts_deployments_are_not_found(routed, model, header):
    client = routed.openai(routed.other_key)
    headers = {"fireworks-deployment": header} if header else {}
    with pytest.raises(openai.NotFoundError) as info:
        complete(client, model, extra_headers=headers)
    assert info.value.body["code"] == "NOT_FOUND" and info.value.body["param"] == "model"


@pytest.mark.parametrize(
    "model, header",
    [
        ("accounts/fireworks/models/gemma-3-270m", None),  # in the catalog, not deployed
        (f"{MODEL}#{ACCOUNT}/nope", None),
        (f"{OWN_MODEL}#{FIRST}", None),  # a deployment of another model
        (MODEL, f"{ACCOUNT}/nope"),
        (f"{MODEL}#{FIRST}", SECOND),  # suffix and header disagree
    ],
)
def test_unknown_or_mismatched_deployments_are_not_found(routed, model, header):
    headers = {"fireworks-deployment": header} if header else {}
    with pytest.raises(openai.NotFoundError) as info:
        complete(routed.openai(), model, extra_headers=headers)
    assert info.value.body["code"] == "NOT_FOUND"


def test_models_lists_the_reachable_deployments(routed):
    listed = {m.id: m for m in routed.openai().models.list()}
    assert set(listed) == {OWN_MODEL, MODEL, f"{MODEL}#{FIRST}", f"{MODEL}#{SECOND}"}
    assert listed[f"{MODEL}#{SECOND}"].owned_by == ACCOUNT
    body = routed.http("GET", "/inference/v1/models").json()
    entries = {e["id"]: e for e in body["data"]}
    assert entries[f"{MODEL}#{SECOND}"]["context_length"] == SECOND_CONTEXT
    assert entries[f"{MODEL}#{FIRST}"]["supports_chat"] is True
    assert [m.id for m in routed.openai(routed.other_key).models.list()] == []


def test_prompt_size_is_checked_against_the_deployments_context(routed):
    with pytest.raises(openai.BadRequestError) as info:
        routed.openai().completions.create(
            model=f"{MODEL}#{SECOND}", prompt="a" * (SECOND_CONTEXT * 64 + 1), max_tokens=1
        )
    message = info.value.body["message"]
    assert f"limit of {SECOND_CONTEXT} tokens" in message and "characters" in message, message
