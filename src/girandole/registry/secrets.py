"""Secrets of an account (Fireworks' `client.secrets`), in the server's database (girandole.db,
0600): a secret is an id, an environment-variable-like `keyName` unique in its account, and a
value. The value is write-only over the API (api/secrets/route.py never returns it); the code
that runs an account's work reads the values with `env_of_account` (e.g. an evaluator's
environment).

Values are stored as given, protected as the rest of the database is (its file mode): anyone who
can read girandole.db can read them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from girandole.registry.keystore import Database

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
                "INSERT INTO secrets (account, id, key_name, value, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (account, secret_id, key_name, value, now, now),
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
        with self.db.transaction() as run:
            if not run("SELECT 1 FROM secrets WHERE account = ? AND id = ?", (account, secret_id)):
                return None
            if key_name is not None:
                self._check_key_name(run, account, key_name, secret_id)
            run(
                "UPDATE secrets SET key_name = COALESCE(?, key_name),"
                " value = COALESCE(?, value), updated = ? WHERE account = ? AND id = ?",
                (key_name, value, time.time(), account, secret_id),
            )
        return self.get(account, secret_id)

    def delete(self, account: str, secret_id: str) -> bool:
        with self.db.transaction() as run:
            found = run("SELECT 1 FROM secrets WHERE account = ? AND id = ?", (account, secret_id))
            run("DELETE FROM secrets WHERE account = ? AND id = ?", (account, secret_id))
        return bool(found)

    def values(self, account: str) -> dict[str, str]:
        """keyName -> value of every secret of the account: for the server's own use only."""
        rows = self.db.execute(
            "SELECT key_name, value FROM secrets WHERE account = ? ORDER BY key_name", (account,)
        )
        return dict(rows)


def env_of_account(state: AppState, account: str) -> dict[str, str]:
    """The account's secrets as environment variables (keyName -> value), e.g. for the
    environment of an evaluator that runs the account's code. `state`: the server's AppState."""
    return SecretStore(state.ops.db).values(account)
