"""Secrets of an account (Fireworks' `client.secrets`), in the server's database (girandole.db,
0600): a secret is an id, an environment-variable-like `keyName` unique in its account, and a
value. The value is write-only over the API (api/secrets/route.py never returns it); the code
that runs an account's work reads the values with `env_of_account` (e.g. an evaluator's
environment).

Values are stored encrypted (registry/secret_box.py: Fernet, with a key kept apart from the
database, GIRANDOLE_SECRETS_KEY or `secrets.key` beside girandole.db), so girandole.db alone
reveals none. Rows written in plaintext before that (`sealed` 0) are encrypted when a store is
next opened.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from girandole.registry.keystore import Database
from girandole.registry.secret_box import SecretBox

if TYPE_CHECKING:
    from girandole.api.state import AppState

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS secrets (
        account TEXT NOT NULL,
        id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        value TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        sealed INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, id),
        UNIQUE (account, key_name)
    )""",
)

Run = Callable[[str, tuple], list[tuple]]  # a statement of Database.transaction

KEY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_KEY_NAME = 256
MAX_VALUE_BYTES = 64 * 1024  # an API key or a token, not a file


def secret_name(account: str, secret_id: str) -> str:
    return f"accounts/{account}/secrets/{secret_id}"


def is_valid_key_name(key_name: str) -> bool:
    return len(key_name) <= MAX_KEY_NAME and bool(KEY_NAME_RE.match(key_name))


@dataclass(frozen=True)
class Secret:
    """A secret without its value: what may be shown."""

    account: str
    secret_id: str
    key_name: str
    created: float
    updated: float

    @property
    def name(self) -> str:
        return secret_name(self.account, self.secret_id)


class KeyNameTaken(Exception):
    """Another secret of the account has the keyName."""

    def __init__(self, holder: Secret) -> None:
        super().__init__(holder.name)
        self.holder = holder


class SecretStore:
    """The secrets table. Every read but `values` leaves the value out."""

    def __init__(self, db: Database) -> None:
        self.db = db
        for statement in _SCHEMA:
            db.execute(statement)
        self.box = SecretBox.for_database(db)
        self._seal_plaintext_rows()

    def _seal_plaintext_rows(self) -> None:
        """Encrypt the values a server before encryption stored as given (a table from then has
        no `sealed` column: its rows get 0; every write since sets 1)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(secrets)")}
        if "sealed" not in columns:
            try:
                self.db.execute("ALTER TABLE secrets ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise
        if not self.db.execute("SELECT 1 FROM secrets WHERE sealed = 0 LIMIT 1"):
            return
        # secure_delete: the pages the plaintext leaves are zeroed, not left free; the checkpoint
        # then writes the sealed pages over the file's old ones
        self.db.execute("PRAGMA secure_delete = ON")
        try:
            with self.db.transaction() as run:
                for account, secret_id, value in run(
                    "SELECT account, id, value FROM secrets WHERE sealed = 0", ()
                ):
                    run(
                        "UPDATE secrets SET value = ?, sealed = 1 WHERE account = ? AND id = ?",
                        (self.box.encrypt(value), account, secret_id),
                    )
        finally:
            self.db.execute("PRAGMA secure_delete = OFF")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @staticmethod
    def _check_key_name(run: Run, account: str, key_name: str, secret_id: str) -> None:
        """KeyNameTaken when a secret other than `secret_id` has the keyName (inside the
        caller's transaction: no other writer comes between the check and the write)."""
        rows = run(
            "SELECT account, id, key_name, created, updated FROM secrets"
            " WHERE account = ? AND key_name = ? AND id != ?",
            (account, key_name, secret_id),
        )
        if rows:
            raise KeyNameTaken(Secret(*rows[0]))

    def create(self, account: str, secret_id: str, key_name: str, value: str) -> Secret | None:
        """The new secret; None when the id is taken; KeyNameTaken when the keyName is."""
        now = time.time()
        with self.db.transaction() as run:
            if run("SELECT 1 FROM secrets WHERE account = ? AND id = ?", (account, secret_id)):
                return None
            self._check_key_name(run, account, key_name, secret_id)
            run(
                "INSERT INTO secrets (account, id, key_name, value, created, updated, sealed)"
                " VALUES (?, ?, ?, ?, ?, ?, 1)",
                (account, secret_id, key_name, self.box.encrypt(value), now, now),
            )
        return Secret(account, secret_id, key_name, now, now)

    def get(self, account: str, secret_id: str) -> Secret | None:
        rows = self.db.execute(
            "SELECT account, id, key_name, created, updated FROM secrets"
            " WHERE account = ? AND id = ?",
            (account, secret_id),
        )
        return Secret(*rows[0]) if rows else None

    def list(self, account: str) -> list[Secret]:
        """The account's secrets by id."""
        rows = self.db.execute(
            "SELECT account, id, key_name, created, updated FROM secrets WHERE account = ?"
            " ORDER BY id",
            (account,),
        )
        return [Secret(*row) for row in rows]

    def update(
        self, account: str, secret_id: str, key_name: str | None, value: str | None
    ) -> Secret | None:
        """The secret with its keyName and/or value replaced (None: kept); None when there is no
        such secret; KeyNameTaken when another secret has the keyName."""
        token = None if value is None else self.box.encrypt(value)
        with self.db.transaction() as run:
            if not run("SELECT 1 FROM secrets WHERE account = ? AND id = ?", (account, secret_id)):
                return None
            if key_name is not None:
                self._check_key_name(run, account, key_name, secret_id)
            run(
                "UPDATE secrets SET key_name = COALESCE(?, key_name),"
                " value = COALESCE(?, value), updated = ? WHERE account = ? AND id = ?",
                (key_name, token, time.time(), account, secret_id),
            )
        return self.get(account, secret_id)

    def delete(self, account: str, secret_id: str) -> bool:
        with self.db.transaction() as run:
            found = run("SELECT 1 FROM secrets WHERE account = ? AND id = ?", (account, secret_id))
            run("DELETE FROM secrets WHERE account = ? AND id = ?", (account, secret_id))
        return bool(found)

    def values(self, account: str) -> dict[str, str]:
        """keyName -> value of every secret of the account: for the server's own use only.
        SecretsUnreadable (a ValueError naming the secret) where the server's key is not the one
        a value was stored with."""
        rows = self.db.execute(
            "SELECT key_name, value, id FROM secrets WHERE account = ? ORDER BY key_name",
            (account,),
        )
        return {
            key_name: self.box.decrypt(token, f"secret {secret_name(account, secret_id)}")
            for key_name, token, secret_id in rows
        }


def env_of_account(state: AppState, account: str) -> dict[str, str]:
    """The account's secrets as environment variables (keyName -> value), e.g. for the
    environment of an evaluator that runs the account's code. `state`: the server's AppState."""
    return SecretStore(state.ops.db).values(account)
