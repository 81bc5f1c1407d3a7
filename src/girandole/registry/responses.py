"""Stored responses of the Responses API (`store: true`), in the server's database
(girandole.db): the response object and the conversation's input items, per account. A key
reads, lists, chains from and deletes only its own account's responses; an open server keeps
them under the account "". They are kept until deleted.

Each turn of a `previous_response_id` chain is stored once: a response that continues another
keeps only the previous one's output, its own new input items and the previous one's id
(`previous_id`), and its whole
conversation is rebuilt from the chain when read (one recursive query). Storing the whole
conversation in every row, as before, made a chain of k turns hold 1 + 2 + ... + k turns: an
agent loop of 1,000 turns of 5 KB wrote 2.5 GB. A response that others continue from gives
them its history when it is deleted (they become the roots of their chains). Rows written
before the column (the whole conversation, no previous id) read as they did.

A response that ran on a conversation of the Conversations API keeps a reference to the
conversation's items it read (`conversation_id`, `conversation_end`: registry/conversation_refs.py)
and its own new input items, not a copy of the conversation. Conversations rebuilt recently are
kept in memory (registry/history_cache.py): the next turn of a chain reads one row.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from girandole.registry import conversation_refs as refs
from girandole.registry.conversation_refs import ConversationSnapshot, Run
from girandole.registry.conversations import ConversationStore
from girandole.registry.history_cache import HistoryCache
from girandole.registry.keystore import Database

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS responses (
        id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        created REAL NOT NULL,
        body TEXT NOT NULL,
        input_items TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS responses_account_created ON responses (account, created)",
)
# A response's chain in one statement: each link's depth (0: the asked one) and stored input
# items, the asked one's body, and the root's conversation reference (if any). The walk reads
# ids from an index (responses_links): the rows themselves hold previous_id after their large
# columns. The rows come unsorted: an ORDER BY copied every row into a sorter (an old 5 MB row
# read 6 times slower)
_CHAIN = """WITH RECURSIVE chain (depth, id, previous_id) AS (
        SELECT 0, id, previous_id FROM responses WHERE id = ? AND account = ?
        UNION ALL
        SELECT c.depth + 1, r.id, r.previous_id
        FROM responses r JOIN chain c ON r.id = c.previous_id AND r.account = ?
    ) SELECT c.depth, r.input_items, CASE WHEN c.depth = 0 THEN r.body END,
        CASE WHEN c.previous_id IS NULL THEN r.conversation_id END,
        CASE WHEN c.previous_id IS NULL THEN r.conversation_end END
    FROM chain c JOIN responses r ON r.id = c.id"""
# The asked response's row alone: enough when the response it continues is in the cache
_ROW = """SELECT body, input_items, previous_id, conversation_id, conversation_end
    FROM responses WHERE id = ? AND account = ?"""


@dataclass
class StoredResponse:
    body: dict[str, Any]  # the response object, as returned
    input_items: list[dict[str, Any]]  # the conversation up to it (earlier turns included)


def _history(run: Run, account: str, response_id: str) -> tuple[str, list[str]] | None:
    """A response's body and the stored JSON of its conversation's pieces, oldest first (each
    a list of items): the conversation it refers to, then each link's own items."""
    links = run(_CHAIN, (response_id, account, account))
    if not links:
        return None
    links.sort(key=lambda link: -link[0])  # the oldest first
    pieces = [own for _, own, *_ in links]
    conversation_id, end = links[0][3], links[0][4]
    if conversation_id is not None:
        items = refs.prefix(run, conversation_id, end)
        pieces.insert(0, "[" + ",".join(items) + "]")
    body = links[-1][2]
    assert body is not None
    return body, pieces


