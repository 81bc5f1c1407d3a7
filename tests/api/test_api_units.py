"""Parts of the API that need no server: schemas and messages, naming, keys, limits, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from girandole.api.chat.schema import ChatCompletionRequest
from girandole.api.completions.schema import CompletionRequest
from girandole.api.embeddings.schema import EmbeddingRequest
from girandole.api.http.errors import APIError
from girandole.api.http.json_body import OFF_LOOP_BYTES, parse_json_body
from girandole.api.http.sse import DONE, sse_event
from girandole.api.http.unsupported import COMPLETIONS_UNSUPPORTED, strip_unsupported
from girandole.api.http.validation import _check_list_lengths, parse_json_object, validate_model
from girandole.api.serving.params import build_params, choice_seed, sampling_defaults
from girandole.api.serving.prompt import fit_max_tokens
from girandole.registry.keys import ApiKeyStore
from girandole.registry.models import ModelRegistry, ServedModel
from girandole.registry.naming import parse_model_ref


def error_of(body: dict) -> APIError:
    with pytest.raises(APIError) as info:
        strip_unsupported(body, COMPLETIONS_UNSUPPORTED)
        validate_model(CompletionRequest, body)
    assert info.value.status_code == 400
    return info.value


def req(**kw) -> dict:
    return {"model": "m", "prompt": "p", **kw}


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2], [[1, 2]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
        ("", [""]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert validate_model(CompletionRequest, req(prompt=prompt)).prompts() == expected


@pytest.mark.parametrize(
    "prompt", [5, [], [[]], [True], [-1], ["a", 1], [[1], "a"], {"a": 1}, None]
)
def test_bad_prompts_name_the_field(prompt):
    err = error_of(req(prompt=prompt))
    assert "field: 'prompt'" in err.message
    assert err.param == "prompt"


def test_extra_field_message_matches_fireworks():
    err = error_of(req(reset_prompt_cache=True))
    assert err.message == "Extra inputs are not permitted, field: 'reset_prompt_cache', value: True"
    err = error_of(req(stream_options={"include_usage": True, "x": 1}))
    assert err.message == "Extra inputs are not permitted, field: 'stream_options.x', value: 1"
    err = error_of(req(best_of=2, suffix="x"))
    assert err.message.startswith("2 request validation errors:\n  Extra inputs are not permitted")
    assert "field: 'best_of'" in err.message and "field: 'suffix'" in err.message


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 2.5), ("temperature", -0.1), ("temperature", "1"), ("temperature", True),
        ("top_p", 1.5), ("top_k", 101), ("top_k", -1), ("top_k", 1.5), ("min_p", 2),
        ("n", 0), ("n", 129), ("n", 1.0), ("max_tokens", -1), ("max_tokens", "5"),
        ("max_completion_tokens", -3), ("seed", 2**64), ("seed", 1.5), ("stop", ["a"] * 5),
        ("stop", 5), ("stop", [1]), ("stream", "yes"), ("ignore_eos", 1), ("user", 5),
        ("context_length_exceeded_behavior", "drop"), ("stream_options", 1),
        ("stream_options", {"include_usage": "yes"}), ("model", 5),
    ],
)  # fmt: skip
def test_type_and_range_errors_name_the_field(field, value):
    err = error_of(req(**{field: value}))
    assert f"field: '{field}" in err.message
    assert err.param.split(".")[0] == field


def test_limits_accepted_at_the_edges():
    body = req(temperature=2, top_p=0, top_k=100, min_p=1, n=128, stop=["a", "b", "c", "d"])
    r = validate_model(CompletionRequest, body)
    assert r.stop_list() == ["a", "b", "c", "d"]
    assert validate_model(CompletionRequest, req(temperature=0, n=1, stop="x")).stop_list() == ["x"]


@pytest.mark.parametrize(
    "field, value",
    [("reasoning_effort", "high"),
     ("thinking", {"type": "enabled"}), ("images", ["data:image/png;base64,AA=="])],
)  # fmt: skip
def test_unsupported_fields_are_400_naming_them(field, value):
    err = error_of(req(**{field: value}))
    assert "not supported" in err.message
    assert err.param.split(".")[0] == field


@pytest.mark.parametrize(
    "field, value",
    [("images", []),
     ("reasoning_effort", "none"), ("reasoning_effort", False), ("thinking", {"type": "disabled"}),
     ("reasoning_history", "disabled")],
)  # fmt: skip
def test_unsupported_fields_accept_noop_values(field, value):
    body = req(**{field: value})
    strip_unsupported(body, COMPLETIONS_UNSUPPORTED)
    assert field not in body
    validate_model(CompletionRequest, body)


def test_noop_check_is_type_exact():
    with pytest.raises(APIError):  # 0 is not False
        strip_unsupported(req(reasoning_effort=0), COMPLETIONS_UNSUPPORTED)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"[1]",
        b'"x"',
        b"\xff\xfe",
        b'{"a": NaN}',
        b"[" * 100000,
        b'{"p": ["\\ud800"]}',
        b'{"\\udfff": 1}',
    ],
)
def test_bad_json_bodies_are_400(raw):
    with pytest.raises(APIError) as info:
        parse_json_object(raw)
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[1]", b'{"a": NaN}', b'{"a": [1, 2.5e400, -Infinity]}', b'{"p": ["\\ud800"]}'],
)
def test_a_large_body_parsed_off_the_loop_fails_as_a_small_one(raw):
    """A body over OFF_LOOP_BYTES is parsed in a thread with hooks of its own: the same 400,
    word for word (padded with whitespace, which JSON allows around the value)."""
    padded = raw + b" " * OFF_LOOP_BYTES
    with pytest.raises(APIError) as small:
        parse_json_object(padded)
    with pytest.raises(APIError) as large:
        asyncio.run(parse_json_body(padded))
    assert large.value.status_code == 400
    assert large.value.message == small.value.message


def test_a_large_body_is_parsed_while_the_event_loop_runs():
    """json.loads holds the GIL for all of its parse, in a thread too: on the loop (or in a
    plain thread) no other task runs until it ends. Parsed with girandole's hooks, the loop
    gets turns between values: its longest wait is a small part of the parse."""
    body = {"model": "m", "prompt": [[12345, 2.5, {"a": 1}]] * 300_000, "n": 1}
    raw = json.dumps(body).encode()
    assert len(raw) > OFF_LOOP_BYTES

    async def main() -> tuple[dict, float, float]:
        done = asyncio.Event()
        longest = 0.0

        async def tick() -> None:
            nonlocal longest
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                longest, last = max(longest, now - last), now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        start = time.perf_counter()
        try:
            return await parse_json_body(raw), longest, time.perf_counter() - start
        finally:
            done.set()
            await ticker

    data, longest, took = asyncio.run(main())
    assert data == body
    # the loop waits at most a few switch intervals (5 ms) at a time, not the whole parse
    assert longest < took / 4, (longest, took)


def test_only_surrogate_escapes_send_a_body_to_the_surrogate_scan():
    """The scan for unpaired surrogates (seconds on a large body) runs only when the text has a
    surrogate escape; a paired one (an emoji, as ensure_ascii writes it) and an escaped
    backslash before "ud800" are text like any other."""
    assert parse_json_object(b'{"p": "\\ud83d\\ude00"}') == {"p": "\U0001f600"}
    assert parse_json_object(b'{"p": "\\\\ud800"}') == {"p": "\\ud800"}
    with pytest.raises(APIError, match="'p.q\\[1\\]' contains an unpaired"):
        parse_json_object(b'{"p": {"q": ["x", "\\uDBFF"]}}')


def test_a_list_over_its_max_length_is_refused_before_its_items_are_validated():
    """pydantic checks a list's max_length after validating each item: 150,000 tools held the
    event loop for seconds. The length is checked first, with pydantic's message."""
    with pytest.raises(APIError) as info:
        validate_model(CompletionRequest, {"model": "m", "prompt": "x", "stop": [1] * 5})
    assert (
        info.value.message
        == "List should have at most 4 items after validation, not 5, field: 'stop'"
    )
    assert info.value.param == "stop"
    tools = [{"type": "nonsense"}] * 129  # invalid items: the length is what is reported
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    with pytest.raises(APIError, match="at most 128 items after validation, not 129"):
        validate_model(ChatCompletionRequest, body)
    body["tools"] = [{"type": "function", "function": {"name": "f"}}] * 128
    assert len(validate_model(ChatCompletionRequest, body).tools) == 128


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # a tagged union's tag ("text") and type ("function") were parts of the name
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "function", "function": {"name": 5}}]}, "tools.0.function.name"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),  # a missing field is named
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "bogus": 1}, "bogus"),
    ],
)  # fmt: skip
def test_validation_errors_name_fields_as_the_body_spells_them(body, param):
    with pytest.raises(APIError) as info:
        validate_model(ChatCompletionRequest, {"model": "m", **body})
    assert info.value.param == param
    assert f"field: '{param}'" in info.value.message


