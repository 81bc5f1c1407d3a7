"""How stored responses keep a `previous_response_id` chain (registry/responses.py), on a real
server and a tiny random Llama: each turn is stored once (the bytes of a chain grow with its
length, not with its square), `input_items` and continuations read the whole conversation as
before, deleting a response that others continue from leaves them whole, background responses
store the same way, and rows written by the server before (whole conversation, no previous id,
an older table) still read and continue."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest
from conftest import start_store_server, stop_server

from girandole.registry.keystore import Database

MODEL = "accounts/testing/models/tiny"
KEY = "chain-storage-key"
TEXT = "lorem ipsum " * 40  # a turn's input, about 500 bytes

# Rows of the server's table before it stored chains as links (no previous_id column): each
# kept its whole conversation. Written before the server starts, as an upgraded server finds them.
OLD_TABLE = """CREATE TABLE responses (id TEXT PRIMARY KEY, account TEXT NOT NULL,
    created REAL NOT NULL, body TEXT NOT NULL, input_items TEXT NOT NULL)"""


def message(item_id: str, role: str, text: str) -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    content = [{"type": kind, "text": text}]
    return {"id": item_id, "type": "message", "role": role, "content": content,
            "status": "completed"}  # fmt: skip


def old_row(response_id: str, items: list[dict], output: list[dict]) -> tuple:
    body = {"id": response_id, "object": "response", "created_at": 1, "status": "completed",
            "model": MODEL, "output": output, "store": True, "background": False}  # fmt: skip
    return (response_id, "testing", time.time(), json.dumps(body), json.dumps(items))


OLD_A_IN = [message("msg_old_a_in", "user", "first question")]
OLD_A_OUT = [message("msg_old_a_out", "assistant", "first answer")]
OLD_B_IN = [*OLD_A_IN, *OLD_A_OUT, message("msg_old_b_in", "user", "second question")]
OLD_B_OUT = [message("msg_old_b_out", "assistant", "second answer")]


def write_old_rows(db: Database) -> None:
    db.execute(OLD_TABLE)
    for row in (old_row("resp_old_a", OLD_A_IN, OLD_A_OUT),
                old_row("resp_old_b", OLD_B_IN, OLD_B_OUT)):  # fmt: skip
        db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)", row)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_store_server(tmp_path_factory.mktemp("chain-storage"), KEY, write_old_rows)
    yield srv
    stop_server(srv)


def create(server, headers: dict | None = None, **fields) -> httpx.Response:
    body = {"model": MODEL, "max_output_tokens": 2, "truncation": "auto", **fields}
    return httpx.post(server.url + "/v1/responses", json=body,
                      headers=headers or server.headers, timeout=120)  # fmt: skip


def turn(server, text: str, previous: str | None = None, **fields) -> dict:
    extra = {"previous_response_id": previous} if previous is not None else {}
    r = create(server, input=text, **extra, **fields)
    assert r.status_code == 200, r.text
    return r.json()


def input_items(server, response_id: str) -> list[dict]:
    """GET /v1/responses/{id}/input_items, every page, oldest first."""
    items: list[dict] = []
    while True:
        after = {"after": items[-1]["id"]} if items else {}
        r = httpx.get(server.url + f"/v1/responses/{response_id}/input_items",
                      params={"order": "asc", "limit": 100, **after},
                      headers=server.headers, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        items += r.json()["data"]
        if not r.json()["has_more"]:
            return items


def rows(server, ids: list[str]) -> dict[str, tuple[int, str | None]]:
    """Each response's stored row: (bytes of its input_items, its previous_id)."""
    db = sqlite3.connect(server.db_path)
    try:
        marks = ", ".join("?" for _ in ids)
        found = db.execute(
            f"SELECT id, length(input_items), previous_id FROM responses WHERE id IN ({marks})",
            ids,
        ).fetchall()
    finally:
        db.close()
    return {response_id: (size, previous) for response_id, size, previous in found}


def check_continues(server, previous: dict, response: dict, text: str) -> None:
    """`response`'s conversation is `previous`'s, its output, and the new input: what the old
    format stored whole."""
    items = input_items(server, response["id"])
    before = input_items(server, previous["id"])
    assert items[:-1] == before + previous["output"]
    assert items[-1]["role"] == "user" and items[-1]["content"][0]["text"] == text


