"""Every 400/401/404/405/413 case over real HTTP, with Fireworks' error body; no input gives a 5xx."""

from __future__ import annotations

import httpx
import pytest
from api_helpers import DEPLOYMENT, MODEL, OTHER_KEY, post

pytestmark = pytest.mark.slow


def assert_error(r: httpx.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    # one id for the request: the body's is the header's and the access log's
    assert body["request_id"] and body["request_id"] == r.headers["x-request-id"]
    return error


# -- 400: the body --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"{", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"model": "m", "prompt": NaN}', "not valid JSON"),
    ],
)
def test_malformed_bodies(server, raw, fragment):
    assert_error(post(server, raw), 400, fragment)


def test_missing_fields(server):
    assert_error(post(server, {"model": MODEL}), 400, "Field required, field: 'prompt'")
    assert_error(post(server, {"prompt": "x"}, add_model=False), 400, "field: 'model'")


def test_unknown_field_message(server):
    error = assert_error(post(server, {"prompt": "x", "foo": 1}), 400)
    assert error["message"] == "Extra inputs are not permitted, field: 'foo', value: 1"
    assert error["param"] == "foo"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 3), ("temperature", "hot"), ("top_p", 1.5), ("top_k", 101),
        ("min_p", -0.5), ("n", 0), ("n", 129), ("n", 1.5), ("max_tokens", -1),
        ("max_tokens", "10"), ("stop", ["a", "b", "c", "d", "e"]), ("stop", 3),
        ("stream", "yes"), ("seed", 2**70), ("context_length_exceeded_behavior", "x"),
        ("stream_options", {"include_usage": 1}),
    ],
)  # fmt: skip
def test_bad_values_name_the_field(server, field, value):
    error = assert_error(post(server, {"prompt": "x", field: value}), 400, f"field: '{field}")
    assert error["param"].split(".")[0] == field


@pytest.mark.parametrize("prompt", [[], [[]], 7, [1.5], [-3], ["a", [1]]])
def test_bad_prompts(server, prompt):
    assert_error(post(server, {"prompt": prompt}), 400, "field: 'prompt'")


def test_token_id_out_of_vocabulary(server):
    assert_error(post(server, {"prompt": [2, 10**9]}), 400, "out of range")


