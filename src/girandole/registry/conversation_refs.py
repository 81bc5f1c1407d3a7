"""A stored response's reference to the conversation it ran on (the Conversations API's,
registry/conversations.py): the conversation's items with `seq` below an end stand first in the
response's own conversation, read from `conversation_items`, not copied into its row (a
conversation of k turns stored 1 + 2 + ... + k turns in its responses' rows before).

What a response read is fixed when it runs: the snapshot its request took, checked unchanged
when the response is saved (a deleted item, or one deleted and added again, fails the check and
the response is stored whole). Items appended later have larger `seq`s. Before items a stored
response refers to are deleted, the responses that refer to them get a frozen copy of the
conversation's items (`conversation_items` rows under a `frozen_` id, which no conversation has),
dropped with the last response that refers to it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Run = Callable[..., list[tuple]]  # a statement of Database.execute or of a transaction
FROZEN = "frozen_"  # the id prefix of a frozen copy


@dataclass(frozen=True)
class ConversationSnapshot:
    """A conversation's items as a request read them."""

    conversation_id: str
    end: int  # the items are those with seq < end
    items: list[dict[str, Any]]
    digest: bytes  # of their stored JSON: the same items when the response is saved?


def _digest(bodies: Iterable[str]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for body in bodies:
        data = body.encode()
        h.update(len(data).to_bytes(8, "little"))  # no two lists of items hash the same way
        h.update(data)
    return h.digest()


def take_snapshot(run: Run, conversation_id: str) -> ConversationSnapshot:
    rows = run(
        "SELECT seq, body FROM conversation_items WHERE conversation_id = ? ORDER BY seq",
        (conversation_id,),
    )
    end = rows[-1][0] + 1 if rows else 0
    items = [json.loads(body) for _, body in rows]
    return ConversationSnapshot(conversation_id, end, items, _digest(body for _, body in rows))


def unchanged(run: Run, snapshot: ConversationSnapshot) -> bool:
    """Whether the conversation's items below the snapshot's end are still the ones it read."""
    return _digest(prefix(run, snapshot.conversation_id, snapshot.end)) == snapshot.digest


def prefix(run: Run, conversation_id: str, end: int) -> list[str]:
    """The stored JSON of the conversation's items with seq < end, in order."""
    rows = run(
        "SELECT body FROM conversation_items WHERE conversation_id = ? AND seq < ? ORDER BY seq",
        (conversation_id, end),
    )
    return [body for (body,) in rows]


def frozen_copy(run: Run, conversation_id: str, end: int) -> str:
    """A copy of the conversation's items with seq < end (the same seqs); its id."""
    copy_id = f"{FROZEN}{uuid.uuid4().hex}"
    run(
        "INSERT INTO conversation_items (conversation_id, seq, item_id, body)"
        " SELECT ?, seq, item_id, body FROM conversation_items"
        " WHERE conversation_id = ? AND seq < ?",
        (copy_id, conversation_id, end),
    )
    return copy_id


def drop_frozen(run: Run, copy_id: str) -> None:
    """Drop a frozen copy's items."""
    assert copy_id.startswith(FROZEN)
    run("DELETE FROM conversation_items WHERE conversation_id = ?", (copy_id,))
