"""Webhooks (`girandole.api.ops.webhooks`): a real server with `--webhook-url` pointing at a
receiver of the test's own, the default model: a background response that completes, one that
is cancelled and an OpenAI batch each send one signed event, which the openai SDK's
`client.webhooks.unwrap` verifies; a refused delivery is tried again with the same id; a
synchronous response sends none; a response a crash left running sends `response.failed` when
the next server starts; bad settings stop the server at start-up."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from api_helpers import MODEL
from conftest import start_server, stop_server
from loopback import free_port

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"girandole-webhook-test-key-32byt").decode()


class Receiver:
    """An HTTP endpoint that records every POST; the first `refuse` get a 500."""

    def __init__(self, refuse: int = 0) -> None:
        self.posts: list[tuple[dict[str, str], bytes, int]] = []
        self.refuse = refuse
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(receiver.posts) < receiver.refuse else 200
                receiver.posts.append((dict(self.headers.items()), body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # bound here: no race
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def delivered(self, object_id: str, timeout: float = 60) -> list[tuple[dict, bytes, int]]:
        """The POSTs about `object_id`, once one of them was answered 200."""
        deadline = time.monotonic() + timeout
        while True:
            about = [p for p in self.posts if json.loads(p[1])["data"]["id"] == object_id]
            if any(status == 200 for _, _, status in about):
                return about
            assert time.monotonic() < deadline, f"no webhook for {object_id}: {self.posts}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    receiver = Receiver(refuse=1)
    tmp = tmp_path_factory.mktemp("webhooks")
    srv = start_server(tmp, "--kv-cache-gb", "0.2", "--webhook-url", receiver.url,
                       "--webhook-secret", SECRET, api_key=None)  # fmt: skip
    yield srv, receiver
    stop_server(srv)
    receiver.server.shutdown()


def unwrap(headers: dict[str, str], body: bytes):
    verifier = openai.OpenAI(api_key="x", webhook_secret=SECRET)
    return verifier.webhooks.unwrap(body.decode(), {k.lower(): v for k, v in headers.items()})


def wait_ended(client: openai.OpenAI, response_id: str) -> str:
    deadline = time.monotonic() + 120
    while (status := client.responses.retrieve(response_id).status) in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return status


def test_events_are_signed_sent_and_retried(hooked):
    srv, receiver = hooked
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    sync = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, background=True)
    status = wait_ended(client, r.id)
    refused, delivered = receiver.delivered(r.id)  # the first answer was a 500: sent again
    assert (refused[2], delivered[2]) == (500, 200)
    assert refused[0]["webhook-id"] == delivered[0]["webhook-id"]
    event = unwrap(delivered[0], delivered[1])  # the SDK checks the signature
    assert event.type == f"response.{status}" and event.data.id == r.id
    assert event.id == delivered[0]["webhook-id"] and event.object == "event"
    with pytest.raises(Exception, match="signature"):
        tampered = delivered[1].replace(r.id.encode(), b"resp_" + b"0" * 32)
        unwrap(delivered[0], tampered)
    # a cancelled one
    long = client.responses.create(model=MODEL, input="Write a long story.", temperature=0,
                                   max_output_tokens=2000, background=True)  # fmt: skip
    while client.responses.retrieve(long.id).status == "queued":
        time.sleep(0.05)
    client.responses.cancel(long.id)
    ((headers, body, _),) = receiver.delivered(long.id)
    assert unwrap(headers, body).type == "response.cancelled"
    # an OpenAI batch
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                     "max_tokens": 2}}  # fmt: skip
    uploaded = client.files.create(file=("a.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    ((headers, body, _),) = receiver.delivered(batch.id)
    event = unwrap(headers, body)
    assert event.type == "batch.completed" and event.data.id == batch.id
    assert client.batches.retrieve(batch.id).status == "completed"
    # the synchronous response sent nothing
    assert not [p for p in receiver.posts if json.loads(p[1])["data"]["id"] == sync.id]


def test_a_crashed_server_s_responses_send_theirs_at_the_next_start(tmp_path):
    """A server killed with a background response running sent no event for it: the next start
    on its --data-dir fails it, and sends `response.failed` then."""
    receiver = Receiver()
    args = ("--data-dir", str(tmp_path / "data"), "--kv-cache-gb", "0.2",
            "--webhook-url", receiver.url, "--webhook-secret", SECRET)  # fmt: skip
    first = start_server(tmp_path, *args, api_key=None)
    try:
        client = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0)
        r = client.responses.create(model=MODEL, input="Write a long story.", temperature=0,
                                    max_output_tokens=2000, background=True)  # fmt: skip
    finally:
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
    second = start_server(tmp_path, *args, api_key=None)
    try:
        ((headers, body, _),) = receiver.delivered(r.id)
        event = unwrap(headers, body)
        assert event.type == "response.failed" and event.data.id == r.id
        client = openai.OpenAI(base_url=second.url + "/v1", api_key="x", max_retries=0)
        assert client.responses.retrieve(r.id).status == "failed"
    finally:
        stop_server(second)
        receiver.server.shutdown()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--webhook-url", "http://127.0.0.1:9/x"], "needs --webhook-secret"),
        (["--webhook-url", "http://127.0.0.1:9/x", "--webhook-secret", "nope"], "whsec_"),
        (["--webhook-url", "ftp://x", "--webhook-secret", SECRET], "http:// or https://"),
        # httpx cannot parse it: every delivery would fail (its task died unseen)
        (["--webhook-url", "http://127.0.0.1:80a/x", "--webhook-secret", SECRET], "valid URL"),
        (["--webhook-url", "http://", "--webhook-secret", SECRET], "with a host"),
    ],
)
def test_bad_settings_stop_the_server(args, words):
    done = subprocess.run(
        [sys.executable, "-m", "girandole.cli", "serve", "--port", str(free_port()), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and words in done.stderr, done.stderr[-2000:]
