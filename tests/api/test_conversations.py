"""OpenAI's Conversations API (`girandole.api.conversations`) and Responses' `conversation`, on
the real server and default model, driven by the openai SDK's `client.conversations`: items
created, appended, listed, read and deleted; a response on a conversation sees its items and
joins it when it ends (whole, streamed, in the background); other accounts kept out; the 4xx."""

from __future__ import annotations

import json
import socket
import sqlite3
import time

import httpx
import openai
import pytest
from api_helpers import API_KEY, MODEL

from girandole.registry.keystore import Database

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def user(text: str) -> dict:
    return {"type": "message", "role": "user", "content": text}


def test_items_crud(client):
    conv = client.conversations.create(items=[user("Hello"), user("Are you there?")],
                                       metadata={"topic": "demo"})  # fmt: skip
    assert conv.id.startswith("conv_") and conv.object == "conversation"
    assert conv.metadata == {"topic": "demo"}
    assert client.conversations.retrieve(conv.id).model_dump() == conv.model_dump()
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [i.content[0].text for i in items] == ["Hello", "Are you there?"]
    assert all(i.id.startswith("msg_") and i.status == "completed" for i in items)
    added = client.conversations.items.create(
        conv.id, items=[{"role": "assistant", "content": "Yes."}, user("Good.")]
    )
    assert [i.role for i in added.data] == ["assistant", "user"]
    assert added.data[0].content[0].type == "output_text"
    newest = client.conversations.items.list(conv.id, limit=2)  # desc by default
    assert [i.id for i in newest.data] == [added.data[1].id, added.data[0].id]
    assert newest.has_more is True and newest.last_id == added.data[0].id
    after = client.conversations.items.list(conv.id, after=newest.last_id).data
    assert [i.id for i in after] == [items[1].id, items[0].id]
    one = client.conversations.items.retrieve(items[0].id, conversation_id=conv.id)
    assert one.model_dump() == items[0].model_dump()
    left = client.conversations.items.delete(items[0].id, conversation_id=conv.id)
    assert left.id == conv.id
    assert len(client.conversations.items.list(conv.id).data) == 3
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(items[0].id, conversation_id=conv.id)
    updated = client.conversations.update(conv.id, metadata={"topic": "other"})
    assert updated.metadata == {"topic": "other"}
    assert client.conversations.delete(conv.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.list(conv.id)


def test_item_ids_are_unique(client):
    """Items with an id another item of the conversation has are a 400 naming it (retrieve and
    delete by id would find one of them, or remove both); nothing of the request is added."""
    mine = {**user("Hi"), "id": "msg_mine"}
    with pytest.raises(openai.BadRequestError) as info:
        client.conversations.create(items=[mine, mine])
    assert info.value.body["param"] == "items.1.id" and "msg_mine" in info.value.body["message"]
    conv = client.conversations.create(items=[mine])
    with pytest.raises(openai.BadRequestError) as info:
        client.conversations.items.create(conv.id, items=[user("Again"), mine])
    assert info.value.body["param"] == "items.1.id"
    assert [i.id for i in client.conversations.items.list(conv.id).data] == ["msg_mine"]
    with pytest.raises(openai.BadRequestError) as info:  # a response's input joins it too
        client.responses.create(model=MODEL, conversation=conv.id, max_output_tokens=1,
                                input=[{**user("Hi"), "id": "msg_mine"}])  # fmt: skip
    assert info.value.body["param"] == "input.0.id"
    client.conversations.items.delete("msg_mine", conversation_id=conv.id)
    client.conversations.items.create(conv.id, items=[mine])  # free again once deleted
    assert [i.id for i in client.conversations.items.list(conv.id).data] == ["msg_mine"]


def test_a_response_runs_on_the_conversation_and_joins_it(client):
    conv = client.conversations.create(items=[{"role": "system", "content": "Be terse."}])
    first = client.responses.create(model=MODEL, input="What is the capital of France?",
                                    conversation=conv.id, max_output_tokens=8,
                                    temperature=0)  # fmt: skip
    assert first.conversation.id == conv.id
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [i.type for i in items] == ["message"] * 3
    assert items[-1].id == first.output[0].id and items[-1].role == "assistant"
    # the same as the conversation's turns sent as input
    plain = client.responses.create(
        model=MODEL, instructions="Be terse.", input="What is the capital of France?",
        max_output_tokens=8, temperature=0,
    )  # fmt: skip
    assert first.output_text == plain.output_text
    assert first.usage.input_tokens == plain.usage.input_tokens
    # the next turn sees the first: more input tokens, and it joins the conversation too
    second = client.responses.create(model=MODEL, input="And of Italy?",
                                     conversation={"id": conv.id}, max_output_tokens=8,
                                     temperature=0, stream=True)  # fmt: skip
    done = [e for e in second if e.type == "response.completed"][0].response
    assert done.usage.input_tokens > first.usage.input_tokens + 3
    assert len(client.conversations.items.list(conv.id).data) == 5
    # a background response joins it when it ends
    queued = client.responses.create(model=MODEL, input="And of Spain?", conversation=conv.id,
                                     max_output_tokens=4, background=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while client.responses.retrieve(queued.id).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len(client.conversations.items.list(conv.id).data) == 7
    # store: false still adds the turn to the conversation
    client.responses.create(model=MODEL, input="Thanks.", conversation=conv.id,
                            max_output_tokens=2, store=False)  # fmt: skip
    assert len(client.conversations.items.list(conv.id).data) == 9


def test_a_conversation_deleted_under_a_running_response_is_left_deleted(client, server):
    """A response that ends after its conversation was deleted adds its turn to nothing: the
    items are not left in the database, where no request could read or delete them."""
    conv = client.conversations.create(items=[user("Hi")])
    r = client.responses.create(model=MODEL, input="Write a long story about a lighthouse.",
                                conversation=conv.id, max_output_tokens=100, temperature=0,
                                background=True)  # fmt: skip
    client.conversations.delete(conv.id)
    assert client.responses.retrieve(r.id).status in ("queued", "in_progress")
    deadline = time.monotonic() + 60
    while (status := client.responses.retrieve(r.id).status) in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status in ("completed", "incomplete")  # the turn it would have added
    db = server.log_path.parent / f"data-{server.port}" / "girandole.db"
    with sqlite3.connect(db) as conn:
        (left,) = conn.execute("SELECT COUNT(*) FROM conversation_items"
                               " WHERE conversation_id = ?", (conv.id,)).fetchone()  # fmt: skip
    assert left == 0


def test_an_input_id_added_while_the_response_ran_fails_it(client):
    """Input item ids are checked at the start and again as the turn is written: an item of the
    same id added while the response ran (by the items route, or another response on the
    conversation) makes it fail, instead of leaving two items of one id."""
    conv = client.conversations.create(items=[user("Hi")])
    mine = {**user("Tell me a long story about a lighthouse."), "id": "msg_race"}
    r = client.responses.create(model=MODEL, input=[mine], conversation=conv.id,
                                max_output_tokens=32, temperature=0,
                                background=True)  # fmt: skip
    client.conversations.items.create(conv.id, items=[mine])  # passes: not written yet
    assert client.responses.retrieve(r.id).status in ("queued", "in_progress")
    deadline = time.monotonic() + 60
    while (done := client.responses.retrieve(r.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done.status == "failed" and "msg_race" in done.error.message
    ids = [i.id for i in client.conversations.items.list(conv.id, limit=100).data]
    assert ids.count("msg_race") == 1 and len(ids) == 2


def test_a_conversation_deleted_while_a_change_to_it_arrives_is_a_404(client, server):
    """An update or an item post checked the conversation before its body arrived: deleted in
    between, the update was a 200 with the body `null`, the post a 200 listing items that went
    nowhere. Both are a 404 now, as they would be a moment later."""
    for path, body in (("", {"metadata": {"a": "b"}}), ("/items", {"items": [user("Hi")]})):
        conv = client.conversations.create()
        data = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(
                f"POST /v1/conversations/{conv.id}{path} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data[:5]
            )
            time.sleep(0.3)  # the server waits for the rest of the body
            client.conversations.delete(conv.id)
            s.sendall(data[5:])
            answer = s.recv(65536)
            head, _, got = answer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(got) < length:
                got += s.recv(65536)
            answer = head + b"\r\n\r\n" + got
        assert answer.startswith(b"HTTP/1.1 404"), answer
        assert b'"NOT_FOUND"' in answer and conv.id.encode() in answer


def test_errors(client, server):
    conv = client.conversations.create()
    first = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)

    def post(path: str, body: dict, key: str = API_KEY) -> httpx.Response:
        return httpx.post(server.url + path, json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})  # fmt: skip

    too_many = {"items": [user(str(i)) for i in range(21)]}
    cases = [
        (post("/v1/responses", {"model": MODEL, "input": "x", "conversation": conv.id,
                                "previous_response_id": first.id}), 400, "conversation"),
        (post("/v1/responses", {"model": MODEL, "input": "x", "conversation": "conv_nope"}),
         400, "conversation"),
        (post("/v1/conversations", too_many), 400, "items"),
        (post("/v1/conversations", {"items": [{"type": "web_search_call"}]}), 400,
         "items.0.type"),
        (post("/v1/conversations", {"metadata": {"k" * 65: "v"}}), 400, None),
        (post(f"/v1/conversations/{conv.id}/items", {"items": []}), 400, "items"),
        (post(f"/v1/conversations/{conv.id}/items", {"items": [{"role": "user", "content": [
            {"type": "input_file", "file_id": "file-1"}]}]}), 400, "items.0.content.0"),
        (post("/v1/conversations/conv_nope/items", {"items": [user("x")]}), 404, None),
    ]  # fmt: skip
    for response, status, param in cases:
        assert response.status_code == status, response.text
        if param is not None:
            assert response.json()["error"]["param"] == param, response.text
    bad_include = httpx.get(f"{server.url}/v1/conversations/{conv.id}/items?include=x",
                            headers=server.headers)  # fmt: skip
    assert bad_include.status_code == 400 and bad_include.json()["error"]["param"] == "include.0"
    # what a Responses request may include, items may too (reasoning: never encrypted here)
    for include in ("message.output_text.logprobs", "reasoning.encrypted_content"):
        listed = httpx.get(f"{server.url}/v1/conversations/{conv.id}/items",
                           params={"include": include}, headers=server.headers)  # fmt: skip
        assert listed.status_code == 200, listed.text
    # as OpenAI's SDK sends a list: include[]=...
    with pytest.raises(openai.BadRequestError) as bad:
        client.conversations.items.list(conv.id, include=["x"])
    assert bad.value.body["param"] == "include.0", bad.value.body
    item = client.conversations.items.create(conv.id, items=[user("hi")]).data[0]
    got = client.conversations.items.retrieve(
        item.id, conversation_id=conv.id, include=["message.output_text.logprobs"]
    )
    assert got.id == item.id
    with pytest.raises(openai.BadRequestError):
        client.conversations.items.retrieve(item.id, conversation_id=conv.id, include=["y"])
    with pytest.raises(openai.BadRequestError):
        client.conversations.items.create(conv.id, items=[user("x")], include=["z"])
    # another account's key sees nothing of it
    data = server.log_path.parent / f"data-{server.port}"
    other, _ = Database.in_folder(data).create_key("other-account")
    headers = {"Authorization": f"Bearer {other}"}
    for method, path in (("GET", f"/v1/conversations/{conv.id}"),
                         ("GET", f"/v1/conversations/{conv.id}/items"),
                         ("DELETE", f"/v1/conversations/{conv.id}")):  # fmt: skip
        assert httpx.request(method, server.url + path, headers=headers).status_code == 404
    assert client.conversations.retrieve(conv.id).id == conv.id


def test_a_conversation_too_long_for_the_context_is_refused_before_it_is_tokenized(client):
    # its stored items were never in the request's body: they are counted as a body's prompt
    # is (characters, items), not tokenized whole first (a 56 MB conversation: 95 s of CPU)
    conv = client.conversations.create()
    for _ in range(4):
        client.conversations.items.create(conv.id, items=[user("x" * 40_000)] * 20)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hi", conversation=conv.id,
                                max_output_tokens=1)  # fmt: skip
    error = info.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "characters, far above the limit" in error["message"]
