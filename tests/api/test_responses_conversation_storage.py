"""How stored responses that ran on a conversation (Conversations API) are kept
(registry/conversation_refs.py), on a real server and a tiny random Llama: each row holds its own
input and a reference to the conversation's items, not the conversation, and every read returns
what the whole conversation stored in the row returned: GET /v1/responses/{id}, its input_items,
a continuation with previous_response_id; after the conversation gets more items, loses one, or
is deleted. The frozen copies of deleted items go with the last response that reads them."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest
from conftest import start_store_server, stop_server

MODEL = "accounts/testing/models/tiny"
KEY = "conversation-storage-key"
TEXT = "lorem ipsum " * 40  # a turn's input, about 500 bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_store_server(tmp_path_factory.mktemp("conversation-storage"), KEY)
    yield srv
    stop_server(srv)


def call(server, method: str, path: str, **kwargs) -> httpx.Response:
    r = httpx.request(method, server.url + path, headers=server.headers, timeout=120, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def listed(server, path: str) -> list[dict]:
    """Every item of a list route, oldest first (`after` pages on)."""
    items: list[dict] = []
    while True:
        after = {"after": items[-1]["id"]} if items else {}
        page = call(server, "GET", path, params={"order": "asc", "limit": 100, **after})
        items += page["data"]
        if not page["has_more"]:
            return items


def turn(server, conv: str, text: str, **fields) -> dict:
    """A response on the conversation, waited for if in the background, and what it must read:
    the conversation's items before it and its input."""
    before = listed(server, f"/v1/conversations/{conv}/items")
    body = {"model": MODEL, "input": text, "conversation": conv, "max_output_tokens": 2,
            "truncation": "auto", **fields}  # fmt: skip
    if fields.get("stream"):
        with httpx.stream("POST", server.url + "/v1/responses", json=body,
                          headers=server.headers, timeout=120) as r:  # fmt: skip
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        response = json.loads(lines[-1][len("data: ") :])["response"]
    else:
        response = call(server, "POST", "/v1/responses", json=body)
    deadline = time.monotonic() + 120
    while response["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, response
        time.sleep(0.1)
        response = call(server, "GET", f"/v1/responses/{response['id']}")
    assert response["status"] in ("completed", "incomplete"), response
    after = listed(server, f"/v1/conversations/{conv}/items")
    response["expected_items"] = after[len(before) : len(after) - len(response["output"])]
    response["expected_items"] = before + response["expected_items"]
    return response


def rows(server) -> dict[str, tuple[int, str | None]]:
    """Each response's row: (bytes of its input_items, the conversation it refers to)."""
    db = sqlite3.connect(server.db_path)
    try:
        found = db.execute("SELECT id, length(input_items), conversation_id FROM responses")
        return {response_id: (size, conv) for response_id, size, conv in found}
    finally:
        db.close()


def frozen_items(server) -> int:
    db = sqlite3.connect(server.db_path)
    try:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM conversation_items WHERE conversation_id LIKE 'frozen_%'"
        ).fetchone()
        return count
    finally:
        db.close()


def check_reads(server, responses: list[dict]) -> None:
    for response in responses:
        got = call(server, "GET", f"/v1/responses/{response['id']}")
        assert got == {k: v for k, v in response.items() if k != "expected_items"}
        assert listed(server, f"/v1/responses/{response['id']}/input_items") == response[
            "expected_items"]  # fmt: skip


def test_responses_on_a_conversation_refer_to_it_and_read_as_before(server):
    first = {"type": "message", "role": "user", "content": "hello"}
    conv = call(server, "POST", "/v1/conversations", json={"items": [first]})["id"]
    responses = [turn(server, conv, f"turn 0 {TEXT}"),
                 turn(server, conv, f"turn 1 {TEXT}", stream=True),
                 turn(server, conv, f"turn 2 {TEXT}", background=True)]  # fmt: skip
    for k in range(3, 8):
        responses.append(turn(server, conv, f"turn {k} {TEXT}"))
    check_reads(server, responses)
    stored = rows(server)
    for response in responses:  # its own input item alone, and the reference
        size, referred = stored[response["id"]]
        assert referred == conv and size < len(TEXT) + 300, (size, referred)
    # the conversation changes: an item appended, items deleted (one every response read,
    # and one only the later ones read), then the conversation
    call(server, "POST", f"/v1/conversations/{conv}/items",
         json={"items": [{"type": "message", "role": "user", "content": "appended"}]})  # fmt: skip
    check_reads(server, responses)
    middle = responses[4]["expected_items"][-1]["id"]  # turn 4's input
    for item_id in (middle, responses[0]["expected_items"][0]["id"]):
        call(server, "DELETE", f"/v1/conversations/{conv}/items/{item_id}")
        check_reads(server, responses)
    assert frozen_items(server) > 0
    # a continuation with previous_response_id of a response on the conversation
    last = responses[-1]
    body = {"model": MODEL, "input": f"chained {TEXT}", "previous_response_id": last["id"],
            "max_output_tokens": 2, "truncation": "auto"}  # fmt: skip
    chained = call(server, "POST", "/v1/responses", json=body)
    chained_items = listed(server, f"/v1/responses/{chained['id']}/input_items")
    assert chained_items[:-1] == last["expected_items"] + last["output"]
    assert chained_items[-1]["content"][0]["text"] == f"chained {TEXT}"
    assert rows(server)[chained["id"]][0] < 2 * len(TEXT) + 600  # its own turn alone
    call(server, "DELETE", f"/v1/conversations/{conv}")
    check_reads(server, responses)
    assert listed(server, f"/v1/responses/{chained['id']}/input_items") == chained_items
    # another account reads none of them
    other = {"Authorization": f"Bearer {server.other_key}"}
    r = httpx.get(server.url + f"/v1/responses/{last['id']}/input_items", headers=other)
    assert r.status_code == 404
    # the frozen copies go with the responses that read them; the chained one keeps its items
    for response in responses:
        call(server, "DELETE", f"/v1/responses/{response['id']}")
    assert frozen_items(server) == 0
    assert listed(server, f"/v1/responses/{chained['id']}/input_items") == chained_items