def test_a_chain_is_stored_once_and_reads_whole(server):
    chain = [turn(server, f"turn 0 {TEXT}")]
    for k in range(1, 12):
        chain.append(turn(server, f"turn {k} {TEXT}", chain[-1]["id"]))
        check_continues(server, chain[-2], chain[-1], f"turn {k} {TEXT}")
    ids = [r["id"] for r in chain]
    stored = rows(server, ids)
    assert [stored[i][1] for i in ids] == [None, *ids[:-1]]  # each row names the one before
    whole = len(json.dumps(input_items(server, ids[-1])))
    total = sum(size for size, _ in stored.values())
    # one copy of each turn; the old rows held 1 + 2 + ... + 12 turns (6.5 times the last one's)
    assert total < 1.3 * whole, (total, whole)


def test_background_turns_store_only_their_own_items(server):
    first = turn(server, f"first {TEXT}")
    queued = turn(server, f"second {TEXT}", first["id"], background=True)
    assert queued["status"] == "queued"
    deadline = time.monotonic() + 120
    while True:
        r = httpx.get(server.url + f"/v1/responses/{queued['id']}", headers=server.headers)
        if r.json()["status"] not in ("queued", "in_progress"):
            break
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.1)
    done = r.json()
    assert done["status"] in ("completed", "incomplete"), done
    check_continues(server, first, done, f"second {TEXT}")
    size, previous = rows(server, [done["id"]])[done["id"]]
    # the first one's output (two tokens) and its one input item
    assert previous == first["id"] and size < len(TEXT) + 1000, size
    third = turn(server, f"third {TEXT}", done["id"])
    check_continues(server, done, third, f"third {TEXT}")


def test_deleting_a_response_others_continue_leaves_them_whole(server):
    a = turn(server, f"a {TEXT}")
    b = turn(server, f"b {TEXT}", a["id"])
    c = turn(server, f"c {TEXT}", b["id"])
    c2 = turn(server, f"c2 {TEXT}", b["id"])  # a second branch from b
    d = turn(server, f"d {TEXT}", c["id"])
    before = {r["id"]: input_items(server, r["id"]) for r in (a, c, c2, d)}
    for gone, children in ((b, (c, c2)), (c, (d,)), (a, ())):
        r = httpx.delete(server.url + f"/v1/responses/{gone['id']}", headers=server.headers)
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        r = httpx.get(server.url + f"/v1/responses/{gone['id']}", headers=server.headers)
        assert r.status_code == 404
        for child in children:  # now the roots of their chains: stored whole
            assert rows(server, [child["id"]])[child["id"]][1] is None
    assert not rows(server, [a["id"], b["id"], c["id"]])  # their rows went
    for kept in (c2, d):
        assert input_items(server, kept["id"]) == before[kept["id"]]
        after = turn(server, f"after {TEXT}", kept["id"])  # continued as before
        assert input_items(server, after["id"]) == [
            *before[kept["id"]], *kept["output"], input_items(server, after["id"])[-1]]  # fmt: skip


