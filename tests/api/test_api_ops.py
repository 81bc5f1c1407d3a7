"""Keys database, account isolation, revocation, usage rows, rate limits, the admission queue,
/metrics, /ready, JSON logs, and SIGTERM drain, on a tiny-model server of its own with a keys
database (no `--api-key`): one slot at the engine, one in the queue, a 1 s queue timeout.

The SIGTERM test stops the server, so it is the last one in this file.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import ROOT, api_conftest  # noqa: E402

start_server = api_conftest().start_server
stop_server = api_conftest().stop_server

ACCOUNT = "testing"
MODEL = f"accounts/{ACCOUNT}/models/tiny"


def cli(data_dir: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "girandole.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout


def cli_error(data_dir: Path | None, *args: str, env: dict[str, str] | None = None) -> str:
    """A CLI call that must be refused: exit 2 with a message, never a traceback; its stderr."""
    extra = ["--data-dir", str(data_dir)] if data_dir is not None else []
    out = subprocess.run(
        [sys.executable, "-m", "girandole.cli", *args, *extra], capture_output=True, text=True,
        cwd=ROOT, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert out.returncode == 2, (args, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr


def set_key_row(srv, key_id: str, **columns) -> None:
    """Write a key's row as a database from before the CLI's checks may hold it."""
    names = ", ".join(f"{c} = ?" for c in columns)
    with sqlite3.connect(srv.data_dir / "girandole.db") as db:
        db.execute(f"UPDATE api_keys SET {names} WHERE id = ?", (*columns.values(), key_id))


def new_key(data_dir: Path, account: str, *extra: str) -> dict:
    return json.loads(cli(data_dir, "keys", "create", "--account", account, "--json", *extra))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    write_tiny_llama_for_ops = api_conftest().write_tiny_llama_for_ops

    tmp = tmp_path_factory.mktemp("guarded")
    data = tmp / "data"
    keys = {
        "alice": new_key(data, ACCOUNT, "--name", "alice"),
        "bob": new_key(data, "bob"),
        "limited": new_key(data, ACCOUNT, "--rpm", "2"),
    }
    model = write_tiny_llama_for_ops(tmp / "tiny")
    srv = start_server(
        tmp, "--model", str(model), "--model-id", "tiny", "--account", ACCOUNT,
        "--data-dir", str(data), "--kv-cache-gb", "0.02", "--max-model-len", "8192",
        "--max-concurrent-requests", "1", "--max-queued-requests", "1",
        "--queue-timeout", "1", "--drain-seconds", "60", "--max-prompt-tokens", "6000",
        "--prompt-cache-scope", "key",  # test_prompt_cache_scope_key
        api_key=keys["alice"]["key"],
    )  # fmt: skip
    srv.data_dir = data
    srv.keys = keys
    yield srv
    if srv.process.poll() is None:
        stop_server(srv)


def complete(srv, key: str | None, model: str = MODEL, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": "hello", "max_tokens": 2, **body}
    return httpx.post(srv.url + "/v1/completions", json=body, headers=headers, timeout=60)


def usage_rows(srv) -> list[tuple]:
    with sqlite3.connect(srv.data_dir / "girandole.db") as db:
        return db.execute(
            "SELECT request_id, account, key_id, model, status, aborted, prompt_tokens,"
            " completion_tokens, stream FROM usage ORDER BY id"
        ).fetchall()


def wait_rows(srv, n: int, timeout: float = 10) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        rows = usage_rows(srv)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_keys_cli_never_shows_keys(guarded):
    listing = cli(guarded.data_dir, "keys", "list")
    for info in guarded.keys.values():
        assert info["id"] in listing
        assert info["key"] not in listing
    raw = (guarded.data_dir / "girandole.db").read_bytes()
    for info in guarded.keys.values():
        assert info["key"].encode() not in raw  # stored hashed


def test_key_reaches_only_its_accounts_models(guarded):
    r = complete(guarded, guarded.keys["alice"]["key"])
    assert r.status_code == 200, r.text
    for model in (MODEL, "tiny", f"{MODEL}#accounts/{ACCOUNT}/deployments/tiny"):
        r = complete(guarded, guarded.keys["bob"]["key"], model=model)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["message"] == "Model not found, inaccessible, and/or not deployed"
    unknown = complete(guarded, guarded.keys["bob"]["key"], model="accounts/bob/models/nope")
    assert unknown.json()["error"] == r.json()["error"]  # the same as a model that is absent
    bob = {"Authorization": f"Bearer {guarded.keys['bob']['key']}"}
    alice = {"Authorization": f"Bearer {guarded.keys['alice']['key']}"}
    assert httpx.get(guarded.url + "/v1/models", headers=bob).json()["data"] == []
    assert [
        m["id"] for m in httpx.get(guarded.url + "/v1/models", headers=alice).json()["data"]
    ] == [MODEL]
    assert httpx.get(guarded.url + f"/v1/models/{MODEL}", headers=bob).status_code == 404
    r = httpx.post(
        guarded.url + "/v1/chat/completions", headers=bob,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 404


def test_missing_wrong_and_revoked_keys(guarded):
    assert complete(guarded, None).status_code == 401
    assert complete(guarded, "gk_nope_nope").status_code == 401
    assert complete(guarded, "not-a-key").status_code == 401
    info = new_key(guarded.data_dir, ACCOUNT, "--name", "short-lived")
    assert complete(guarded, info["key"]).status_code == 200  # a key made while serving works
    assert f"revoked {info['id']}" in cli(guarded.data_dir, "keys", "revoke", info["id"])
    r = complete(guarded, info["key"])
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "UNAUTHORIZED"


def test_usage_rows_and_summary(guarded):
    before = len(wait_rows(guarded, 0))
    key = guarded.keys["alice"]
    r = complete(guarded, key["key"], max_tokens=3, ignore_eos=True)
    assert r.status_code == 200
    rows = wait_rows(guarded, before + 1)
    request_id, account, key_id, model, status, aborted, prompt, completion, _ = rows[-1]
    assert (request_id, account, key_id, model, status, aborted) == (
        r.json()["id"], ACCOUNT, key["id"], MODEL, 200, 0
    )  # fmt: skip
    assert (prompt, completion) == (r.json()["usage"]["prompt_tokens"], 3)
    summary = json.loads(cli(guarded.data_dir, "usage", "--by", "key_id", "--json"))
    mine = next(s for s in summary if s["key_id"] == key["id"])
    assert mine["requests"] >= 2 and mine["completion_tokens"] >= 3
    assert "REQUESTS" in cli(guarded.data_dir, "usage")


def test_a_cancelled_embeddings_request_bills_only_the_inputs_that_ran(guarded):
    """Its inputs run one window at a time (here one: one slot); a client that hangs up was
    billed the prompt tokens of every input, also those that never reached the engine."""
    key = guarded.keys["alice"]["key"]
    text = "word " * 500
    before = len(wait_rows(guarded, 0))
    one = complete(guarded, key, prompt=text, max_tokens=1).json()["usage"]["prompt_tokens"]
    body = {"model": MODEL, "input": [text] * 300}
    with pytest.raises(httpx.ReadTimeout):  # the client hangs up after 1 s
        httpx.post(
            guarded.url + "/v1/embeddings", json=body, timeout=httpx.Timeout(60, read=1),
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip
    *_, status, aborted, prompt, completion, _ = wait_rows(guarded, before + 2)[-1]
    assert (status, aborted, completion) == (499, 1, 0)
    assert prompt % one == 0 and prompt < 300 * one, (prompt, one)


def test_an_embeddings_input_over_max_prompt_tokens_is_a_400_naming_input(guarded):
    """--max-prompt-tokens refused an embeddings input (or a rerank document) naming 'prompt',
    a field those bodies do not have."""
    auth = {"Authorization": f"Bearer {guarded.keys['alice']['key']}"}
    for path, body, field in [
        ("/v1/embeddings", {"input": ["short", "x" * 7000]}, "input"),
        ("/v1/rerank", {"query": "q", "documents": ["x" * 7000]}, "documents"),
    ]:
        r = httpx.post(guarded.url + path, json={"model": MODEL, **body}, headers=auth, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field, error
        assert "6000" in error["message"], error
    r = complete(guarded, guarded.keys["alice"]["key"], prompt="x" * 7000)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_usage_hours_must_be_a_finite_positive_number(guarded):
    before = len(wait_rows(guarded, 0))
    assert complete(guarded, guarded.keys["alice"]["key"]).status_code == 200
    wait_rows(guarded, before + 1)
    for hours in ("nan", "inf", "-1", "0", "soon"):
        err = cli_error(guarded.data_dir, "usage", f"--hours={hours}")
        assert "argument --hours:" in err, err
    summary = json.loads(cli(guarded.data_dir, "usage", "--hours", "1", "--json"))
    assert any(row["account"] == ACCOUNT and row["requests"] >= 1 for row in summary)


def test_rate_limit_429_with_headers(guarded):
    key = guarded.keys["limited"]["key"]
    first = complete(guarded, key)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    second = complete(guarded, key)
    assert second.status_code == 200
    assert second.headers["x-ratelimit-over-limit"] == "yes"
    third = complete(guarded, key)
    assert third.status_code == 429, third.text
    assert int(third.headers["retry-after"]) >= 1
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert "2 requests per minute" in third.json()["error"]["message"]
    # other keys are not affected
    assert complete(guarded, guarded.keys["alice"]["key"]).status_code == 200


def test_key_limits_must_be_from_0_to_sqlites_largest_integer(guarded):
    before = cli(guarded.data_dir, "keys", "list", "--json")
    for flag, value in (("--rpm", "-1"), ("--tpm", "-5"), ("--rpm", "99999999999999999999999"),
                        ("--tpm", "many")):  # fmt: skip
        err = cli_error(guarded.data_dir, "keys", "create", "--account", ACCOUNT, flag, value)
        assert f"argument {flag}:" in err, err
    assert cli(guarded.data_dir, "keys", "list", "--json") == before  # no key made
    info = new_key(guarded.data_dir, ACCOUNT, "--rpm", str(2**63 - 1), "--tpm", "0")
    r = complete(guarded, info["key"])
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-limit-requests"] == str(2**63 - 1)
    # a negative limit stored before limits were checked is no limit, not a 429 forever
    set_key_row(guarded, info["id"], rpm=-1, tpm=-5)
    for _ in range(3):
        r = complete(guarded, info["key"])
        assert r.status_code == 200, r.text
    cli(guarded.data_dir, "keys", "revoke", info["id"])


def test_the_cli_starts_without_torch(tmp_path):
    # `girandole keys ...` and the other admin commands are run one call at a time (scripts,
    # tests): importing torch for them cost ~2 s a call (now ~0.3 s); the engine imports it.
    # `girandole serve` with a bad value or model path says so before importing it too
    probe = (
        "import sys, girandole.cli as c; c.build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        f"assert c.main(['serve', '--port', '0', '--data-dir', {str(tmp_path)!r},"
        " '--model', '/nonexistent']) == 2\n"
        "assert 'torch' not in sys.modules, 'torch imported by serve'"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, timeout=60, check=True)


def test_serve_refuses_bad_default_limits():
    model = ["--model", "/nonexistent/model.gguf"]  # were the flag taken, this would be refused
    err = cli_error(None, "serve", *model, "--rate-limit-rpm", "-1")
    assert "argument --rate-limit-rpm:" in err, err
    err = cli_error(None, "serve", *model, env={"GIRANDOLE_RATE_LIMIT_TPM": "9" * 23})
    assert "argument --rate-limit-tpm:" in err, err


def test_key_names_with_control_characters_are_refused_and_listed_escaped(guarded):
    before = cli(guarded.data_dir, "keys", "list", "--json")
    for name in ("a\nb\x1b[31mred", "tab\there", "bell\x07"):
        err = cli_error(guarded.data_dir, "keys", "create", "--account", ACCOUNT, "--name", name)
        assert "argument --name:" in err and "control" in err, err
    assert cli(guarded.data_dir, "keys", "list", "--json") == before  # no key made
    err = cli_error(guarded.data_dir, "keys", "list", "--account", "\udcff")  # argv byte 0xff
    assert "--account is not valid UTF-8" in err, err
    info = new_key(guarded.data_dir, ACCOUNT, "--name", "café ☕")  # printable, if not ASCII
    assert "café ☕" in cli(guarded.data_dir, "keys", "list")
    # a name stored before they were refused is listed escaped: no line break, no escape code
    set_key_row(guarded, info["id"], name="x\n\x1b[31mred")
    listing = cli(guarded.data_dir, "keys", "list")
    assert "\x1b" not in listing and "x\\n\\x1b[31mred" in listing, listing
    assert len(listing.splitlines()) == len(json.loads(before)) + 2  # the header, one a key
    cli(guarded.data_dir, "keys", "revoke", info["id"])


def _open_stream(srv, key: str, max_tokens: int):
    """A streaming request that is in the engine once this returns (its first chunk came)."""
    cm = httpx.stream(
        "POST", srv.url + "/v1/completions", timeout=300,
        json={"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True,
              "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    )  # fmt: skip
    response = cm.__enter__()
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            break
    return cm, response, lines


def wait_queued(srv, timeout: float = 30) -> None:
    """Until a request waits in the admission queue (a fixed sleep may end before a busy machine
    has sent it, or after its queue timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        line = next(x for x in metrics.splitlines() if x.startswith("girandole_requests_queued "))
        if float(line.split()[1]) >= 1:
            return
        assert time.monotonic() < deadline, line
        time.sleep(0.02)


def test_queue_overflow_429_then_timeout_503(guarded):
    key = guarded.keys["alice"]["key"]
    # The slot is held by an open stream (closed at the end, which aborts it): no race with
    # the machine's speed.
    cm, holder, _ = _open_stream(guarded, key, 8000)
    try:
        assert holder.status_code == 200
        waiter: list = []
        queued = threading.Thread(target=lambda: waiter.append(complete(guarded, key)))
        queued.start()
        wait_queued(guarded)  # now in the queue (1 place), for 1 s: the next one overflows
        overflow = complete(guarded, key)
        assert overflow.status_code == 429, overflow.text
        assert "at capacity" in overflow.json()["error"]["message"]
        queued.join(30)
        assert waiter[0].status_code == 503, waiter[0].text  # waited 1 s, the slot stayed taken
        assert "saturated" in waiter[0].json()["error"]["message"]
    finally:
        cm.__exit__(None, None, None)
    metrics = httpx.get(guarded.url + "/metrics").text
    assert 'girandole_requests_total{endpoint="completions",status="429"}' in metrics
    assert 'girandole_requests_total{endpoint="completions",status="503"}' in metrics
    deadline = time.monotonic() + 60
    while guarded.health()["engine"]["num_running"]:  # the abort frees the slot
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert complete(guarded, key).status_code == 200  # serving again


def test_prompt_cache_scope_key(guarded):
    """--prompt-cache-scope key: a key reuses its own cached prompt blocks, never another's,
    even of its own account (the default, account, shares those: test_api_sampling)."""
    prompt = f"{time.time_ns()} a prompt of several cache blocks. " * 12
    alice, carol = guarded.keys["alice"]["key"], new_key(guarded.data_dir, ACCOUNT)["key"]

    def cached(key: str, **body) -> int:
        r = complete(guarded, key, prompt=prompt, max_tokens=1, **body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(alice) == 0
    assert cached(alice) > 0
    assert cached(carol) == 0  # the same account, another key
    assert cached(carol) > 0
    # an isolation key divides a key's scope, and never reaches into another key's
    assert cached(carol, prompt_cache_isolation_key="shared") == 0
    assert cached(alice, prompt_cache_isolation_key="shared") == 0


def test_metrics_ready_and_request_ids(guarded):
    r = complete(guarded, guarded.keys["alice"]["key"], stream=True)
    assert r.status_code == 200
    metrics = httpx.get(guarded.url + "/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    for name in (
        'girandole_requests_total{endpoint="completions",status="200"}',
        "girandole_prompt_tokens_total",
        "girandole_completion_tokens_total",
        "girandole_time_to_first_token_seconds_bucket",
        "girandole_inter_token_latency_seconds_bucket",
        "girandole_num_requests_running",
        "girandole_num_requests_waiting",
        "girandole_kv_cache_usage_ratio",
        "girandole_prefix_cache_hit_rate",
        "girandole_engine_threads",
    ):
        assert name in text, name
    assert httpx.get(guarded.url + "/ready").json() == {"status": "ready"}
    # x-request-id: echoed on successes and errors alike; JSON access lines carry it
    for key in (guarded.keys["alice"]["key"], None):
        r = httpx.post(
            guarded.url + "/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 1},
            headers={"x-request-id": "trace-123", **({"Authorization": f"Bearer {key}"} if key else {})},
            timeout=60,
        )  # fmt: skip
        assert r.headers["x-request-id"] == "trace-123"
    time.sleep(0.2)
    lines = [json.loads(x) for x in guarded.log().splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] == "girandole.access"]
    assert any(
        x.get("client_request_id") == "trace-123" or x["request_id"] == "trace-123" for x in access
    )
    assert all("request_id" in x and "status" in x for x in access)
    for info in guarded.keys.values():
        assert info["key"] not in guarded.log()  # keys never logged


def test_sigterm_drains_in_flight_requests_then_exits_0(guarded):
    key = guarded.keys["alice"]["key"]
    before = len(wait_rows(guarded, 0))
    cm, response, lines = _open_stream(guarded, key, 200)  # in flight when the signal comes
    try:
        guarded.process.send_signal(signal.SIGTERM)
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    finally:
        cm.__exit__(None, None, None)
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 200  # ran to its end
    assert guarded.process.wait(60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(guarded.url + "/health", timeout=2)
    rows = usage_rows(guarded)
    assert len(rows) == before + 1  # recorded before exit
    assert rows[-1][0] == chunks[-1]["id"] and rows[-1][5] == 0
