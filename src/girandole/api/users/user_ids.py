"""The id of a user created without `userId`: Fireworks generates one from the user's email.

The email's local part made a valid id (registry/naming.py: 1-63 characters of a-z, 0-9 and
'-', starting with a letter, not ending with '-'): casefolded, accents dropped, every run of
other characters one '-' (`José.Díaz+x@example.com` → `jose-diaz-x`). Taken already: the same
with a short random suffix (`jose-diaz-x-3f9a1c`). No email, or nothing left of it: `user-`
and a random suffix.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Iterator

from girandole.registry.naming import is_valid_id

MAX_ID = 63
SUFFIX_HEX = 6  # 3 random bytes: a collision on top of a collision is rare, and retried
_OTHER = re.compile(r"[^a-z0-9]+")


def _suffix() -> str:
    return secrets.token_hex(SUFFIX_HEX // 2)


def id_from_email(email: str | None) -> str | None:
    """The id an email's local part makes, or None when nothing of it is usable."""
    if not email:
        return None
    local = email.rpartition("@")[0] if "@" in email else email  # "@x": nothing
    # casefold: ß → ss; NFKD splits an accented letter into the letter and its accent, and
    # ASCII keeps the letter
    folded = unicodedata.normalize("NFKD", local.casefold())
    text = _OTHER.sub("-", folded.encode("ascii", "ignore").decode())
    text = text.lstrip("-0123456789")  # an id starts with a letter
    # room for "-<suffix>" on a collision, and no '-' at the end
    text = text[: MAX_ID - SUFFIX_HEX - 1].rstrip("-")
    return text if text and is_valid_id(text) else None


def candidate_ids(email: str | None, tries: int = 8) -> Iterator[str]:
    """Ids to try in turn until one is free: the email's, then it with random suffixes (or
    `user-<random>` without a usable email)."""
    base = id_from_email(email)
    if base is not None:
        yield base
    stem = base or "user"
    for _ in range(tries):
        yield f"{stem}-{_suffix()}"