def test_union_labels_are_dropped_from_error_locations():
    from girandole.api.http.validation import body_location

    data = {"input": [{"role": "critic"}], "stop": [1], "tools": [{"type": []}]}
    assert body_location(data, ("input", 0, "message", "role")) == ("input", 0, "role")
    assert body_location(data, ("stop", "list[str]", 0)) == ("stop", 0)
    assert body_location(data, ("stop", "str")) == ("stop",)
    assert body_location(data, ("tools", 0, "other", "type")) == ("tools", 0, "type")
    assert body_location(data, ("input", 0, "content")) == ("input", 0, "content")  # missing


def test_context_length_rules():
    assert fit_max_tokens(10, 5, 100, "truncate") == 5
    assert fit_max_tokens(10, 500, 100, "truncate") == 90
    assert fit_max_tokens(10, 90, 100, "error") == 90
    with pytest.raises(APIError, match="maximum context length is 100"):
        fit_max_tokens(10, 91, 100, "error")
    for behavior in ("truncate", "error"):
        with pytest.raises(APIError, match="The prompt is too long: 100, model maximum context"):
            fit_max_tokens(100, 1, 100, behavior)


def test_choice_seeds_differ_and_keep_choice_zero():
    assert choice_seed(None, 3) is None
    assert choice_seed(42, 0) == 42
    seeds = {choice_seed(42, k) for k in range(128)}
    assert len(seeds) == 128 and all(0 <= s < 2**63 for s in seeds if s != 42)


