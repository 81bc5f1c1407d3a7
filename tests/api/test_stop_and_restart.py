"""Servers stopped (SIGTERM, SIGINT, SIGKILL) with work in flight, and started again on the same
--data-dir, mostly on tiny models: a second server on a folder in use is refused, while a
restart after a kill is not; a request the drain period cuts is answered 503, and so is what
runs at a second Ctrl-C; a request still queued when the stop begins is refused at once. On the
default model (slow): a stop while it loads exits 0, and a kill while its GGUF is written leaves
no partial file in the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ROOT, start_server, stop_server, write_eos_model, write_tiny_llama_for_ops
from loopback import free_port


def test_a_second_server_on_a_data_dir_in_use_is_refused(tmp_path):
    """Two servers on one folder: the second's start-up took the first's running background
    responses for a dead server's and failed them (and its batch runner ran the first's jobs
    again). It now stops at once naming --data-dir and the holder; once the holder is killed
    (SIGKILL: no clean-up) the folder is free again."""
    model = write_eos_model(tmp_path / "eos")
    data = tmp_path / "data"
    args = ("--model", str(model), "--model-id", "tiny-eos", "--kv-cache-gb", "0.01",
            "--data-dir", str(data))  # fmt: skip
    first = start_server(tmp_path, *args, api_key=None)
    try:
        cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(free_port()), *args]
        try:  # the old code served (no exit): the timeout only ends that
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise AssertionError("a second server started on a --data-dir in use") from None
        assert second.returncode == 2, second.stderr[-2000:]
        assert "--data-dir" in second.stderr and "in use" in second.stderr, second.stderr
        assert f"pid {first.process.pid}" in second.stderr, second.stderr
        assert first.health()["status"] == "ready"  # the first one is untouched
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
        again = start_server(tmp_path, *args, api_key=None)  # the lock died with its holder
        try:
            r = httpx.post(
                again.url + "/v1/completions",
                json={"model": "tiny-eos", "prompt": "hi", "max_tokens": 2},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        finally:
            stop_server(again)
    finally:
        if first.process.poll() is None:
            stop_server(first)


def _busy_server(tmp_path, drain: str):
    """A random tiny Llama generating until max_tokens (ignore_eos): work that outlasts a drain."""
    model = write_tiny_llama_for_ops(tmp_path / "tiny")
    return start_server(
        tmp_path, "--model", str(model), "--model-id", "tiny", "--account", "testing",
        "--kv-cache-gb", "0.05", "--max-model-len", "8192", "--drain-seconds", drain,
        api_key=None,
    )  # fmt: skip


LONG = {"model": "accounts/testing/models/tiny", "prompt": "x", "max_tokens": 8000,
        "ignore_eos": True, "temperature": 1.0}  # fmt: skip


def _in_flight(fn) -> tuple[threading.Thread, list]:
    """Run `fn` on a thread (its result or exception lands in the list)."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _wait_running(server, n: int) -> None:
    deadline = time.monotonic() + 60
    while server.health()["engine"]["num_running"] < n:
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.05)


def _last_event(url: str) -> dict:
    with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=120) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    return json.loads(data[-1])


def test_a_request_the_drain_period_cuts_is_answered_503(tmp_path):
    """SIGTERM with a non-streamed request that outlasts --drain-seconds: uvicorn cancelled it
    at the deadline and the client got its bare text `500 Internal Server Error` (a traceback
    in the log); it now gets a 503 UNAVAILABLE body saying why, as a stream's error event."""
    server = _busy_server(tmp_path, "2")
    try:
        url = server.url + "/v1/completions"
        thread, out = _in_flight(lambda: httpx.post(url, json=LONG, timeout=120))
        _wait_running(server, 1)
        server.process.send_signal(signal.SIGTERM)
        thread.join(120)
        assert server.process.wait(60) == 0
    finally:
        if server.process.poll() is None:
            stop_server(server)
    (r,) = out
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "UNAVAILABLE" and "drain period ended" in error["message"], error
    assert r.headers["retry-after"] == "1"
    assert "Traceback" not in server.log()


