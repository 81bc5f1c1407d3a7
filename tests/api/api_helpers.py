"""Small helpers for the API tests: posting, and reading an SSE stream as the wire shows it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-1"
OTHER_KEY = "test-key-2"
ACCOUNT = "fireworks"
MODEL_ID = "gemma-3-270m"
MODEL = f"accounts/{ACCOUNT}/models/{MODEL_ID}"
DEPLOYMENT = f"accounts/{ACCOUNT}/deployments/{MODEL_ID}"
# A function's parameters with bounded values (a forced call's output stays short).
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}  # fmt: skip


DEFAULT_MAX_TOKENS = 16  # Fireworks' default for /v1/completions


def assert_default_length(finish_reason: str | None, completion_tokens: int) -> None:
    """A completion without max_tokens runs to the default 16 tokens, unless the model samples
    its end of text first (the default temperature is 1, so now and then it does). An end of
    text sampled as the 16th token is a stop too: it is counted, as every EOS is."""
    if finish_reason == "length":
        assert completion_tokens == DEFAULT_MAX_TOKENS
    else:
        assert finish_reason == "stop" and 0 < completion_tokens <= DEFAULT_MAX_TOKENS


def post(server, body: dict[str, Any] | bytes | str, path: str = "/v1/completions", **kw):
    headers = dict(server.headers)
    headers.update(kw.pop("headers", {}))
    if isinstance(body, dict):
        body = (
            {"model": MODEL, **body} if "model" not in body and kw.pop("add_model", True) else body
        )
        return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kw)
    return httpx.post(server.url + path, content=body, headers=headers, timeout=120, **kw)


def sse_events(server, body: dict[str, Any], path: str = "/v1/completions") -> list[Any]:
    """Every `data:` payload of a streamed completion, JSON-decoded ('[DONE]' kept as a string)."""
    events: list[Any] = []
    with httpx.stream(
        "POST", server.url + path, json={"model": MODEL, "stream": True, **body},
        headers=server.headers, timeout=120,
    ) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode("utf-8")
    assert raw.endswith("\n\n")
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def named_events(server, path: str, body: dict[str, Any]) -> list[tuple[str | None, dict]]:
    """A stream whose events are named (Anthropic Messages, OpenAI Responses): (event, data)."""
    events, name = [], None
    with httpx.stream("POST", server.url + path, json=body, headers=server.headers,
                      timeout=120) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.removeprefix("data:"))))
    return events


def api_conftest():
    """tests/api/conftest.py by path: a bare `import conftest` finds whichever conftest module
    another test folder put first on sys.path when the whole suite runs."""
    name = "_girandole_api_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


USAGE_COLUMNS = "endpoint, status, prompt_tokens, completion_tokens"


def usage_row(
    server, request_id: str, timeout: float = 10, columns: str = USAGE_COLUMNS
) -> list[tuple]:
    """The usage rows (`columns`: endpoint, status, prompt and completion tokens) of one
    request in the server's keys database (`--data-dir` as `start_server` sets it), once
    written."""
    import sqlite3
    import time

    db = server.log_path.parent / f"data-{server.port}" / "girandole.db"
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                f"SELECT {columns} FROM usage WHERE request_id = ?", (request_id,),
            ).fetchall()  # fmt: skip
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def npm_install(folder: Path, what: str) -> None:
    """`npm install` in `folder` (its package.json); a skip when npm is missing."""
    import shutil
    import subprocess

    import pytest

    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: cannot install {what}")
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund"], cwd=folder, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def cli_runner(url: str, key: str, account: str) -> Callable[..., subprocess.CompletedProcess]:
    """`girandole <args>` as a subprocess, its connection variables (GIRANDOLE_BASE_URL, ...)
    naming a test server: how the CLIs that talk to a server are tested."""
    import os

    env = {
        **os.environ,
        "GIRANDOLE_BASE_URL": url,
        "GIRANDOLE_API_KEY": key,
        "GIRANDOLE_ACCOUNT": account,
    }

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "girandole.cli", *args],
            capture_output=True, text=True, env=env, timeout=240,
        )  # fmt: skip

    return run