def test_sampling_params_from_fields():
    defaults = sampling_defaults({"temperature": 0.7, "top_k": 64})
    p = build_params({"top_p": 0.9}, defaults, max_tokens=7, stop=["\n"], seed=1)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.stop, p.seed) == (
        0.7, 64, 0.9, 7, ["\n"], 1,
    )  # fmt: skip
    greedy = build_params({"top_p": 0}, sampling_defaults(None), max_tokens=1, stop=[], seed=None)
    assert greedy.top_k == 1 and greedy.greedy
    with pytest.raises(APIError) as info:
        build_params({}, defaults, max_tokens=1, stop=[""], seed=None)
    assert info.value.param == "stop"


@pytest.mark.parametrize(
    "value, model, deployment",
    [
        ("accounts/fireworks/models/gemma-3-270m", "accounts/fireworks/models/gemma-3-270m", None),
        ("gemma-3-270m", "accounts/fireworks/models/gemma-3-270m", None),
        ("fireworks/gemma-3-270m", "accounts/fireworks/models/gemma-3-270m", None),
        ("accounts/fireworks/models/gemma-3-270m#accounts/alice/deployments/d1",
         "accounts/fireworks/models/gemma-3-270m", "accounts/alice/deployments/d1"),
        ("fireworks/gemma-3-270m#alice/12345678",
         "accounts/fireworks/models/gemma-3-270m", "accounts/alice/deployments/12345678"),
        ("accounts/alice/deployments/d1", None, "accounts/alice/deployments/d1"),
    ],
)  # fmt: skip
def test_model_names(value, model, deployment):
    ref = parse_model_ref(value, "fireworks")
    assert (ref.model, ref.deployment) == (model, deployment)


@pytest.mark.parametrize(
    "value", ["", "accounts/A/models/b", "a/b/c", "accounts/a/models/b#", "x#y", "-a"]
)
def test_malformed_model_names(value):
    assert parse_model_ref(value, "fireworks") is None


def test_registry_resolution():
    reg = ModelRegistry("fireworks")
    served = ServedModel("accounts/fireworks/models/m", "fireworks", context_length=8)
    reg.add_model(served, "accounts/fireworks/deployments/m")
    dep = "accounts/fireworks/deployments/m"
    assert reg.resolve("accounts/fireworks/models/m").deployment.name == dep
    assert reg.resolve(f"accounts/fireworks/models/m#{dep}").model is served
    assert reg.resolve(dep).model is served
    assert reg.resolve("m", deployment_header=dep).model is served
    assert reg.resolve("m", deployment_header="fireworks/m").model is served
    assert reg.resolve("accounts/fireworks/models/other") is None
    assert reg.resolve("m#accounts/fireworks/deployments/other") is None
    assert reg.resolve("m", deployment_header="accounts/fireworks/deployments/other") is None
    assert reg.resolve(f"m#{dep}", deployment_header="fireworks/other") is None
    assert reg.resolve("accounts/bob/models/m") is None
    entry = served.to_list_entry()
    assert entry["id"] == "accounts/fireworks/models/m" and entry["context_length"] == 8
    assert {"object", "created", "owned_by", "kind", "supports_chat"} <= set(entry)