def test_max_tokens_and_max_completion_tokens_together(server):
    r = post(server, {"prompt": "x", "max_tokens": 2, "max_completion_tokens": 2})
    assert_error(r, 400, "max_tokens", "max_completion_tokens")
    r = post(server, {"prompt": "x", "max_completion_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize(
    "field, value",
    [("include_routing_matrix", True),
     ("images", ["data:image/png;base64,AA=="]), ("reasoning_effort", "low")],
)  # fmt: skip
def test_later_fields_are_unsupported_not_ignored(server, field, value):
    error = assert_error(post(server, {"prompt": "x", field: value}), 400, "not supported")
    assert error["param"] == field


def test_noop_values_of_later_fields_are_accepted(server):
    body = {"prompt": "x", "max_tokens": 1, "echo": False, "logprobs": None,
            "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "images": [],
            "service_tier": "auto", "include_routing_matrix": False}  # fmt: skip
    assert post(server, body).status_code == 200


def test_context_length_errors(server):
    context = (
        server.health()["engine"]["max_model_len"]
        if "max_model_len" in server.health()["engine"]
        else None
    )
    models = httpx.get(server.url + "/v1/models", headers=server.headers).json()
    context = context or models["data"][0]["context_length"]
    too_long = [2] * context
    error = assert_error(post(server, {"prompt": too_long}), 400, "The prompt is too long")
    # OpenAI's code, which LangChain and litellm key their context-overflow errors on
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    r = post(
        server,
        {"prompt": [2, 651], "max_tokens": context, "context_length_exceeded_behavior": "error"},
    )
    error = assert_error(r, 400, "maximum context length")
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi " * context}]},
        headers=server.headers,
    )
    error = assert_error(r, 400, "The prompt is too long")
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    # refused by its characters, before tokenizing
    from girandole.api.ops.server_ops import MAX_CHARS_PER_TOKEN

    error = assert_error(post(server, {"prompt": "a" * (context * MAX_CHARS_PER_TOKEN + 1)}), 400)
    assert "characters, far above the limit" in error["message"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    # under the character limit but far over the context in tokens: refused once a part of
    # it is counted (Tokenizer.more_tokens_than), not after seconds of tokenizing all of it
    words = "hello world, this is a prompt. " * (context * 16 // 31)  # ~4 x context tokens
    error = assert_error(post(server, {"prompt": words}), 400, "far more than")
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": words}]},
        headers=server.headers,
    )
    error = assert_error(r, 400, "far more than")
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    # several prompts are each bounded by the context, not together: 80 prompts of a fortieth
    # of the limit each were refused by their sum; the request goes on to its own checks
    many = ["\n" * (context * MAX_CHARS_PER_TOKEN // 40)] * 80
    error = assert_error(post(server, {"prompt": many, "temperature": -1}), 400)
    assert error["param"] == "temperature", error
    # the early refusal names the field with the text: embeddings' input, rerank's documents
    # or query (they were named 'prompt', a field of neither)
    hopeless = "a" * (context * MAX_CHARS_PER_TOKEN + 1)
    for path, body, param in [
        ("/v1/embeddings", {"input": ["x", hopeless]}, "input"),
        ("/v1/rerank", {"query": "q", "documents": ["x", hopeless]}, "documents"),
        ("/v1/rerank", {"query": hopeless, "documents": ["x"]}, "query"),
    ]:
        r = httpx.post(server.url + path, json={"model": MODEL, **body}, headers=server.headers,
                       timeout=60)  # fmt: skip
        error = assert_error(r, 400, "far above the limit")
        assert (error["code"], error["param"]) == ("context_length_exceeded", param), path


def test_context_length_error_names_the_length_field_sent(server, open_server):
    """`context_length_exceeded_behavior: error` refuses the length the client asked for, by the
    field it came in: max_completion_tokens was named max_tokens. A request that sets no length
    asked for none: the endpoint's default is lowered to fit, never a 400 (it named max_tokens,
    a field the request did not have)."""
    r = post(
        server,
        {"prompt": [2, 651], "max_completion_tokens": 10**6,
         "context_length_exceeded_behavior": "error"},
    )  # fmt: skip
    error = assert_error(r, 400, "plus max_completion_tokens (1000000)")
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_completion_tokens")
    # open_server: a 64-token context; 56 prompt tokens leave 8, below /completions' default 16
    body = {"model": "accounts/testing/models/tiny-eos", "prompt": [5] * 56,
            "context_length_exceeded_behavior": "error"}  # fmt: skip
    r = post(open_server, body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    error = assert_error(post(open_server, {**body, "max_tokens": 16}), 400, "plus max_tokens")
    assert error["param"] == "max_tokens"


# -- 401 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="},
     {"Authorization": "Bearer"}, {"Authorization": "test-key-1"}],
)  # fmt: skip
@pytest.mark.parametrize(
    "method, path", [("POST", "/v1/completions"), ("GET", "/inference/v1/models")]
)
def test_unauthorized(server, headers, method, path):
    r = httpx.request(
        method, server.url + path, json={"model": MODEL, "prompt": "x"}, headers=headers
    )
    error = assert_error(r, 401)
    assert error["code"] == "UNAUTHORIZED"
    assert r.headers["www-authenticate"] == "Bearer"


def test_every_configured_key_works(server):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert r.status_code == 200


def test_auth_comes_before_body_checks(server):
    r = httpx.post(
        server.url + "/v1/completions", content=b"{", headers={"Authorization": "Bearer x"}
    )
    assert r.status_code == 401


def test_health_was_503_while_loading_then_200(server):
    # The socket opens as the model starts loading, which now takes under a second with a warm
    # cache: the first look may already find it ready. The loading state's own answers are
    # test_api_units.test_app_while_loading's (an app whose model never loads).
    codes = server.health_codes
    assert codes[-1] == 200 and all(code == 503 for code in codes[:-1]), codes


def test_health_needs_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200


# -- 404 / 405 --------------------------------------------------------------------------------


NOT_FOUND = "Model not found, inaccessible, and/or not deployed"


@pytest.mark.parametrize(
    "model",
    [
        "accounts/fireworks/models/deepseek-v3p1",
        "accounts/other/models/gemma-3-270m",
        f"{MODEL}#accounts/fireworks/deployments/nope",
        "accounts/fireworks/deployments/nope",
        "not a model name",
        "",
    ],
)
def test_unknown_model_is_fireworks_404(server, model):
    error = assert_error(post(server, {"model": model, "prompt": "x"}), 404)
    assert error == {**error, "message": NOT_FOUND, "code": "NOT_FOUND", "param": "model"}


def test_deployment_header_must_match(server):
    r = post(
        server,
        {"prompt": "x"},
        headers={"fireworks-deployment": "accounts/fireworks/deployments/x"},
    )
    assert_error(r, 404, NOT_FOUND)
    r = post(server, {"prompt": "x", "max_tokens": 1}, headers={"fireworks-deployment": DEPLOYMENT})
    assert r.status_code == 200


def test_unknown_model_in_models_route(server):
    r = httpx.get(server.url + "/v1/models/accounts/fireworks/models/nope", headers=server.headers)
    assert_error(r, 404, NOT_FOUND)


def test_unknown_path_and_wrong_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing-here", headers=server.headers), 404)
    r = httpx.get(server.url + "/v1/completions", headers=server.headers)
    assert_error(r, 405)


# -- no 5xx, whatever comes in ----------------------------------------------------------------

HOSTILE = [
    b'{"model": "m", "prompt": "x", "max_tokens": 1e400}',
    b'{"model": "m", "prompt": "x", "temperature": 1e400}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "max_tokens": 99999999999999999999999,'
    b' "context_length_exceeded_behavior": "error"}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "seed": -99999999999999999999999}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "' + MODEL.encode() + b'", "prompt": "\\ud800"}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "stop": ["\\u0000"], "max_tokens": 1}',
    b'{"model": {"a": 1}, "prompt": "x"}',
    b'{"model": null, "prompt": null}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "n": 128, "max_tokens": 0}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": [[1], [2], [3]], "max_tokens": 0}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "top_p": 0, "max_tokens": 1}',
    b"null",
    b"\x00" * 100,
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_bodies_never_give_5xx(server, raw):
    r = post(server, raw)
    assert r.status_code < 500, r.text
    assert "message" in r.json().get("error", {}) or r.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