def test_a_second_ctrl_c_ends_what_runs_with_an_error_not_a_cut(tmp_path):
    """Ctrl-C twice (uvicorn's forced stop: no drain): a stream was cut with its connection
    (no end, the client's 'incomplete chunked read') and a request not yet answered got a bare
    500. Both now end with a 503 error saying the server stopped, and the process exits 0
    long before the drain period (60 s) would have ended."""
    server = _busy_server(tmp_path, "60")
    try:
        url = server.url + "/v1/completions"
        streamed, stream_out = _in_flight(lambda: _last_event(url))
        plain, plain_out = _in_flight(lambda: httpx.post(url, json=LONG, timeout=120))
        _wait_running(server, 2)
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.5)  # the first one handled: draining (its answer is not observable)
        server.process.send_signal(signal.SIGINT)
        streamed.join(60)
        plain.join(60)
        assert server.process.wait(30) == 0  # not the 60 s of the drain
    finally:
        if server.process.poll() is None:
            stop_server(server)
    (event,) = stream_out
    assert isinstance(event, dict), event
    assert event["error"]["code"] == "UNAVAILABLE", event
    assert "stopped before this response was done" in event["error"]["message"]
    (r,) = plain_out
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE", r.text


@pytest.mark.slow
def test_a_server_stopped_while_its_model_loads_exits_0(tmp_path):
    """SIGTERM while the default model loads (an empty cache folder: the GGUF is assembled,
    parsed and its tokenizer converted, tens of seconds): the process aborted at the
    interpreter's exit under the loading thread (SIGABRT, exit -6, "terminate called without
    an active exception"). A stop is a clean stop whatever the load is doing: exit 0."""
    port = free_port()
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(port),
           "--kv-cache-gb", "0.2", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    env = dict(os.environ, GIRANDOLE_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:  # the socket opens at once; the model loads behind it
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert health.json()["status"] == "loading", health.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "terminate called" not in log_path.read_text()


@pytest.mark.slow
def test_the_default_model_a_killed_server_was_writing_is_not_left_in_the_cache(
    tmp_path, monkeypatch
):
    """kill -9 while the first start writes the default GGUF into an empty cache folder: its
    `.part<pid>` (253 MB) stayed there for good, beside the file the next start wrote. The
    next start now removes what a dead process left.

    The next start is stopped (SIGTERM) once its own GGUF is in place: what follows (parsing
    the GGUF, converting its tokenizer, packing its weights: some 25 s of a cold cache) adds
    nothing to the cache's models folder; a cold start that runs to ready is
    tests/test_wheel.py's `server`."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GIRANDOLE_CACHE_DIR", str(cache))
    models = cache / "models"
    cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(free_port()),
           "--kv-cache-gb", "0.2", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not list(models.glob("*.part*")):  # being written
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait(10)
    (left,) = models.glob("*.part*")  # left behind
    log_path = tmp_path / "next-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (models / "gemma-3-270m-Q4_K_M.gguf").exists():  # its own .part renamed
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, sorted(p.name for p in models.iterdir())
            time.sleep(0.05)
        assert not left.exists()  # removed before the GGUF was written
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert [p.name for p in models.iterdir()] == ["gemma-3-270m-Q4_K_M.gguf"]


def test_a_request_queued_when_the_stop_begins_is_refused_at_once(tmp_path):
    """One slot, held by a long stream; a request queued behind it when SIGTERM comes waited
    the whole drain period for its slot (never freed) and got the drain's 503 at its end. It is
    refused at once now, while the stream still runs, so its client can retry elsewhere."""
    model = write_tiny_llama_for_ops(tmp_path / "tiny")
    server = start_server(
        tmp_path, "--model", str(model), "--model-id", "tiny", "--account", "testing",
        "--kv-cache-gb", "0.05", "--max-model-len", "8192", "--drain-seconds", "6",
        "--max-concurrent-requests", "1", api_key=None,
    )  # fmt: skip
    try:
        url = server.url + "/v1/completions"
        streamed, stream_out = _in_flight(lambda: _last_event(url))
        _wait_running(server, 1)
        short = {**LONG, "max_tokens": 2}
        queued, queued_out = _in_flight(lambda: httpx.post(url, json=short, timeout=120))
        deadline = time.monotonic() + 60
        while "girandole_requests_queued 1" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline and queued.is_alive()
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        queued.join(120)
        assert streamed.is_alive()  # answered while the stream still runs
        streamed.join(120)
        assert server.process.wait(60) == 0
    finally:
        if server.process.poll() is None:
            stop_server(server)
    (r,) = queued_out
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text
    (event,) = stream_out
    assert event["error"]["code"] == "UNAVAILABLE", event  # the stream: cut at the drain's end