def test_key_store():
    assert ApiKeyStore().open
    keys = ApiKeyStore(["k1", "k2"])
    assert not keys.open and len(keys) == 2
    assert keys.check("k1") and keys.check("k2")
    assert not keys.check("k3") and not keys.check("") and not keys.check("k1 ")


def test_sse_framing():
    event = sse_event({"a": "é", "b": None})
    assert event == 'data: {"a":"é","b":null}\n\n'.encode()
    assert json.loads(event[6:]) == {"a": "é", "b": None}
    assert DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_stream_cut_while_it_is_written_closes_its_body_at_once(spec_version):
    """The client goes while a write waits (a full socket buffer): the cancel lands in `send`,
    not in the body. Before, the body's `finally` (the engine requests' abort, the slots'
    release) waited for a garbage collection: the cancel's traceback holds the response."""
    import gc

    from girandole.api.http.sse import SSEResponse

    closed: list[str] = []

    async def body():
        try:
            for i in range(1000):
                yield sse_event({"i": i})
        finally:
            await asyncio.sleep(0)  # a cleanup that awaits (a fan-out's close) runs whole
            closed.append("closed")

    async def main() -> None:
        gone = asyncio.Event()
        written: list[bytes] = []

        async def send(message) -> None:
            if written:  # the second event: the socket is full, then the client goes
                gone.set()
                if spec_version == "2.4":
                    raise OSError("the client went away")
                await asyncio.Event().wait()
            written.append(message.get("body", b""))

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        with contextlib.suppress(Exception):  # 2.4: Starlette's ClientDisconnect
            await SSEResponse(body())(scope, receive, send)
        assert closed == ["closed"]

    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()


# -- the app without a model: loading state, settings, last-resort 500 --------------------------


