"""What browsers and less common clients send, over real HTTP: CORS (preflight, headers on every
answer, errors and streams included, the `--allowed-*` flags), HEAD, OPTIONS, a 405's `Allow`,
and a trailing slash (served, never redirected)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from api_helpers import API_KEY, MODEL, api_conftest, usage_row
from loopback import serve_in_thread

pytestmark = pytest.mark.slow

PAGE = "https://app.example"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def assert_fireworks_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["message"] and body["request_id"]
    return body["error"]


# -- CORS, default policy (every origin, no credentials) on the keyed server -------------------


@pytest.mark.parametrize(
    "path",
    ["/v1/completions", "/inference/v1/chat/completions", "/v1/accounts/fireworks/deployments"],
)
def test_preflight_needs_no_key(server, path):
    # before: 405 (no route takes OPTIONS), so no browser could call the server at all
    r = httpx.options(server.url + path, headers=PREFLIGHT)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "access-control-allow-credentials" not in r.headers


def test_the_real_request_still_needs_its_key_and_its_401_is_readable(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Origin": PAGE})
    error = assert_fireworks_error(r, 401)
    assert error["code"] == "UNAUTHORIZED"
    assert r.headers["access-control-allow-origin"] == "*"  # else the page cannot read the 401
    exposed = r.headers["access-control-expose-headers"]
    assert "x-request-id" in exposed and "retry-after" in exposed

    r = httpx.post(
        server.url + "/v1/completions",
        json=body,
        headers={"Origin": PAGE, **server.headers},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"


def test_a_page_may_read_every_fireworks_header(server):
    """README: a page may read x-request-id, Retry-After, the rate-limit and fireworks-*
    headers. Six of the perf headers every non-stream answer carries (fireworks-cached-prompt-
    tokens, -tokenizer-duration, -server-time-to-first-token, -prefill-queue-duration,
    -prefill-duration, -generation-duration) were not exposed, so a browser hid them."""
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    headers = {"Origin": PAGE, **server.headers}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    readable = [h for h in r.headers if h.startswith(("fireworks-", "x-ratelimit", "retry-after"))]
    assert "fireworks-server-time-to-first-token" in readable and "x-request-id" in exposed
    assert [h for h in readable if h not in exposed] == []


def test_a_400_and_a_404_carry_cors_headers(server):
    headers = {"Origin": PAGE, **server.headers}
    r = httpx.post(server.url + "/v1/completions", content=b"{", headers=headers)
    assert_fireworks_error(r, 400)
    assert r.headers["access-control-allow-origin"] == "*"
    r = httpx.get(server.url + "/v1/nothing-here", headers=headers)
    assert_fireworks_error(r, 404)
    assert r.headers["access-control-allow-origin"] == "*"


def test_a_stream_carries_cors_headers(server):
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 3, "stream": True}
    headers = {"Origin": PAGE, **server.headers}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.read().decode().endswith("data: [DONE]\n\n")


def test_no_origin_no_cors_headers(server):
    r = httpx.get(server.url + "/v1/models", headers=server.headers)
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


# -- HEAD, OPTIONS, 405 -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/health", "/inference/v1/models", "/playground"])
def test_head_answers_like_get_without_a_body(server, path):
    got = httpx.get(server.url + path, headers=server.headers)
    r = httpx.head(server.url + path, headers=server.headers)
    assert r.status_code == got.status_code == 200, r.text  # before: 405
    assert r.content == b""
    assert r.headers["content-type"] == got.headers["content-type"]
    assert int(r.headers["content-length"]) > 0


def test_head_needs_the_key_as_get_does(server):
    assert httpx.head(server.url + "/v1/models").status_code == 401


def test_head_on_a_post_route_is_a_405_with_allow(server):
    r = httpx.head(server.url + "/v1/completions", headers=server.headers)
    assert r.status_code == 405
    assert r.headers["allow"] == "POST, OPTIONS"
    assert r.content == b""  # HTTP: no body on a HEAD answer


def test_a_405_is_fireworks_shaped_and_its_allow_lists_every_method(server):
    r = httpx.get(server.url + "/v1/completions", headers=server.headers)
    error = assert_fireworks_error(r, 405)
    assert error["code"] == "METHOD_NOT_ALLOWED"
    assert error["message"] == "Method Not Allowed: GET /v1/completions"
    assert r.headers["allow"] == "POST, OPTIONS"
    # two routes share the path: Starlette's Allow named only the first one's (POST)
    r = httpx.put(server.url + "/v1/accounts/fireworks/deployments", headers=server.headers)
    assert_fireworks_error(r, 405)
    assert r.headers["allow"] == "GET, HEAD, POST, OPTIONS"


def test_router_errors_on_anthropics_paths_are_anthropic_shaped(server):
    # no route ran to set the shape (a 405, an unknown path): Anthropic's paths, and a request
    # of the anthropic SDK anywhere, still get Anthropic's body, which its SDK reads
    r = httpx.get(server.url + "/v1/messages", headers=server.headers)
    assert r.status_code == 405 and r.headers["allow"] == "POST, OPTIONS"
    body = r.json()
    assert body["type"] == "error" and body["request_id"], body
    assert body["error"] == {
        "type": "invalid_request_error", "message": "Method Not Allowed: GET /v1/messages"
    }  # fmt: skip
    r = httpx.post(server.url + "/inference/v1/messages/nothing", headers=server.headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text
    r = httpx.get(server.url + "/v1/nothing-here", headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 404 and r.json()["type"] == "error", r.text
    assert_fireworks_error(httpx.get(server.url + "/v1/nothing-here"), 404)


def test_a_plain_options_lists_the_methods(server):
    r = httpx.options(server.url + "/v1/models")  # no Origin: not a preflight
    assert r.status_code == 204 and r.headers["allow"] == "GET, HEAD, OPTIONS"
    assert_fireworks_error(httpx.options(server.url + "/v1/nothing-here"), 404)


# -- trailing slash ---------------------------------------------------------------------------


def test_a_trailing_slash_is_served_not_redirected_and_billed(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(server.url + "/v1/completions/", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text  # before: 307 to /v1/completions, which httpx ignores
    assert r.json()["object"] == "text_completion"
    rows = usage_row(server, r.headers["x-request-id"])  # tracked as /v1/completions
    assert rows and rows[0][:2] == ("completions", 200), rows
    r = httpx.get(server.url + "/v1/models/", headers=server.headers)
    assert r.status_code == 200 and r.json()["object"] == "list"  # not the model named ""


def test_a_trailing_slash_on_an_unknown_path_is_a_404_naming_it(server):
    r = httpx.post(server.url + "/v1/nothing/", json={}, headers=server.headers)
    error = assert_fireworks_error(r, 404)
    assert error["message"] == "Not found: POST /v1/nothing/"


def test_openai_sdk_with_a_trailing_slash_base_url(server):
    client = openai.OpenAI(base_url=server.url + "/v1/", api_key=API_KEY, max_retries=0)
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert out.choices[0].text is not None
    assert MODEL in [m.id for m in client.models.list().data]


# -- the --allowed-* flags --------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """Two origins, credentials, two methods, two headers: flags as a vLLM user writes them."""
    conftest = api_conftest()
    tmp = tmp_path_factory.mktemp("cors-server")
    model = conftest.write_eos_model(tmp / "eos-model")
    srv = conftest.start_server(
        tmp, "--model", str(model), "--model-id", "tiny-eos", "--account", "testing",
        "--kv-cache-gb", "0.01", "--max-model-len", "64",
        "--allowed-origins", json.dumps([PAGE, "http://localhost:3000/"]),
        "--allowed-credentials", "--allowed-methods", "get,POST",
        "--allowed-headers", "Authorization,Content-Type",
        api_key=None,
    )  # fmt: skip
    yield srv
    conftest.stop_server(srv)


@pytest.mark.parametrize("origin", [PAGE, "http://localhost:3000"])
def test_an_allowed_origin_with_credentials_is_echoed(strict_server, origin):
    r = httpx.options(
        strict_server.url + "/v1/completions", headers={**PREFLIGHT, "Origin": origin}
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == origin  # never * with credentials
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["access-control-allow-methods"] == "GET, POST"
    r = httpx.post(
        strict_server.url + "/v1/completions",
        json={"model": "accounts/testing/models/tiny-eos", "prompt": "x", "max_tokens": 2},
        headers={"Origin": origin},
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in r.headers["vary"]


def test_a_disallowed_origin_gets_no_allow_origin(strict_server):
    r = httpx.options(
        strict_server.url + "/v1/completions",
        headers={**PREFLIGHT, "Origin": "https://evil.example"},
    )
    error = assert_fireworks_error(r, 400)  # before (Starlette): text/plain "Disallowed CORS ..."
    assert "'https://evil.example' is not in --allowed-origins" in error["message"]
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(strict_server.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200  # answered, but a browser will not let the page read it
    assert "access-control-allow-origin" not in r.headers


def test_a_disallowed_method_or_header_fails_the_preflight(strict_server):
    url = strict_server.url + "/v1/accounts/testing/deployments/tiny-eos"
    r = httpx.options(url, headers={**PREFLIGHT, "Access-Control-Request-Method": "DELETE"})
    assert (
        "method 'DELETE' is not in --allowed-methods" in assert_fireworks_error(r, 400)["message"]
    )
    r = httpx.options(url, headers={**PREFLIGHT, "Access-Control-Request-Headers": "x-secret"})
    assert "x-secret not in --allowed-headers" in assert_fireworks_error(r, 400)["message"]


# -- in-process servers: CORS off, and the 500 of UnhandledErrors -------------------------------


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` on uvicorn on a loopback port, in a thread."""
    server, thread, url = serve_in_thread(app, log_level="critical")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def app_from_flags(*flags: str):
    """The app `girandole serve FLAGS` builds (the model is not loaded: not needed here)."""
    from girandole.api.app import create_app
    from girandole.api.server import add_serve_parser, settings_from_args
    from girandole.api.state import AppState

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return create_app(AppState(settings_from_args(parser.parse_args(["serve", *flags]))))


