"""The conversation store (`registry/conversations.py`) on its own: what one call writes is
written whole or not at all.

Through the API every item is checked before it is stored, so no request makes the second of
two items fail after the first was written; a kill between the two (each statement was its own
transaction) is what left half a turn, and a kill cannot be aimed between two statements of
microseconds. The tests here make an item fail to store (a value JSON cannot hold) after
others of the same call."""

from __future__ import annotations

import pytest

from girandole.registry.conversations import ConversationStore
from girandole.registry.keystore import Database
from girandole.registry.responses import ResponseStore


def item(n: int, **extra) -> dict:
    return {"id": f"msg_{n}", "type": "message", "role": "user", "content": [], **extra}


def test_items_added_in_one_call_are_stored_all_or_none():
    store = ConversationStore(Database(None))
    conv = store.create("acme", {}, [item(0)])["id"]
    with pytest.raises(TypeError):
        store.add_items(conv, [item(1), item(2, bad={1, 2})])  # a set: not JSON
    assert [i["id"] for i in store.items(conv)] == ["msg_0"]
    assert store.add_items(conv, [item(1), item(2)])
    assert [i["id"] for i in store.items(conv)] == ["msg_0", "msg_1", "msg_2"]


def test_a_conversation_is_created_with_all_its_items_or_not_at_all():
    db = Database(None)
    store = ConversationStore(db)
    with pytest.raises(TypeError):
        store.create("acme", {}, [item(0), item(1, bad={1})])
    assert db.execute("SELECT COUNT(*) FROM conversations") == [(0,)]
    assert db.execute("SELECT COUNT(*) FROM conversation_items") == [(0,)]


def test_a_turn_and_its_stored_response_are_written_together():
    """A Responses request on a conversation adds its turn's items and stores the response in
    one transaction: a response that fails to store leaves no items, and the other way round."""
    db = Database(None)
    store, responses = ConversationStore(db), ResponseStore(db)
    conv = store.create("acme", {}, [])["id"]
    body = {"id": "resp_1", "status": "completed", "output": [], "bad": {1}}

    def put(run) -> None:
        responses.put_in(run, "acme", body, [item(0)])

    with pytest.raises(TypeError):
        store.add_items(conv, [item(0)], put)
    assert store.items(conv) == [] and responses.body("acme", "resp_1") is None
    with pytest.raises(TypeError):
        store.add_items(conv, [item(0, bad={1})], put)
    del body["bad"]
    assert store.add_items(conv, [item(0)], put)
    assert len(store.items(conv)) == 1 and responses.body("acme", "resp_1") == body
    # a conversation deleted while the response ran: no items, the response still stored
    assert store.delete("acme", conv)
    body["id"] = "resp_2"
    assert not store.add_items(conv, [item(1)], put)
    assert responses.body("acme", "resp_2") == body
    assert db.execute("SELECT COUNT(*) FROM conversation_items") == [(0,)]
