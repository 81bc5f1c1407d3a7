"""Recently rebuilt conversations of stored responses (registry/responses.py), in memory: the
next turn of a `previous_response_id` chain reads the previous response's conversation from
here and its own row alone, not every link of the chain (a 1,000-turn chain: 1,000 rows parsed
at every turn).

A response's conversation never changes once stored (a deleted link's conversation is copied
into the rows that continue it, a conversation's deleted item into a frozen copy), so an entry
needs no invalidation beyond the response's own deletion, and a reader uses an entry only for
the response its own row names as previous, in its own account: a row read names only a
response stored then. Bounded by entries and by the bytes of the JSON the items were parsed
from, the least recently used dropped first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

MAX_ENTRIES = 256
# of the items' JSON; parsed, they take a few times as much (entries share their item objects:
# a chain's successive conversations are mostly the same items)
MAX_BYTES = 32 << 20

Items = list[dict[str, Any]]


class HistoryCache:
    """(account, response id) -> the response's conversation (its input items, earlier turns
    first), least recently used first. The items are shared: readers must not change them."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[Items, int]] = OrderedDict()
        self.num_bytes = 0
        self._lock = threading.Lock()  # the store is shared by the server's threads

    def get(self, account: str, response_id: str) -> tuple[Items, int] | None:
        """The conversation and its JSON's bytes, or None."""
        with self._lock:
            found = self._entries.get((account, response_id))
            if found is not None:
                self._entries.move_to_end((account, response_id))
            return found

    def put(self, account: str, response_id: str, items: Items, num_bytes: int) -> None:
        if num_bytes > self.max_bytes:  # it would push out everything else
            return
        with self._lock:
            self._drop((account, response_id))
            self._entries[(account, response_id)] = (items, num_bytes)
            self.num_bytes += num_bytes
            while len(self._entries) > self.max_entries or self.num_bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def forget(self, account: str, response_id: str) -> None:
        with self._lock:
            self._drop((account, response_id))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.num_bytes -= entry[1]