def test_an_empty_origin_list_turns_cors_off():
    with serving(app_from_flags("--allowed-origins", "")) as url:
        r = httpx.options(url + "/v1/completions", headers=PREFLIGHT)
        assert r.status_code == 204  # the app's own OPTIONS: no CORS headers
        assert not [h for h in r.headers if h.startswith("access-control-")]
        r = httpx.get(url + "/v1/models", headers={"Origin": PAGE})
        assert not [h for h in r.headers if h.startswith("access-control-")]


def test_the_500_of_an_unexpected_error_carries_cors_headers():
    app = app_from_flags()

    async def bug() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/bug", bug)  # the one route no test should ever need
    with serving(app) as url:
        r = httpx.get(url + "/bug", headers={"Origin": PAGE})
        assert assert_fireworks_error(r, 500)["code"] == "INTERNAL"
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.headers["x-request-id"]


def test_cors_flags_from_the_environment(monkeypatch):
    from girandole.api.server import add_serve_parser, settings_from_args

    monkeypatch.setenv("GIRANDOLE_ALLOWED_ORIGINS", "https://a.example, https://b.example/")
    monkeypatch.setenv("GIRANDOLE_ALLOWED_CREDENTIALS", "1")
    monkeypatch.setenv("GIRANDOLE_ALLOWED_METHODS", '["post"]')
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    settings = settings_from_args(parser.parse_args(["serve"]))
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert settings.allowed_credentials is True
    assert settings.allowed_methods == ["POST"]
    assert settings.allowed_headers == ["*"]
    with pytest.raises(SystemExit, match="is not an origin"):
        settings_from_args(parser.parse_args(["serve", "--allowed-origins", "a.example/app"]))
    with pytest.raises(SystemExit, match="not a JSON list"):
        settings_from_args(parser.parse_args(["serve", "--allowed-origins", "[oops"]))


def test_private_network_access_only_for_origins_named_on_purpose(server, strict_server):
    """Chrome's Private Network Access preflight (a public page calling a server on the user's
    machine): with the default "*" no page gets it (as vLLM), or any site a user opens could drive
    a local server without keys; an origin named in --allowed-origins does."""
    pna = {**PREFLIGHT, "Access-Control-Request-Private-Network": "true"}
    r = httpx.options(server.url + "/v1/completions", headers=pna)
    error = assert_fireworks_error(r, 400)
    assert "private network access is granted only to origins named" in error["message"]
    assert "access-control-allow-private-network" not in r.headers
    r = httpx.options(strict_server.url + "/v1/completions", headers=pna)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-private-network"] == "true"
