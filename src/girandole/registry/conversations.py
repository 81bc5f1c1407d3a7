"""Conversations of OpenAI's Conversations API, in the server's database (girandole.db): a
conversation (id, account, creation time, metadata) and its items in order (the Responses
input and output items, as stored responses keep them). A key reads and changes only its own
account's conversations; an open server keeps them under the account "". Kept until deleted.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from girandole.registry.keystore import Database

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        created REAL NOT NULL,
        metadata TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS conversation_items (
        conversation_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        item_id TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (conversation_id, seq)
    )""",
    "CREATE INDEX IF NOT EXISTS conversation_items_id ON conversation_items"
    " (conversation_id, item_id)",
)


# a statement run inside a transaction (Database.transaction's `run`)
Run = Callable[[str, tuple], list[tuple]]
# more statements a caller adds to a store's transaction
Write = Callable[[Run], None]


def _append(run: Run, conversation_id: str, items: list[dict[str, Any]]) -> None:
    """Insert items after the conversation's last (inside the caller's transaction)."""
    if not items:
        return
    (last,) = run(
        "SELECT COALESCE(MAX(seq), -1) FROM conversation_items WHERE conversation_id = ?",
        (conversation_id,),
    )[0]
    for k, item in enumerate(items, start=last + 1):
        run(
            "INSERT INTO conversation_items (conversation_id, seq, item_id, body)"
            " VALUES (?, ?, ?, ?)",
            (conversation_id, k, item["id"], json.dumps(item)),
        )


def conversation_json(conversation_id: str, created: float, metadata: str) -> dict[str, Any]:
    """OpenAI's conversation object."""
    return {
        "id": conversation_id,
        "object": "conversation",
        "created_at": int(created),
        "metadata": json.loads(metadata),
    }


class ConversationStore:
    """The conversations and conversation_items tables."""

    def __init__(self, db: Database) -> None:
        self.db = db
        for statement in _SCHEMA:
            db.execute(statement)

    def create(
        self, account: str, metadata: dict[str, str], items: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A new conversation with its first items, in one transaction: a server killed (or an
        item failing to store) midway leaves no conversation holding part of them."""
        conversation_id = f"conv_{uuid.uuid4().hex}"
        with self.db.transaction() as run:
            run(
                "INSERT INTO conversations (id, account, created, metadata) VALUES (?, ?, ?, ?)",
                (conversation_id, account, time.time(), json.dumps(metadata)),
            )
            _append(run, conversation_id, items)
        found = self.get(account, conversation_id)
        assert found is not None
        return found

    def get(self, account: str, conversation_id: str) -> dict[str, Any] | None:
        rows = self.db.execute(
            "SELECT id, created, metadata FROM conversations WHERE id = ? AND account = ?",
            (conversation_id, account),
        )
        return conversation_json(*rows[0]) if rows else None

    def update(
        self, account: str, conversation_id: str, metadata: dict[str, str]
    ) -> dict[str, Any] | None:
        self.db.execute(
            "UPDATE conversations SET metadata = ? WHERE id = ? AND account = ?",
            (json.dumps(metadata), conversation_id, account),
        )
        return self.get(account, conversation_id)

    def delete(self, account: str, conversation_id: str, before: Write | None = None) -> bool:
        """Delete the conversation and its items, in one transaction with what `before` writes
        first when it exists (the stored responses that read its items get a copy of them:
        ResponseStore.freeze): a server killed midway leaves the conversation whole, never
        items no one reads, nor responses that read deleted items."""
        with self.db.transaction() as run:
            found = run(
                "DELETE FROM conversations WHERE id = ? AND account = ? RETURNING id",
                (conversation_id, account),
            )
            if found:
                if before is not None:
                    before(run)
                run("DELETE FROM conversation_items WHERE conversation_id = ?", (conversation_id,))
        return bool(found)

    # -- items (the caller has checked the conversation is the account's) ----------------------

    def add_items(
        self, conversation_id: str, items: list[dict[str, Any]], also: Write | None = None
    ) -> bool:
        """Append items, in order, in one transaction (with what `also` writes: the response
        whose turn they are, stored whether or not the conversation still exists): a server
        killed, or an item failing to store, midway leaves none of them, never half a turn.
        None to a conversation deleted meanwhile (a response that ran on it and ended after),
        where no one could read or delete them: False then."""
        with self.db.transaction() as run:
            exists = bool(run("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)))
            if exists:
                _append(run, conversation_id, items)
            if also is not None:
                also(run)
        return exists

    def items(self, conversation_id: str) -> list[dict[str, Any]]:
        """The conversation's items, oldest first."""
        rows = self.db.execute(
            "SELECT body FROM conversation_items WHERE conversation_id = ? ORDER BY seq",
            (conversation_id,),
        )
        return [json.loads(body) for (body,) in rows]

    def item_ids(self, conversation_id: str) -> list[str]:
        """The ids of the conversation's items (their bodies left unread)."""
        rows = self.db.execute(
            "SELECT item_id FROM conversation_items WHERE conversation_id = ?", (conversation_id,)
        )
        return [item_id for (item_id,) in rows]

    def item(self, conversation_id: str, item_id: str) -> dict[str, Any] | None:
        rows = self.db.execute(
            "SELECT body FROM conversation_items WHERE conversation_id = ? AND item_id = ?"
            " ORDER BY seq LIMIT 1",
            (conversation_id, item_id),
        )
        return json.loads(rows[0][0]) if rows else None

    def delete_item(self, conversation_id: str, item_id: str, before: Write | None = None) -> bool:
        """Delete an item, in one transaction with what `before` writes first (as `delete`)."""
        with self.db.transaction() as run:
            if before is not None:
                before(run)
            found = run(
                "DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ?"
                " RETURNING seq",
                (conversation_id, item_id),
            )
        return bool(found)
