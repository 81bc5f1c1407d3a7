"""Stored responses that ran on a conversation (registry/conversation_refs.py, used by
registry/responses.py), on a real database: each row keeps its own input items and a reference
to the conversation's items it read, and reads exactly what the whole conversation stored in
the row read before, whatever happens to the conversation after (items appended, deleted, the
conversation deleted) or while the response ran; frozen copies go with their last response."""

from __future__ import annotations

import json
import sqlite3
from functools import partial
from typing import Any

import pytest

from girandole.registry.conversations import ConversationStore
from girandole.registry.keystore import Database
from girandole.registry.responses import ResponseStore


def message(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]}  # fmt: skip


class Turns:
    """Responses on one conversation, saved as the route saves them: the conversation's items
    read (a snapshot), the turn's input and output appended once it ends, then the response."""

    def __init__(self) -> None:
        db = Database(None)
        self.store, self.conversations = ResponseStore(db), ConversationStore(db)
        self.conv = self.conversations.create("a", {}, [message("first", "hello")])["id"]
        self.expected: dict[str, list[dict[str, Any]]] = {}  # what each must read

    def run(self, name: str, snapshot: Any = None) -> str:
        snapshot = snapshot or self.store.snapshot(self.conv)
        asked = [message(f"{name}_in", f"question {name} " * 20)]
        body = {"id": name, "status": "completed", "output": [message(f"{name}_out", "answer")]}
        self.conversations.add_items(self.conv, asked + body["output"])
        items = snapshot.items + asked
        self.store.put("a", body, items, inherited=len(snapshot.items), conversation=snapshot)
        self.expected[name] = items
        return name

    def delete_item(self, item_id: str) -> bool:
        """As the route deletes it: its readers' copy made in the delete's transaction."""
        freeze = partial(self.store.freeze, conversation_id=self.conv, item_id=item_id)
        return self.conversations.delete_item(self.conv, item_id, freeze)

    def delete(self) -> bool:
        freeze = partial(self.store.freeze, conversation_id=self.conv)
        return self.conversations.delete("a", self.conv, freeze)

    def reads(self) -> None:
        for name, items in self.expected.items():
            self.store.histories.clear()  # from the rows, then from the cache
            for _ in range(2):
                found = self.store.get("a", name)
                assert found is not None and found.input_items == items, name

    def row(self, name: str) -> tuple[int, str | None, int | None]:
        (row,) = self.store.db.execute(
            "SELECT length(input_items), conversation_id, conversation_end FROM responses"
            " WHERE id = ?",
            (name,),
        )
        return row


def test_a_response_refers_to_the_conversation_and_reads_it_whole():
    t = Turns()
    for k in range(20):
        t.run(f"r{k}")
    t.reads()
    size, conv, end = t.row("r19")
    assert conv == t.conv and end == 1 + 19 * 2
    assert size < len(json.dumps(t.expected["r19"][-1])) + 10  # its own input alone
    # later items of the conversation are not in earlier responses
    t.conversations.add_items(t.conv, [message("later", "more")])
    t.reads()
    assert t.store.get("b", "r19") is None  # another account's


def test_deleted_items_and_conversations_leave_the_responses_as_they_were():
    t = Turns()
    for k in range(6):
        t.run(f"r{k}")
    t.store.get("a", "r5")
    # an item r3 read (r2's output): r3, r4 and r5 get a frozen copy, r0 .. r2 keep the
    # conversation's items
    assert t.delete_item("r2_out")
    t.reads()
    frozen = {t.row(f"r{k}")[1] for k in range(3, 6)}
    assert len(frozen) == 1 and frozen != {t.conv}
    assert {t.row(f"r{k}")[1] for k in range(3)} == {t.conv}
    # the last item deleted and another added with its id and seq: later turns read the new one
    assert t.delete_item("r5_out")
    t.conversations.add_items(t.conv, [message("r5_out", "another text")])
    t.run("r6")
    t.reads()
    # the whole conversation deleted
    assert t.delete()
    t.reads()
    t.store.histories.clear()
    next_items = t.store.get("a", "r6").input_items + [message("after_in", "go on")]
    t.store.put("a", {"id": "after", "status": "completed", "output": []}, next_items, "r6",
                len(next_items) - 1)  # fmt: skip
    assert t.store.get("a", "after").input_items == next_items
    # the frozen copies go with the last responses that refer to them
    for name in list(t.expected):
        assert t.store.delete("a", name)
    assert t.store.get("a", "after").input_items == next_items  # stored whole when r6 went
    assert t.store.db.execute("SELECT COUNT(*) FROM conversation_items") == [(0,)]


def test_a_conversation_changed_while_the_response_ran_is_stored_whole():
    t = Turns()
    t.run("r0")
    # the last item deleted, and one of the same id added (the same seq) while r1 ran
    snapshot = t.store.snapshot(t.conv)
    t.delete_item("r0_out")
    t.conversations.add_items(t.conv, [message("r0_out", "not what r1 read")])
    t.run("r1", snapshot)
    assert t.row("r1")[1] is None  # stored whole: what it read
    # items appended while r2 ran (another turn) leave it a reference
    snapshot = t.store.snapshot(t.conv)
    t.conversations.add_items(t.conv, [message("meanwhile", "appended")])
    t.run("r2", snapshot)
    assert t.row("r2")[1] == t.conv
    # a conversation deleted while r3 ran
    snapshot = t.store.snapshot(t.conv)
    t.delete()
    t.run("r3", snapshot)
    assert t.row("r3")[1] is None
    t.reads()


def test_a_chain_continued_from_a_conversations_response():
    t = Turns()
    for k in range(3):
        t.run(f"r{k}")
    found = t.store.get("a", "r2")
    items = found.input_items + found.body["output"] + [message("c_in", "chained")]
    t.store.put("a", {"id": "c", "status": "completed", "output": []}, items, "r2",
                len(found.input_items))  # fmt: skip
    assert t.store.get("a", "c").input_items == items
    t.store.histories.clear()
    assert t.store.get("a", "c").input_items == items
    t.delete_item("first")  # the first item, which every response read
    t.store.histories.clear()
    assert t.store.get("a", "c").input_items == items
    assert t.store.delete("a", "r2")  # c stored whole
    assert t.store.get("a", "c").input_items == items


@pytest.mark.parametrize("whole", [True, False])
def test_a_delete_that_fails_leaves_no_copy_behind(whole):
    """The copy for the responses that read the items and the delete are one transaction: a
    delete that fails (here a trigger refuses it, as a full disk would) leaves the responses
    on the conversation and no frozen copy; as two, the copy was committed on its own (and a
    response saved between the two referred to items then deleted)."""
    t = Turns()
    for k in range(3):
        t.run(f"r{k}")
    t.store.db.execute(
        "CREATE TEMP TRIGGER refuse BEFORE DELETE ON conversation_items"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        t.delete() if whole else t.delete_item("r1_out")
    assert {t.row(f"r{k}")[1] for k in range(3)} == {t.conv}
    frozen = t.store.db.execute(
        "SELECT COUNT(*) FROM conversation_items WHERE conversation_id LIKE 'frozen_%'"
    )
    assert frozen == [(0,)]
    assert t.conversations.get("a", t.conv) is not None and len(t.conversations.items(t.conv)) == 7
    t.store.db.execute("DROP TRIGGER refuse")
    assert t.delete() if whole else t.delete_item("r1_out")
    t.reads()
