"""API keys: which bearer tokens may use the server. Kept only as SHA-256 digests."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def read_keys_file(path: str | Path) -> list[str]:
    """One key a line; blank lines and lines starting with '#' are skipped."""
    keys = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


class ApiKeyStore:
    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = [_digest(k) for k in keys if k]

    @property
    def open(self) -> bool:
        """No keys configured: every request is let in."""
        return not self._digests

    def __len__(self) -> int:
        return len(self._digests)

    def find(self, presented: str) -> int | None:
        """The index of the matching key, or None; compares against every key, in constant time."""
        candidate = _digest(presented)
        found = None
        for i, digest in enumerate(self._digests):
            if hmac.compare_digest(candidate, digest):
                found = i
        return found

    def check(self, presented: str) -> bool:
        """Constant-time in the key's content: digests are compared whole, against every key."""
        candidate = _digest(presented)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(candidate, digest)
        return found
