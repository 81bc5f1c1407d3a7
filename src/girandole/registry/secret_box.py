"""SecretBox: the secrets' values encrypted at rest (Fernet: AES-128-CBC with an HMAC-SHA256,
from `cryptography`), with a key kept apart from the database.

The key is GIRANDOLE_SECRETS_KEY where it is set (a Fernet key: 32 bytes, url-safe base64, as
`girandole.registry.secret_box.new_key()` or `Fernet.generate_key()` writes it), which keeps it
off the server's disk altogether (a container's secret, a KMS); else `secrets.key` beside
girandole.db (mode 0600), made on first use. So a copy of girandole.db alone (a backup, a volume
shared with another tool) holds no value that can be read. An in-memory database (no --data-dir)
gets a key of its own, gone with it: every store opened on that database reads with it.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken

if TYPE_CHECKING:
    from girandole.registry.keystore import Database

KEY_ENV = "GIRANDOLE_SECRETS_KEY"
KEY_FILE = "secrets.key"
# In-memory databases' keys: the store that writes a value and the one that reads it (the routes'
# and env_of_account's) are opened apart, on the same Database
_MEMORY_KEYS: weakref.WeakKeyDictionary[Database, bytes] = weakref.WeakKeyDictionary()


class SecretsUnreadable(ValueError):
    """A stored value cannot be decrypted with this server's key (the key changed or is lost)."""


def new_key() -> str:
    return Fernet.generate_key().decode("ascii")


def _file_key(path: Path) -> bytes:
    """The key in `path`, written there first (0600) where there is none. The key is written
    whole to a file of this process and linked in: a second process racing this one reads the
    first's key, and a crash never leaves an empty or partial key file behind."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails where another process linked its key first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes().strip()


class SecretBox:
    """encrypt/decrypt of the values with the server's key; `source` says where the key is."""

    def __init__(self, key: bytes | str, source: str) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError as exc:
            raise ValueError(
                f"the secrets key ({source}) is not a Fernet key (32 bytes, url-safe base64): {exc}"
            ) from None
        self.source = source

    @classmethod
    def for_database(cls, db: Database) -> SecretBox:
        """The box of `db` (in memory: a key of that database, made at its first store)."""
        if os.environ.get(KEY_ENV):
            return cls(os.environ[KEY_ENV].strip(), KEY_ENV)
        if db.path == ":memory:":
            key = _MEMORY_KEYS.setdefault(db, Fernet.generate_key())
            return cls(key, "the in-memory database's key")
        path = Path(db.path).parent / KEY_FILE
        return cls(_file_key(path), str(path))

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str, what: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError):
            raise SecretsUnreadable(
                f"{what} cannot be decrypted with the server's secrets key ({self.source}): it"
                " was stored under another key; set it again, or give the server its old key"
            ) from None
