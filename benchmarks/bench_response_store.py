"""What stored responses cost (registry/responses.py), the store alone on a database file:

1. A `previous_response_id` chain of --turns turns of --turn-bytes each: the CPU time of reading
   its last response (GET input_items, or a continuation reading the previous response), cold
   (nothing read before) and as an agent loop reads it (the previous turn read its previous
   response: the turn before), and of saving a turn. Medians of --repeats turns added to the end.
2. A conversation (Conversations API) of --conversation-turns turns, each a stored response:
   the bytes of the responses' rows and of the conversation's items, and of the database file.

    .venv/bin/python benchmarks/bench_response_store.py [--turns 1000] [--turn-bytes 5000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from girandole.registry.conversations import ConversationStore
from girandole.registry.keystore import Database
from girandole.registry.responses import ResponseStore


def message(item_id: str, role: str, text: str) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"id": item_id, "type": "message", "role": role, "status": "completed",
            "content": [{"type": kind, "text": text}]}  # fmt: skip


def body_of(response_id: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "status": "completed", "output": output}


def cpu_ms(run: Any, *args: Any) -> tuple[float, Any]:
    start = time.process_time()
    result = run(*args)
    return (time.process_time() - start) * 1000, result


def forget(store: ResponseStore) -> None:
    """Read cold: the store's cache of histories (when it has one) emptied."""
    cache = getattr(store, "histories", None)
    if cache is not None:
        cache.clear()


def chain(folder: Path, turns: int, turn_bytes: int, repeats: int) -> None:
    store = ResponseStore(Database(folder / "chain.db"))
    half = "x" * (turn_bytes // 2)
    history: list[dict[str, Any]] = []  # every turn so far, inputs and outputs
    timings: list[tuple[float, float, float]] = []
    for k in range(turns + repeats):
        asked = [message(f"msg_in_{k}", "user", half)]
        body = body_of(f"resp_{k}", [message(f"msg_out_{k}", "assistant", half)])
        previous = f"resp_{k - 1}" if k > 0 else None
        inherited = max(len(history) - 1, 0)  # the previous one's conversation, less its output
        if k < turns:
            store.put("acct", body, history + asked, previous, inherited)
        else:  # the measured turns: read the previous one (as the route does), then save
            forget(store)
            cold, found = cpu_ms(store.get, "acct", previous)
            forget(store)
            store.get("acct", f"resp_{k - 2}")  # as the turn before read its previous one
            warm, found = cpu_ms(store.get, "acct", previous)
            assert found.input_items + found.body["output"] == history
            items = history + asked
            put, _ = cpu_ms(store.put, "acct", body, items, previous, inherited)
            timings.append((cold, warm, put))
        history = history + asked + body["output"]
    cold, warm, put = (statistics.median(t[i] for t in timings) for i in range(3))
    print(f"chain of {turns} turns of {turn_bytes} B: read cold {cold:.2f} ms, read as a loop"
          f" does {warm:.2f} ms, save {put:.2f} ms (CPU, medians of {repeats})")  # fmt: skip


def conversation(folder: Path, turns: int, turn_bytes: int) -> None:
    path = folder / "conversation.db"
    db = Database(path)
    store, conversations = ResponseStore(db), ConversationStore(db)
    conv = conversations.create("acct", {}, [])["id"]
    half = "x" * (turn_bytes // 2)
    snapshot_of = getattr(store, "snapshot", None)
    spent: list[float] = []  # CPU ms of each turn's reading and saving
    for k in range(turns):
        asked = [message(f"msg_in_{k}", "user", half)]
        body = body_of(f"resp_{k}", [message(f"msg_out_{k}", "assistant", half)])
        start = time.process_time()
        if snapshot_of is not None:  # a reference to the conversation's items
            snapshot = snapshot_of(conv)
            conversations.add_items(conv, asked + body["output"])
            items = snapshot.items + asked
            store.put("acct", body, items, inherited=len(snapshot.items), conversation=snapshot)
        else:  # the whole conversation in each row
            items = conversations.items(conv) + asked
            conversations.add_items(conv, asked + body["output"])
            store.put("acct", body, items)
        spent.append((time.process_time() - start) * 1000)
    last = store.get("acct", f"resp_{turns - 1}")
    assert last is not None and last.input_items == conversations.items(conv)[:-1]
    (responses,) = db.execute("SELECT SUM(length(input_items)) FROM responses")[0]
    (items,) = db.execute("SELECT SUM(length(body)) FROM conversation_items")[0]
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(f"conversation of {turns} turns of {turn_bytes} B: responses' input_items"
          f" {responses / 1e6:.2f} MB, conversation items {items / 1e6:.2f} MB, database file"
          f" {path.stat().st_size / 1e6:.2f} MB; a turn's read and save: median"
          f" {statistics.median(spent):.2f} ms of CPU, the last ten"
          f" {statistics.median(spent[-10:]):.2f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--turn-bytes", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--conversation-turns", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        chain(Path(folder), args.turns, args.turn_bytes, args.repeats)
        conversation(Path(folder), args.conversation_turns, args.turn_bytes)


if __name__ == "__main__":
    main()
