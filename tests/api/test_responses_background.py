"""Background responses (`background: true`, `girandole.api.responses.background`) on the real
server and default model, driven by the openai SDK and raw HTTP: queued -> in_progress ->
completed with the answer a synchronous request gives, cancel (idempotent; the engine work
stops), a stream dropped and picked up again with `starting_after`, chaining, delete, the
4xx, a failed run, and a server that stops or crashes with responses running."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time

import httpx
import openai
import pytest
from api_helpers import API_KEY, MODEL, usage_row
from conftest import start_server, stop_server
from mcp_server import start_mcp_servers

from girandole.registry.keystore import Database

pytestmark = pytest.mark.slow

STORY = "Write a long story about a lighthouse keeper."
TERMINAL = ("completed", "incomplete", "failed", "cancelled")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/inference/v1", api_key=API_KEY, max_retries=0)


def wait_for(client: openai.OpenAI, response_id: str, statuses, timeout: float = 120):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        r = client.responses.retrieve(response_id)
        if not seen or seen[-1] != r.status:
            seen.append(r.status)
        if r.status in statuses:
            return r, seen
        assert time.monotonic() < deadline, f"{response_id} stayed {r.status}"
        time.sleep(0.05)


def wait_for_text(client: openai.OpenAI, response_id: str) -> None:
    """Until a running background response has written some text: its events, replayed from
    the start, then as they come, up to the first text delta."""
    with client.responses.retrieve(response_id, stream=True) as events:
        for event in events:
            if event.type == "response.output_text.delta":
                return
    raise AssertionError(f"{response_id} ended before any text")


def follow(client: openai.OpenAI, response_id: str, seen: list[str], started: threading.Event):
    """A background response's events, from the start, into `seen` (`started` set at the
    first); what ends them otherwise, named."""
    try:
        for event in client.responses.retrieve(response_id, stream=True):
            seen.append(event.type)
            started.set()
    except Exception as exc:  # noqa: BLE001 - what the client saw
        seen.append(repr(exc))
    started.set()


def post(server, path: str, body: dict | None = None, key: str = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def test_runs_in_the_background_to_the_synchronous_answer(client, server):
    ask = dict(model=MODEL, input="What is the capital of France?", max_output_tokens=12,
               temperature=0, metadata={"case": "bg"})  # fmt: skip
    queued = client.responses.create(**ask, background=True)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    assert queued.usage is None and queued.metadata == {"case": "bg"}
    done, seen = wait_for(client, queued.id, TERMINAL)
    assert seen[-1] in ("completed", "incomplete") and "failed" not in seen
    assert set(seen) <= {"queued", "in_progress", "completed", "incomplete"}
    sync = client.responses.create(**ask)
    assert sync.background is False
    assert done.output_text and done.output_text == sync.output_text
    assert done.usage.input_tokens == sync.usage.input_tokens
    assert done.usage.output_tokens == sync.usage.output_tokens
    assert (done.id, done.created_at, done.background) == (queued.id, queued.created_at, True)
    # one usage row, the run's (the POST that queued it writes none)
    (row,) = usage_row(server, done.id)  # (endpoint, status, prompt, completion tokens)
    assert row == ("responses", 200, done.usage.input_tokens, done.usage.output_tokens)
    page = httpx.get(server.url + "/v1/responses?limit=100", headers=server.headers).json()
    listed = [r["id"] for r in page["data"]]  # newest first; saved again, it keeps its place
    assert listed.count(done.id) == 1 and listed.index(sync.id) < listed.index(done.id)


def test_cancel_stops_the_work_and_is_idempotent(client, server):
    r = client.responses.create(model=MODEL, input=STORY, max_output_tokens=2000, temperature=0,
                                background=True)  # fmt: skip
    wait_for_text(client, r.id)  # some output tokens (a fixed wait may see none on a busy CPU)
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and cancelled.id == r.id
    assert 0 < cancelled.usage.output_tokens < 2000
    (item,) = cancelled.output  # the text as far as it went
    assert item.type == "message" and item.status == "incomplete" and cancelled.output_text
    again = client.responses.cancel(r.id)  # idempotent: the ended response as it is
    assert again.model_dump() == cancelled.model_dump()
    assert client.responses.retrieve(r.id).status == "cancelled"
    (row,) = usage_row(server, r.id)
    assert row == ("responses", 499, cancelled.usage.input_tokens, cancelled.usage.output_tokens)
    health = server.wait_idle()  # the engine request was aborted, not left running
    assert health["engine"]["num_running"] == 0


def test_a_dropped_stream_is_picked_up_again(client):
    ask = dict(model=MODEL, input="Tell me about Rome.", max_output_tokens=24, temperature=0)
    stream = client.responses.create(**ask, background=True, stream=True)
    first = []
    for event in stream:
        first.append(event)
        if len(first) == 7:
            break
    stream.close()  # the connection drops: the response runs on
    kinds = [e.type for e in first]
    assert kinds[:4] == ["response.created", "response.queued", "response.in_progress",
                         "response.output_item.added"]  # fmt: skip
    assert first[0].response.status == "queued" and first[0].response.background is True
    assert [e.sequence_number for e in first] == list(range(7))
    rid, last = first[0].response.id, first[-1].sequence_number
    rest = list(client.responses.retrieve(rid, stream=True, starting_after=last))
    assert [e.sequence_number for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1].type == "response.completed"
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    final = client.responses.retrieve(rid)
    assert final.status in ("completed", "incomplete") and text == final.output_text
    assert rest[-1].response.model_dump() == final.model_dump()
    # the whole stream again, from the start; and the same events as a synchronous stream
    replay = list(client.responses.retrieve(rid, stream=True))
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in first + rest]
    sync = list(client.responses.create(**ask, stream=True))
    assert [e.type for e in sync] == [k for k in (e.type for e in replay) if k != "response.queued"]


def test_chaining_waits_for_the_end_and_delete_cancels(client, server):
    r = client.responses.create(model=MODEL, input=STORY, max_output_tokens=2000, temperature=0,
                                background=True)  # fmt: skip
    wait_for(client, r.id, ("in_progress", *TERMINAL))
    follow = post(server, "/v1/responses", {"model": MODEL, "input": "Go on.",
                                             "previous_response_id": r.id})  # fmt: skip
    assert follow.status_code == 400, follow.text
    error = follow.json()["error"]
    assert error["param"] == "previous_response_id" and "in_progress" in error["message"]
    client.responses.delete(r.id)  # stops it, then deletes it
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert server.wait_idle()["engine"]["num_running"] == 0
    # an ended background response chains as any other
    short = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, background=True)
    wait_for(client, short.id, TERMINAL)
    chained = client.responses.create(model=MODEL, input="Again", max_output_tokens=4,
                                      previous_response_id=short.id)  # fmt: skip
    assert chained.previous_response_id == short.id


def test_errors(client, server):
    sync = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    bg_no_store = {"model": MODEL, "input": "x", "background": True, "store": False}
    stream_sync = server.url + f"/v1/responses/{sync.id}?stream=true"
    cases = [
        (post(server, "/v1/responses", bg_no_store), 400, "background"),
        (post(server, f"/v1/responses/{sync.id}/cancel"), 400, "response_id"),
        (post(server, "/v1/responses/resp_nope/cancel"), 404, None),
        (httpx.get(stream_sync, headers=server.headers), 400, "stream"),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param
    assert "synchronous" in cases[1][0].json()["error"]["message"]
    # a 400 found while preparing it (after the body was read): the request's usage row, as a
    # synchronous request's
    bad_schema = {"model": MODEL, "input": "x", "background": True, "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "strin"}}}}  # fmt: skip
    refused = post(server, "/v1/responses", bad_schema)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "text.format"
    assert usage_row(server, refused.json()["request_id"]) == [("responses", 400, 0, 0)]
    bad = httpx.get(server.url + f"/v1/responses/{sync.id}?stream=true&starting_after=-2",
                    headers=server.headers)  # fmt: skip
    assert bad.status_code == 400 and "starting_after" in bad.text
    # another account's background response is not there to cancel or stream
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, background=True)
    data_dir = server.log_path.parent / f"data-{server.port}"
    other_key, _ = Database.in_folder(data_dir).create_key("other-account")
    assert post(server, f"/v1/responses/{r.id}/cancel", key=other_key).status_code == 404
    other = httpx.get(server.url + f"/v1/responses/{r.id}?stream=true",
                      headers={"Authorization": f"Bearer {other_key}"})  # fmt: skip
    assert other.status_code == 404
    wait_for(client, r.id, TERMINAL)


def test_a_run_that_fails_says_why(client):
    """A tool result past the context fails the second round: the response is `failed`, with
    the error, and its stream ends with `response.failed`."""
    mcp = start_mcp_servers(flood=True)
    try:
        tool = {"type": "mcp", "server_label": "calc", "server_url": mcp.http_url}
        stream = client.responses.create(
            model=MODEL, input="Describe a lighthouse.", tools=[tool],
            tool_choice={"type": "mcp", "server_label": "calc", "name": "flood"},
            max_output_tokens=40, temperature=0, background=True, stream=True,
        )  # fmt: skip
        events = list(stream)
    finally:
        mcp.stop()
    assert events[-1].type == "response.failed", [e.type for e in events]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "invalid_prompt"
    assert "too long" in failed.error.message
    assert [o.type for o in failed.output] == ["mcp_list_tools", "mcp_call"]
    assert client.responses.retrieve(failed.id).model_dump() == failed.model_dump()


def stored_status(data_dir, response_id: str) -> dict:
    with sqlite3.connect(data_dir / "girandole.db") as db:
        (body,) = db.execute("SELECT body FROM responses WHERE id = ?", (response_id,)).fetchone()
    return json.loads(body)


def test_a_server_that_stops_or_crashes_fails_its_running_responses(tmp_path):
    """Also: with no room in the admission queue (one slot, no queue), a background response
    stays queued until there is (where a request would get a 429)."""
    data = tmp_path / "data"
    args = ("--data-dir", str(data), "--kv-cache-gb", "0.2", "--drain-seconds", "2",
            "--max-concurrent-requests", "1", "--max-queued-requests", "0")  # fmt: skip
    first = start_server(tmp_path, *args, api_key=None)
    try:
        c = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0)
        crashed = c.responses.create(model=MODEL, input=STORY, temperature=0,
                                     max_output_tokens=2000,
                                     background=True)  # fmt: skip
        wait_for(c, crashed.id, ("in_progress",))
    finally:
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
    second = start_server(tmp_path, *args, api_key=None)
    try:
        c = openai.OpenAI(base_url=second.url + "/v1", api_key="x", max_retries=0)
        after_crash = c.responses.retrieve(crashed.id)  # failed when the server started again
        assert after_crash.status == "failed" and after_crash.error.code == "server_error"
        with pytest.raises(openai.BadRequestError, match="no longer kept"):
            list(c.responses.retrieve(crashed.id, stream=True))
        ahead = c.responses.create(model=MODEL, input=STORY, temperature=0,
                                   max_output_tokens=2000, background=True)  # fmt: skip
        wait_for(c, ahead.id, ("in_progress",))
        stopped = c.responses.create(model=MODEL, input=STORY, temperature=0,
                                     max_output_tokens=2000,
                                     background=True)  # fmt: skip
        with pytest.raises(openai.RateLimitError):  # a request now: no room, no queue
            c.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
        time.sleep(2)
        assert c.responses.retrieve(stopped.id).status == "queued"
        assert c.responses.cancel(ahead.id).status == "cancelled"  # room: it runs
        wait_for_text(c, stopped.id)  # running, with output tokens when the server stops
        # a client following it: its stream ends with the failure when the drain period does,
        # as a synchronous stream's ends with an error event (not cut with the connection)
        followed: list[str] = []
        following = threading.Event()
        follower = threading.Thread(target=follow, args=(c, stopped.id, followed, following))
        follower.start()
        assert following.wait(60)
        # one still queued (no room), asking again every few seconds, followed too: its
        # stream ends with the failure as soon as the stop begins, not cut by the drain's end
        waiting = c.responses.create(model=MODEL, input="Hi", max_output_tokens=8,
                                     background=True)  # fmt: skip
        time.sleep(4)  # its retries 0.5, 1, 2 s apart: asleep for up to 4 s
        assert c.responses.retrieve(waiting.id).status == "queued"
        waited: list[str] = []
        waiting_followed = threading.Event()
        queued_follower = threading.Thread(
            target=follow, args=(c, waiting.id, waited, waiting_followed)
        )
        queued_follower.start()
        assert waiting_followed.wait(60)
    finally:
        stop_server(second)  # SIGTERM: a clean stop
    follower.join(30)
    assert followed[-1] == "response.failed", followed[-3:]
    body = stored_status(data, stopped.id)
    assert body["status"] == "failed" and body["error"]["code"] == "server_error"
    assert "stopped" in body["error"]["message"] and body["usage"]["output_tokens"] > 0
    queued_follower.join(30)
    assert waited[-1] == "response.failed", waited[-3:]
    body = stored_status(data, waiting.id)
    assert body["status"] == "failed" and "stopped" in body["error"]["message"]
    assert body["output"] == []


def test_background_responses_waiting_for_admission_are_bounded(monkeypatch):
    """A background request answers at once and waits, `queued`, for the server's capacity;
    past MAX_WAITING such responses a new one is a 429 (a flood piled up queued runs, each
    with its prepared prompt, without a bound). Admitted and ended ones do not count."""
    from girandole.api.http.errors import APIError
    from girandole.api.responses import background

    monkeypatch.setattr(background, "MAX_WAITING", 3)
    runs = background.BackgroundResponses()
    for i in range(2):
        runs.runs[f"queued{i}"] = background.BackgroundRun(f"queued{i}", "acct")
    runs.runs["admitted"] = background.BackgroundRun("admitted", "acct", admitted=True)
    runs.runs["ended"] = background.BackgroundRun("ended", "acct", ended=1.0)
    runs.check_room()  # two wait
    runs.runs["queued2"] = background.BackgroundRun("queued2", "acct")
    with pytest.raises(APIError) as err:
        runs.check_room()
    assert err.value.status_code == 429 and "3 background responses" in err.value.message