def wait(server, response: dict) -> dict:
    """A background response once it has ended."""
    deadline = time.monotonic() + 120
    while response["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, response
        time.sleep(0.1)
        r = httpx.get(server.url + f"/v1/responses/{response['id']}", headers=server.headers)
        response = r.json()
    assert response["status"] in ("completed", "incomplete"), response
    return response


def test_a_cached_chain_deleted_in_the_middle_reads_and_continues(server):
    """The store keeps recently read conversations (registry/history_cache.py): every turn of
    this chain is read as a loop reads it (the previous one's conversation cached), one turn
    ends in the background, then a link in the middle is deleted. The deleted one is gone, the
    others read as before, and the chain continues from the child stored whole and from the
    end, in the background too."""
    chain = [turn(server, f"link 0 {TEXT}")]
    for k in range(1, 8):
        background = k == 4
        response = turn(server, f"link {k} {TEXT}", chain[-1]["id"], background=background)
        chain.append(wait(server, response))
        check_continues(server, chain[-2], chain[-1], f"link {k} {TEXT}")
    before = {r["id"]: input_items(server, r["id"]) for r in chain}
    gone = chain[4]  # the background one
    r = httpx.delete(server.url + f"/v1/responses/{gone['id']}", headers=server.headers)
    assert r.status_code == 200
    for path in (f"/v1/responses/{gone['id']}", f"/v1/responses/{gone['id']}/input_items"):
        assert httpx.get(server.url + path, headers=server.headers).status_code == 404
    r = create(server, input="after the deleted one", previous_response_id=gone["id"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    for response in chain:
        if response is not gone:
            assert input_items(server, response["id"]) == before[response["id"]]
    child = chain[5]
    assert rows(server, [child["id"]])[child["id"]][1] is None  # stored whole
    for previous in (child, chain[-1]):
        for background in (False, True):
            text = f"from {previous['id']} {background} {TEXT}"
            response = wait(server, turn(server, text, previous["id"], background=background))
            check_continues(server, previous, response, text)
            more = turn(server, f"more {TEXT}", response["id"])  # read as the next turn reads
            check_continues(server, response, more, f"more {TEXT}")


def test_a_chain_reads_and_deletes_only_its_accounts_rows(server):
    mine = turn(server, f"mine {TEXT}")
    child = turn(server, f"child {TEXT}", mine["id"])
    other = {"Authorization": f"Bearer {server.other_key}"}
    # (its requests cannot name this account's model: its responses are read and deleted)
    r = httpx.get(server.url + f"/v1/responses/{child['id']}/input_items", headers=other)
    assert r.status_code == 404
    r = httpx.delete(server.url + f"/v1/responses/{mine['id']}", headers=other)
    assert r.status_code == 404
    assert rows(server, [child["id"]])[child["id"]][1] == mine["id"]  # untouched
    check_continues(server, mine, child, f"child {TEXT}")


def test_rows_of_the_old_format_still_read_and_continue(server):
    assert input_items(server, "resp_old_b") == OLD_B_IN
    new = turn(server, f"new {TEXT}", "resp_old_b")
    assert input_items(server, new["id"]) == [*OLD_B_IN, *OLD_B_OUT, input_items(
        server, new["id"])[-1]]  # fmt: skip
    assert rows(server, [new["id"]])[new["id"]][1] == "resp_old_b"
    # an old row deleted under a new one: the new one gets its conversation
    r = httpx.delete(server.url + "/v1/responses/resp_old_b", headers=server.headers)
    assert r.status_code == 200
    assert input_items(server, new["id"])[:-1] == [*OLD_B_IN, *OLD_B_OUT]
    assert input_items(server, "resp_old_a") == OLD_A_IN


def test_store_links_rebuild_and_a_previous_deleted_meanwhile():
    """ResponseStore alone: a 300-link chain reads whole (one query) from rows of one turn each;
    a response whose previous one was deleted while it ran is stored whole."""
    from girandole.registry.responses import ResponseStore

    store = ResponseStore(Database(None))
    history: list[dict] = []  # the conversation after the last response (its output too)
    previous, inherited = None, 0  # the last response, and its own conversation's length
    for k in range(300):
        asked = [{"id": f"in_{k}", "text": "x" * 100}]
        body = {"id": f"resp_{k}", "status": "completed", "output": [{"id": f"out_{k}"}]}
        store.put("a", body, history + asked, previous, inherited)
        inherited = len(history) + 1
        history += asked + body["output"]
        previous = body["id"]
    found = store.get("a", "resp_299")
    assert found is not None and found.input_items == history[:-1]
    assert found.body["output"] == [{"id": "out_299"}]
    (total,) = store.db.execute("SELECT SUM(length(input_items)) FROM responses")[0]
    assert total < 1.2 * len(json.dumps(history))  # the old rows: 150 times as much
    assert store.get("b", "resp_299") is None  # another account's chain
    # resp_300 read resp_299, which is deleted before resp_300 is saved: it is stored whole
    assert store.delete("a", "resp_299")
    body = {"id": "resp_300", "status": "completed", "output": []}
    store.put("a", body, history + [{"id": "in_300"}], "resp_299", inherited)
    assert store.db.execute("SELECT previous_id FROM responses WHERE id = 'resp_300'") == [(None,)]
    assert store.get("a", "resp_300").input_items == history + [{"id": "in_300"}]