def test_app_while_loading():
    from fastapi.testclient import TestClient

    from girandole.api.app import create_app
    from girandole.api.settings import ServerSettings
    from girandole.api.state import AppState

    app = create_app(AppState(ServerSettings(api_keys=["k"])))
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        body = {"model": "accounts/fireworks/models/gemma-3-270m", "prompt": "x"}
        r = client.post("/inference/v1/completions", json=body, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE"
        assert "loading" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        r = client.get("/v1/models", headers=auth)
        assert r.status_code == 200 and "context_length" not in r.json()["data"][0]
        assert client.get("/v1/models").status_code == 401
        assert client.post("/v1/completions", json=body).status_code == 401


def test_a_requests_slots_count_as_its_accounts_and_keys_until_it_ends():
    """The admission queue's fair order (api/ops/admission.py) reads what each key holds:
    ServerOps.admit and finish give it the request's key."""
    from types import SimpleNamespace

    from girandole.api.ops.tracking import Principal, RequestRecord
    from girandole.api.settings import ServerSettings
    from girandole.api.state import AppState

    ops = AppState(ServerSettings(api_keys=["k"])).ops
    owner = ("acme", "key-1")
    record = RequestRecord("POST", "/v1/completions", None, principal=Principal(*owner))
    record.status = 200
    choices = [SimpleNamespace(prompt_token_ids=[2, 3], prompt_index=0)] * 3
    asyncio.run(ops.admit(record, choices))
    assert ops.admission.held(owner) == (3, 3) and ops.admission.num_active == 3
    ops.finish(record)
    assert ops.admission.held(owner) == (0, 0) and ops.admission.num_active == 0


def test_unexpected_errors_become_fireworks_500():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from girandole.api.http.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "Internal server error"


def test_serve_flags_and_environment(tmp_path, monkeypatch):
    import argparse

    from girandole.api.server import add_serve_parser, settings_from_args
    from girandole.api.state import AppState

    def parse(*argv):
        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        return settings_from_args(parser.parse_args(["serve", *argv]))

    s = parse()
    assert (s.host, s.port, s.account, s.model_id, s.api_keys) == (
        "127.0.0.1", 8000, "fireworks", "gemma-3-270m", [],
    )  # fmt: skip
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nfile-key\n\n")
    s = parse("--api-key", "a", "--api-key", "b", "--api-keys-file", str(keys_file), "--port", "9")
    assert s.api_keys == ["a", "b"] and s.port == 9
    state = AppState(s)
    assert all(state.keys.check(k) for k in ("a", "b", "file-key"))
    assert not state.keys.check("# comment")
    monkeypatch.setenv("GIRANDOLE_PORT", "1234")
    monkeypatch.setenv("GIRANDOLE_API_KEY", "x, y")
    monkeypatch.setenv("GIRANDOLE_ACCOUNT", "acme")
    monkeypatch.setenv("GIRANDOLE_MODEL_ID", "my-model")
    monkeypatch.setenv("GIRANDOLE_KV_CACHE_GB", "0.25")
    s = parse()
    assert (s.port, s.api_keys, s.account, s.model_id, s.kv_cache_gb) == (
        1234, ["x", "y"], "acme", "my-model", 0.25,
    )  # fmt: skip
    assert AppState(s).served.name == "accounts/acme/models/my-model"
    with pytest.raises(ValueError, match="not a valid Fireworks id"):
        AppState(parse("--model-id", "Bad_Id"))


def test_kv_cache_dtype_flag(monkeypatch):
    """--kv-cache-dtype (or its variable) reaches each replica's EngineConfig; a bad value in
    the variable (argparse checks only the command line) ends start-up naming the flag."""
    import argparse

    from girandole.api.server import (
        KV_CACHE_DTYPE_CHOICES,
        add_serve_parser,
        settings_from_args,
    )
    from girandole.deploy.backend import EngineOptions, ReplicaSpec
    from girandole.engine.kv_groups import KV_CACHE_DTYPES

    def parse(*argv):
        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        return settings_from_args(parser.parse_args(["serve", *argv]))

    def engine_dtype(settings) -> str:
        spec = ReplicaSpec("d", None, 1.0, None, options=EngineOptions.from_settings(settings))
        return spec.engine_config().kv_cache_dtype

    assert KV_CACHE_DTYPE_CHOICES == tuple(KV_CACHE_DTYPES)
    assert engine_dtype(parse()) == "auto"
    assert engine_dtype(parse("--kv-cache-dtype", "float32")) == "float32"
    monkeypatch.setenv("GIRANDOLE_KV_CACHE_DTYPE", "float16")
    assert engine_dtype(parse()) == "float16"
    monkeypatch.setenv("GIRANDOLE_KV_CACHE_DTYPE", "fp8")
    with pytest.raises(SystemExit, match="--kv-cache-dtype must be one of auto, float32"):
        parse()


def test_openapi_document_refs_resolve():
    from fastapi.testclient import TestClient

    from girandole.api.app import create_app
    from girandole.api.settings import ServerSettings
    from girandole.api.state import AppState

    with TestClient(create_app(AppState(ServerSettings()))) as client:
        doc = client.get("/openapi.json").json()
    text = json.dumps(doc)
    assert "#/$defs/" not in text
    schemas = doc["components"]["schemas"]
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in schemas, ref
    for prefix in ("/v1", "/inference/v1"):
        body = doc["paths"][prefix + "/completions"]["post"]["requestBody"]
        schema = body["content"]["application/json"]["schema"]
        assert schema["additionalProperties"] is False and "prompt" in schema["properties"]


def test_json_bodies_write_non_finite_floats_as_null():
    """A NaN logprob or score (broken weights) must still make JSON a client can parse: a 500
    before (JSONResponse refuses NaN), `NaN` in a stream chunk (no JSON parser reads it)."""
    from girandole.api.http.finite_json import FiniteJSONResponse, dumps

    body = {"logprobs": {"token_logprobs": [-0.5, float("nan")], "top": [{"a": float("-inf")}]},
            "score": float("inf"), "text": "ok", "n": 3}  # fmt: skip
    want = {"logprobs": {"token_logprobs": [-0.5, None], "top": [{"a": None}]}, "score": None,
            "text": "ok", "n": 3}  # fmt: skip
    assert json.loads(dumps(body)) == want
    assert json.loads(FiniteJSONResponse(body).body) == want
    assert json.loads(sse_event(body)[len(b"data: ") :]) == want
    assert dumps({"x": 1.5}) == json.dumps({"x": 1.5})
    # numpy arrays (sampling masks): integer ones written as they are, float ones checked
    import numpy as np

    arrays = {"ids": np.array([3, 7], dtype=np.int32), "bits": np.array([True, False]),
              "p": np.array([0.5, np.nan], dtype=np.float32)}  # fmt: skip
    assert json.loads(dumps(arrays)) == {"ids": [3, 7], "bits": [True, False], "p": [0.5, None]}


def test_a_body_written_in_pieces_is_the_same_json():
    """Prefill responses (thousands of embedding vectors) are written a list item at a time in
    a thread: the bytes are those of one json.dumps, non-finite floats null, text unescaped."""
    from girandole.api.http.finite_json import FiniteJSONResponse, render_in_pieces

    bodies = [
        {"object": "list", "data": [{"index": i, "embedding": [0.5 * i, float("nan")]}
         for i in range(3)], "model": "m", "usage": {"prompt_tokens": 4}},
        {"results": [], "id": "x", "meta": {"billed_units": {"input_tokens": 0}}},
        {"data": [{"document": "naïve \"quoted\" \u2028"}], "score": float("inf")},
        {},
    ]  # fmt: skip
    for body in bodies:
        assert render_in_pieces(body) == FiniteJSONResponse(body).body


def test_what_orjson_refuses_is_still_written_as_json_wrote_it():
    """The API's JSON is orjson's (a listed sampling mask in ~1 ms, not ~30 ms of the event
    loop); what orjson refuses or would write otherwise goes to Python's json, so every body
    written before is still written, to the same values."""
    import numpy as np
    import orjson

    from girandole.api.http.finite_json import compact, compact_bytes, dumps

    def by_json(value):
        return json.loads(dumps(value, ensure_ascii=False, separators=(",", ":")))

    refused = [
        {1: "int key", None: float("nan"), 2.5: [float("inf")]},  # keys that are not str
        {"big": 2**64, "small": -(2**70), "x": [float("-inf")]},  # beyond 64 bits
        {"deep": [[[[1.5]]]] * 2, "nested": {"a": 1}},
    ]
    deep: list = [float("nan")]
    for _ in range(300):  # deeper than orjson writes (255 levels)
        deep = [deep]
    refused.append({"deep": deep})
    for value in refused:
        assert json.loads(compact(value)) == by_json(value)
        assert json.loads(compact_bytes(value)) == by_json(value)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(refused[0])  # the fallback above was taken, not orjson's answer
    assert '"big":18446744073709551616' in compact(refused[1])
    # a lone surrogate: the same text as json wrote (its UTF-8 still fails, as before)
    assert compact({"s": "a\ud800"}) == '{"s":"a\ud800"}'
    with pytest.raises(UnicodeEncodeError):
        compact_bytes({"s": "a\ud800"})
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        compact({"x": object()})  # a type neither writes: json's error, as before

    ids = np.arange(12, dtype=np.int32)
    arrays = {
        "mask": ids,  # orjson writes it itself
        "strided": ids[::3],  # not contiguous
        "big_endian": ids.astype(">i4"),  # not native byte order
        "scalar": np.array(7, dtype=np.int64),  # 0-d
        "bools": np.array([True, False]),
        "grid": ids.reshape(3, 4).astype(np.uint8),
        "empty": ids[:0],
        # float32 values as Python floats, as before (orjson's own would write 0.1)
        "f32": np.array([0.1, np.nan, np.inf, -2.5], dtype=np.float32),
        "f16": np.array([0.1, -np.inf], dtype=np.float16),
        "np_float": np.float64("nan"),  # a float subclass: null, as a NaN float
        "np_float_ok": np.float64(0.3),
    }
    got = json.loads(compact_bytes(arrays))
    assert got == by_json(arrays)
    assert (
        got["strided"] == [0, 3, 6, 9] and got["scalar"] == 7 and got["grid"][2] == [8, 9, 10, 11]
    )
    assert got["f32"] == [float(np.float32(0.1)), None, None, -2.5] and got["np_float"] is None
    assert compact(arrays) == compact_bytes(arrays).decode("utf-8")
    assert compact({"t": "naïve \u2028 \x1f"}) == '{"t":"naïve \u2028 \\u001f"}'  # unescaped


def test_sse_events_escape_line_breaks_in_the_json_bytes():
    """orjson leaves U+0085/2028/2029 raw in strings like json did: each event escapes them in
    its bytes, where nothing else encodes to theirs (a 2-byte character beside them is kept)."""
    import numpy as np

    text = "a\x85b\u2028c\u2029d é\u0100\u2027\u202a—"
    event = sse_event({"text": text, "mask": np.arange(3)})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert len(event[:-2].decode("utf-8").splitlines()) == 1  # one `data:` line, as httpx reads
    assert b"\\u0085" in event and b"\\u2028" in event and b"\\u2029" in event
    assert json.loads(event[len(b"data: ") :]) == {"text": text, "mask": [0, 1, 2]}


def test_an_unhandled_error_is_a_500_that_keeps_the_connection(tmp_path):
    """A bug's exception is the JSON 500 in Fireworks' shape, and the client's kept-alive
    connection still serves its next request (Starlette's last-resort handler re-raised after
    its 500, and uvicorn then dropped the connection: the next request failed with a reset)."""
    import socket

    import httpx
    from fastapi import FastAPI
    from loopback import serve_in_thread

    from girandole.api.http.errors import UnhandledErrors, install_error_handlers

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(UnhandledErrors)

    @app.get("/bug")
    async def bug() -> dict:
        raise RuntimeError("a bug")

    @app.get("/ok")
    async def ok() -> dict:
        return {"ok": True}

    server, thread, url = serve_in_thread(app, log_level="critical")
    port = int(url.rsplit(":", 1)[1])
    try:
        r = httpx.get(f"{url}/bug", timeout=10)
        assert r.status_code == 500 and r.json()["error"]["code"] == "INTERNAL"
        assert "a bug" not in r.text  # no internals to the client
        # one connection, two requests (httpx would quietly open a new connection instead)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            replies = []
            for path in ("/bug", "/ok"):
                c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                reply = b""
                while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
                replies.append(reply)
        assert replies[0].startswith(b"HTTP/1.1 500"), replies[0]
        assert replies[1].startswith(b"HTTP/1.1 200") and replies[1].endswith(b'{"ok":true}')
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize(
    "path, label",
    [("/v1/completions", "completions"), ("/inference/v1/chat/completions", "chat_completions"),
     ("/tokenize", "tokenize"), ("/v1/detokenize", "detokenize"),
     ("/v1/messages/count_tokens", "count_tokens"), ("/v1/nothing", "other"),
     ("/v1/responses/input_tokens", "count_tokens"), ("/v1/responses/resp_1", "stored_responses"),
     ("/v1/conversations/conv_1/items", "conversations"), ("/inference/v1/files", "files"),
     ("/v1/messages/batches/msgbatch_1/results", "message_batches"),
     ("/v1/batches/batch_1/cancel", "batches"), ("/v1/batchesx", "other")],
)  # fmt: skip
def test_metrics_label_every_route_family(path, label):
    """Metrics and usage rows label routes by family; the tokenizer routes and count_tokens
    were "other" (mixed with unknown paths) before they had labels."""
    from girandole.api.ops.server_ops import endpoint_of

    assert endpoint_of(path) == label


def test_embeddings_input_lists_are_capped_before_validating_but_one_token_id_list_is_not():
    """`input` takes at most 2048 texts, token-id lists or objects, or one token-id list as long
    as the context. More inputs than 2048 are refused before pydantic validates them (without
    that check, a million texts held the event loop for 8 s); one long token-id list is left
    to pydantic and the context check."""
    for items in (["x"] * 2049, [[1]] * 2049, [{"a": "b"}] * 2049):
        with pytest.raises(APIError, match="at most 2048 items after validation, not 2049"):
            _check_list_lengths(EmbeddingRequest, {"model": "m", "input": items})
    _check_list_lengths(EmbeddingRequest, {"model": "m", "input": [1] * 4000})
    assert len(validate_model(EmbeddingRequest, {"model": "m", "input": [1] * 4000}).input) == 4000


def test_prompt_template_fills_non_string_fields_as_json():
    """An embeddings input object's non-string fields go into prompt_template as the JSON the
    client sent (`true`, `null`, lists), not as Python's `True` / `None`; braces doubled stay
    literal."""
    from girandole.api.embeddings.inputs import fill_template

    fields = {"s": "naïve", "n": 3, "x": 1.5, "b": True, "z": None, "l": [1, "a"], "o": {"k": 2}}
    text = fill_template("{s} {n} {x} {b} {z} {l} {o} {{s}}", fields, 0)
    assert text == 'naïve 3 1.5 true null [1, "a"] {"k": 2} {s}'
