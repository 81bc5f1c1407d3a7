"""Conversations of OpenAI's Conversations API, in the server's database (girandole.db): a
conversation (id, account, creation time, metadata) and its items in order (the Responses
input and output items, as stored responses keep them). A key reads and changes only its own
account's conversations; an open server keeps them under the account "". Kept until deleted.
"""

from __future__ import annotations

import json
import time
import uuid
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
        conversation_id = f"conv_{uuid.uuid4().hex}"
        self.db.execute(
            "INSERT INTO conversations (id, account, created, metadata) VALUES (?, ?, ?, ?)",
            (conversation_id, account, time.time(), json.dumps(metadata)),
        )
        self.add_items(conversation_id, items)
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

    def delete(self, account: str, conversation_id: str) -> bool:
        found = self.db.execute(
            "DELETE FROM conversations WHERE id = ? AND account = ? RETURNING id",
            (conversation_id, account),
        )
        if found:
            self.db.execute(
                "DELETE FROM conversation_items WHERE conversation_id = ?", (conversation_id,)
            )
        return bool(found)

    # -- items (the caller has checked the conversation is the account's) ----------------------

    def add_items(self, conversation_id: str, items: list[dict[str, Any]]) -> bool:
        """Append items, in order; none to a conversation deleted meanwhile (a response that ran
        on it and ended after), where no one could read or delete them: False then."""
        if not self.db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)):
            return False
        if not items:
            return True
        (last,) = self.db.execute(
            "SELECT COALESCE(MAX(seq), -1) FROM conversation_items WHERE conversation_id = ?",
            (conversation_id,),
        )[0]
        for k, item in enumerate(items, start=last + 1):
            self.db.execute(
                "INSERT INTO conversation_items (conversation_id, seq, item_id, body)"
                " VALUES (?, ?, ?, ?)",
                (conversation_id, k, item["id"], json.dumps(item)),
            )
        return True

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

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        found = self.db.execute(
            "DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ?"
            " RETURNING seq",
            (conversation_id, item_id),
        )
        return bool(found)
