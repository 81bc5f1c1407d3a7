"""Stored responses of the Responses API (`store: true`), in the server's database
(girandole.db): the response object and the conversation's input items, per account. A key
reads, lists, chains from and deletes only its own account's responses; an open server keeps
them under the account "". They are kept until deleted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

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


@dataclass
class StoredResponse:
    body: dict[str, Any]  # the response object, as returned
    input_items: list[dict[str, Any]]  # the conversation up to it (earlier turns included)


@dataclass
class Page:
    items: list[dict[str, Any]]
    has_more: bool


class ResponseStore:
    """The responses table of the server's database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        for statement in _SCHEMA:
            db.execute(statement)

    def put(self, account: str, body: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """Save a response; saved again (a background response as it runs and ends), it keeps
        its place in the list."""
        self.db.execute(
            "INSERT INTO responses (id, account, created, body, input_items)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET body = excluded.body,"
            " input_items = excluded.input_items",
            (body["id"], account, time.time(), json.dumps(body), json.dumps(input_items)),
        )

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

    def get(self, account: str, response_id: str) -> StoredResponse | None:
        rows = self.db.execute(
            "SELECT body, input_items FROM responses WHERE id = ? AND account = ?",
            (response_id, account),
        )
        if not rows:
            return None
        return StoredResponse(json.loads(rows[0][0]), json.loads(rows[0][1]))

    def delete(self, account: str, response_id: str) -> bool:
        found = self.db.execute(
            "DELETE FROM responses WHERE id = ? AND account = ? RETURNING id",
            (response_id, account),
        )
        return bool(found)

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
