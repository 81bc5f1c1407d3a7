"""The store's cache of rebuilt conversations (registry/history_cache.py, used by
registry/responses.py), on a real database: the next turn of a chain reads one row and the
cached conversation before it; a deleted link is never served from the cache, and the responses
that continued it (stored whole then) and their continuations read as before; another account
never reads an entry; the cache keeps to its bounds."""

from __future__ import annotations

import sqlite3
from typing import Any

from girandole.registry.history_cache import HistoryCache
from girandole.registry.keystore import Database
from girandole.registry.responses import ResponseStore


def chain(store: ResponseStore, account: str, length: int, prefix: str = "r") -> list[list[dict]]:
    """`length` chained responses r0 .. r{length-1}; each one's expected conversation."""
    expected: list[list[dict]] = []
    history: list[dict[str, Any]] = []  # the conversation after the last one (its output too)
    previous, inherited = None, 0
    for k in range(length):
        asked = [{"id": f"{prefix}in_{k}", "text": f"question {k}"}]
        body = {"id": f"{prefix}{k}", "status": "completed",
                "output": [{"id": f"{prefix}out_{k}", "text": f"answer {k}"}]}  # fmt: skip
        store.put(account, body, history + asked, previous, inherited)
        expected.append(history + asked)
        inherited = len(history) + 1
        history = history + asked + body["output"]
        previous = body["id"]
    return expected


def statements(store: ResponseStore) -> list[str]:
    """The SQL statements the store's connection runs from now on (recorded as they run)."""
    seen: list[str] = []
    conn: sqlite3.Connection = store.db._conn  # noqa: SLF001 - the store's own connection
    conn.set_trace_callback(seen.append)
    return seen


def test_the_next_turn_reads_one_row_and_the_cached_conversation():
    store = ResponseStore(Database(None))
    expected = chain(store, "a", 50)
    assert store.get("a", "r48").input_items == expected[48]  # rebuilt from the chain
    seen = statements(store)
    found = store.get("a", "r49")  # continues r48, whose conversation is cached
    assert found is not None and found.input_items == expected[49]
    assert len(seen) == 1 and "RECURSIVE" not in seen[0], seen
    # a continuation of it, saved then read as the next turn reads it
    body = {"id": "r50", "status": "completed", "output": []}
    asked = [{"id": "in_50"}]
    store.put("a", body, found.input_items + found.body["output"] + asked, "r49", 99)
    seen.clear()
    assert store.get("a", "r50").input_items == expected[49] + found.body["output"] + asked
    assert not any("RECURSIVE" in s for s in seen), seen


def test_a_deleted_link_is_not_served_and_its_children_read_as_before():
    store = ResponseStore(Database(None))
    expected = chain(store, "a", 8)
    for k in range(8):  # every one cached
        assert store.get("a", f"r{k}").input_items == expected[k]
    assert store.delete("a", "r4")  # the middle of the cached chain
    assert store.get("a", "r4") is None
    assert store.histories.get("a", "r4") is None
    # r5 is stored whole now, r6 and r7 continue it as before
    for k in (5, 6, 7):
        assert store.get("a", f"r{k}").input_items == expected[k]
    store.histories.clear()
    for k in (7, 6, 5, 3):  # the same read cold, from the rows
        assert store.get("a", f"r{k}").input_items == expected[k]
    # a chain continued from the child that was stored whole, and from the end
    for previous in ("r5", "r7"):
        found = store.get("a", previous)
        body = {"id": f"next_{previous}", "status": "completed", "output": []}
        items = found.input_items + found.body["output"] + [{"id": f"in_{previous}"}]
        store.put("a", body, items, previous, len(found.input_items))
        assert store.get("a", body["id"]).input_items == items
        store.histories.clear()
        assert store.get("a", body["id"]).input_items == items
    # a response that read r4 before it was deleted, saved after: stored whole, read whole
    body = {"id": "late", "status": "completed", "output": []}
    store.put("a", body, expected[4] + [{"id": "late_in"}], "r4", len(expected[4]) - 1)
    assert store.get("a", "late").input_items == expected[4] + [{"id": "late_in"}]


def test_the_cache_is_per_account():
    store = ResponseStore(Database(None))
    expected = chain(store, "a", 4)
    chain(store, "b", 4, prefix="b")
    for k in range(4):
        store.get("a", f"r{k}")
    assert store.get("b", "r3") is None and store.get("b", "r2") is None
    # b names a's response as the previous one: not linked (not b's), stored whole
    body = {"id": "b_next", "status": "completed", "output": []}
    store.put("b", body, [{"id": "b_in"}], "r3", len(expected[3]))
    assert store.get("b", "b_next").input_items == [{"id": "b_in"}]
    # and a row of b's naming a's response (as no put writes it) reads no entry of a's
    store.db.execute("UPDATE responses SET previous_id = 'r3' WHERE id = 'b_next'")
    assert store.get("b", "b_next").input_items == [{"id": "b_in"}]


def test_a_background_response_saved_again_reads_the_same():
    """Saved queued, read (cached), continued once it ends: its object is the one it ended
    with, its conversation the one it was saved with."""
    store = ResponseStore(Database(None))
    expected = chain(store, "a", 3)
    queued = {"id": "bg", "status": "queued", "output": []}
    items = expected[2] + [{"id": "r_out_2"}, {"id": "bg_in"}]
    store.put("a", queued, items, "r2", len(expected[2]))
    assert store.get("a", "bg").input_items == items
    done = {"id": "bg", "status": "completed", "output": [{"id": "bg_out"}]}
    store.put("a", done, items, "r2", len(expected[2]))
    found = store.get("a", "bg")
    assert found.body == done and found.input_items == items
    body = {"id": "after_bg", "status": "completed", "output": []}
    more = items + done["output"] + [{"id": "after_in"}]
    store.put("a", body, more, "bg", len(items))
    assert store.get("a", "after_bg").input_items == more


def test_the_cache_keeps_to_its_bounds():
    cache = HistoryCache(max_entries=3, max_bytes=100)
    for k in range(5):
        cache.put("a", f"r{k}", [{"k": k}], 10)
    assert len(cache) == 3 and cache.get("a", "r0") is None and cache.get("a", "r4")
    cache.get("a", "r2")  # used: kept over r3
    cache.put("a", "big", [], 60)  # a 4th entry: the least recently used one goes
    assert cache.num_bytes == 80 and cache.get("a", "r3") is None and cache.get("a", "r2")
    cache.put("a", "huge", [], 101)  # larger than the whole cache: not kept
    assert cache.get("a", "huge") is None and cache.num_bytes == 80
    cache.put("a", "r2", [], 40)  # again: counted once, and 110 bytes: r4 goes
    assert cache.num_bytes == 100 and cache.get("a", "r4") is None
    cache.forget("a", "big")
    assert cache.num_bytes == 40 and len(cache) == 1
    assert cache.get("b", "r2") is None  # another account's key


def test_items_read_are_the_callers_to_extend():
    """The list a read returns is the caller's: extending it leaves the cache as it was."""
    store = ResponseStore(Database(None))
    expected = chain(store, "a", 3)
    found = store.get("a", "r2")
    found.input_items.append({"id": "not stored"})
    assert store.get("a", "r2").input_items == expected[2]