def _parsed(pieces: list[str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for piece in pieces:
        items += json.loads(piece)
    return items


@dataclass
class Page:
    items: list[dict[str, Any]]
    has_more: bool


class ResponseStore:
    """The responses table of the server's database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        ConversationStore(db)  # its items table: the conversation a response refers to
        self.histories = HistoryCache()
        for statement in _SCHEMA:
            db.execute(statement)
        columns = {row[1] for row in db.execute("PRAGMA table_info(responses)")}
        # a database from before chains were stored as links, or conversations by reference
        for column, kind in (
            ("previous_id", "TEXT"),
            ("conversation_id", "TEXT"),
            ("conversation_end", "INTEGER"),
        ):
            if column in columns:
                continue
            try:
                db.execute(f"ALTER TABLE responses ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise
        # a deleted response's children are found by the first, a chain walked by the second,
        # the responses that refer to a conversation by the third
        db.execute("CREATE INDEX IF NOT EXISTS responses_previous ON responses (previous_id)")
        db.execute(
            "CREATE INDEX IF NOT EXISTS responses_links ON responses (id, account, previous_id)"
        )
        db.execute(
            "CREATE INDEX IF NOT EXISTS responses_conversation"
            " ON responses (conversation_id, conversation_end)"
        )

    def snapshot(self, conversation_id: str) -> ConversationSnapshot:
        """A conversation's items, as a request runs on them (and `put` refers to them)."""
        return refs.take_snapshot(self.db.execute, conversation_id)

    def put(
        self,
        account: str,
        body: dict[str, Any],
        input_items: list[dict[str, Any]],
        previous_id: str | None = None,
        inherited: int = 0,
        conversation: ConversationSnapshot | None = None,
    ) -> None:
        """Save a response; saved again (a background response as it runs and ends), its
        object is replaced and it keeps its place in the list and its input items.
        `input_items`: its whole conversation, whose first `inherited` are the conversation of
        `previous_id` (the response it continues) or the items of `conversation` (the snapshot of
        the conversation it ran on). Only the rest is stored, while that response is stored or
        those items are unchanged: one deleted since this one read it (it ran meanwhile) left
        nothing to rebuild from, so all are stored."""
        with self.db.transaction() as run:
            self.put_in(run, account, body, input_items, previous_id, inherited, conversation)

    @staticmethod
    def put_in(
        run: Run,
        account: str,
        body: dict[str, Any],
        input_items: list[dict[str, Any]],
        previous_id: str | None = None,
        inherited: int = 0,
        conversation: ConversationSnapshot | None = None,
    ) -> None:
        """put's statements inside the caller's transaction (`run`): a response on a
        conversation is stored with its turn's items, at once."""
        if run("SELECT 1 FROM responses WHERE id = ? AND account = ?", (body["id"], account)):
            run(
                "UPDATE responses SET body = ? WHERE id = ? AND account = ?",
                (json.dumps(body), body["id"], account),
            )
            return
        linked = previous_id is not None and bool(
            run("SELECT 1 FROM responses WHERE id = ? AND account = ?", (previous_id, account))
        )
        referenced = (
            conversation is not None and conversation.end > 0 and refs.unchanged(run, conversation)
        )
        own = input_items[inherited:] if linked or referenced else input_items
        conversation_id = conversation.conversation_id if referenced else None
        end = conversation.end if referenced else None
        run(
            "INSERT INTO responses (id, account, created, body, input_items, previous_id,"
            " conversation_id, conversation_end) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (body["id"], account, time.time(), json.dumps(body), json.dumps(own),
             previous_id if linked else None, conversation_id, end),
        )  # fmt: skip

    def update(self, account: str, body: dict[str, Any]) -> None:
        """Replace a saved response's object (its input items stay)."""
        self.db.execute(
            "UPDATE responses SET body = ? WHERE id = ? AND account = ?",
            (json.dumps(body), body["id"], account),
        )

    def unfinished(self) -> list[tuple[str, dict[str, Any]]]:
        """(account, response) of every background response saved as queued or in progress."""
        rows = self.db.execute(
            "SELECT account, body FROM responses"
            " WHERE json_extract(body, '$.status') IN ('queued', 'in_progress')"
        )
        return [(account, json.loads(body)) for account, body in rows]

    def body(self, account: str, response_id: str) -> dict[str, Any] | None:
        """The response object alone (its conversation left unread)."""
        rows = self.db.execute(
            "SELECT body FROM responses WHERE id = ? AND account = ?", (response_id, account)
        )
        return json.loads(rows[0][0]) if rows else None

    def get(self, account: str, response_id: str) -> StoredResponse | None:
        """The response and its whole conversation (earlier turns included). The items may be
        the cache's: not to be changed."""
        rows = self.db.execute(_ROW, (response_id, account))
        if not rows:
            return None
        body, own, previous_id, conversation_id, _ = rows[0]
        cached = self.histories.get(account, previous_id) if previous_id is not None else None
        if cached is not None:  # the row names it: stored, and its conversation is as cached
            history, num_bytes = cached
            items = history + json.loads(own)
            num_bytes += len(own)
        elif previous_id is None and conversation_id is None:  # a chain's root, stored whole
            items, num_bytes = json.loads(own), len(own)
        else:  # every link read in one transaction: a delete cannot come between statements
            with self.db.transaction() as run:
                found = _history(run, account, response_id)
            if found is None:  # deleted since its row was read
                return None
            body, pieces = found
            items, num_bytes = _parsed(pieces), sum(len(piece) for piece in pieces)
        self.histories.put(account, response_id, items, num_bytes)
        return StoredResponse(json.loads(body), list(items))

    def delete(self, account: str, response_id: str) -> bool:
        """Delete a response. Those that continue it get its conversation first (stored whole:
        their rows start with its output), so they and their continuations read as before."""
        self.histories.forget(account, response_id)
        with self.db.transaction() as run:
            children = run(
                "SELECT id, input_items FROM responses WHERE previous_id = ? AND account = ?",
                (response_id, account),
            )
            if children:
                found = _history(run, account, response_id)
                assert found is not None
                inherited = _parsed(found[1])
                for child_id, own in children:
                    run(
                        "UPDATE responses SET input_items = ?, previous_id = NULL WHERE id = ?",
                        (json.dumps(inherited + json.loads(own)), child_id),
                    )
            deleted = run(
                "DELETE FROM responses WHERE id = ? AND account = ? RETURNING conversation_id",
                (response_id, account),
            )
            if deleted and (copy_id := deleted[0][0]) is not None:
                self._release(run, copy_id)
        return bool(deleted)

    @staticmethod
    def freeze(run: Run, conversation_id: str, item_id: str | None = None) -> None:
        """Before a conversation's item (`item_id`), or the whole conversation (None), is
        deleted: the responses that refer to it get a frozen copy of the conversation's items
        they read, so they read as before. `run`: the transaction that deletes them
        (ConversationStore.delete's or delete_item's `before`), so that no response is saved
        referring to the items between the copy and the delete, and a server killed between
        the two leaves neither."""
        start = -1  # every item
        if item_id is not None:
            (start,) = run(
                "SELECT MIN(seq) FROM conversation_items WHERE conversation_id = ? AND item_id = ?",
                (conversation_id, item_id),
            )[0]
            if start is None:
                return
        (end,) = run(
            "SELECT MAX(conversation_end) FROM responses"
            " WHERE conversation_id = ? AND conversation_end > ?",
            (conversation_id, start),
        )[0]
        if end is None:  # none of them reads that item
            return
        copy_id = refs.frozen_copy(run, conversation_id, end)
        run(
            "UPDATE responses SET conversation_id = ?"
            " WHERE conversation_id = ? AND conversation_end > ?",
            (copy_id, conversation_id, start),
        )

    @staticmethod
    def _release(run: Run, conversation_id: str) -> None:
        """Drop a frozen copy no response refers to any more."""
        if not conversation_id.startswith(refs.FROZEN):
            return
        if not run("SELECT 1 FROM responses WHERE conversation_id = ? LIMIT 1", (conversation_id,)):
            refs.drop_frozen(run, conversation_id)

    def list(
        self, account: str, limit: int, after: str | None = None, before: str | None = None
    ) -> Page:
        """The account's responses, newest first; `after`/`before`: ids to page from."""
        where, params = ["account = ?"], [account]
        for cursor, op in ((after, "<"), (before, ">")):
            if cursor is not None:
                # (created, id) orders responses made within the same second too
                where.append(f"(created, id) {op} (SELECT created, id FROM responses WHERE id = ?)")
                params.append(cursor)
        # `before` alone: the ones just newer than the cursor, read oldest first
        order = "ASC" if before is not None and after is None else "DESC"
        rows = self.db.execute(
            f"SELECT body FROM responses WHERE {' AND '.join(where)}"
            f" ORDER BY created {order}, id {order} LIMIT ?",
            (*params, limit + 1),
        )
        items = [json.loads(body) for (body,) in rows]
        has_more = len(items) > limit
        items = items[:limit]
        return Page(items[::-1] if order == "ASC" else items, has_more)
