"""The server's embedded database (SQLite, `girandole.db` in the data folder): API keys and usage.

Keys look like `gk_<key id>_<secret>`. Only the SHA-256 digest of the whole key is stored, with
its id, account, name, role (registry/roles.py) and limits; the key itself is shown once, when it is created. A presented
key is found by its id (not secret), then its digest is compared with `hmac.compare_digest`, so
the comparison takes the same time whatever the secret's content.

Revocation takes effect at once on a running server: every authentication reads the key's row.

Users (Fireworks' account users, managed over REST by api/users/route.py) are rows of `users`,
one per (account, id). A key made for a user has its `user_id`; its role at each request is its
user's (KeyInfo.role), and deleting the user revokes its keys. A key may expire (`expires`).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from girandole.registry.roles import ADMIN, DEFAULT_ROLE, check_role

DB_NAME = "girandole.db"
KEY_PREFIX = "gk_"
MAX_LIMIT = 2**63 - 1  # SQLite's INTEGER: a larger limit cannot be stored

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    digest BLOB NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    rpm INTEGER,
    tpm INTEGER,
    role TEXT NOT NULL DEFAULT 'user'
);
CREATE TABLE IF NOT EXISTS users (
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    role TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    email TEXT NOT NULL DEFAULT '',
    service_account INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (account, id)
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    request_id TEXT NOT NULL,
    account TEXT,
    key_id TEXT,
    model TEXT,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL DEFAULT 0,
    aborted INTEGER NOT NULL DEFAULT 0,
    num_choices INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    queue_s REAL,
    ttft_s REAL,
    duration_s REAL NOT NULL,
    metadata TEXT
);
CREATE INDEX IF NOT EXISTS usage_account_time ON usage (account, time);
"""

USAGE_COLUMNS = (
    "time",
    "request_id",
    "account",
    "key_id",
    "model",
    "endpoint",
    "status",
    "stream",
    "aborted",
    "num_choices",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "queue_s",
    "ttft_s",
    "duration_s",
    "metadata",  # the request's `metadata` as JSON, or NULL
)


def _json_path(key: str) -> str:
    """SQLite's JSON path of one metadata key (quoted: keys may hold dots or spaces)."""
    if '"' in key or "\\" in key:
        raise ValueError(f"metadata keys with quotes or backslashes cannot be queried: {key!r}")
    return f'$."{key}"'


def _metadata_value(key: str) -> tuple[str, list[str]]:
    """SQL for the value of one metadata key, and its parameters. Rows written before metadata
    was stored unescaped spell a non-ASCII key with \\u escapes (\\u00e9 for é), which SQLite
    matches only verbatim: such a key is looked up in both spellings."""
    path = _json_path(key)
    escaped = "$." + json.dumps(key)  # ensure_ascii, as those rows were written
    if escaped == path:
        return "json_extract(metadata, ?)", [path]
    return "COALESCE(json_extract(metadata, ?), json_extract(metadata, ?))", [path, escaped]


def check_limit(value: int | None, field: str) -> int | None:
    """A key's per-minute limit: None (the server's default), 0 (no limit) or a positive
    integer SQLite can store; anything else is a ValueError naming `field`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
        raise ValueError(
            f"{field} must be an integer from 0 (no limit) to {MAX_LIMIT}, got {value!r}"
        )
    return value


def parse_limit(text: str) -> int:
    """argparse type of a per-minute limit flag (--rpm, --rate-limit-tpm, ...): 0 is no limit;
    a negative one would refuse every request, and SQLite cannot store one above MAX_LIMIT."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be from 0 (no limit) to {MAX_LIMIT}, got {text.strip()}"
        )
    return value


def check_key_name(name: str) -> str:
    """A key's label is printed by `keys list`: control characters (newlines, terminal escape
    sequences) would garble or forge its output, so they are refused."""
    if not isinstance(name, str):
        raise ValueError(f"a key name must be a string, got {type(name).__name__}")
    if not name.isprintable():
        raise ValueError(
            f"a key name must not contain control or other unprintable characters: {name!r}"
        )
    return name


def _new_key() -> tuple[str, str]:
    """(id, key) of a new key: `gk_<id>_<secret>`."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_id_of(key: str) -> str | None:
    """The id part of a `gk_<id>_<secret>` key, or None when the key has another shape."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id


@dataclass(frozen=True)
class KeyInfo:
    id: str
    account: str
    name: str
    created: float
    revoked: float | None
    rpm: int | None  # requests per minute; None: the server's default
    tpm: int | None  # tokens (prompt + completion) per minute; None: the server's default
    role: str = DEFAULT_ROLE  # registry/roles.py: its user's for a key of a user
    user_id: str | None = None  # the user of its account it belongs to (None: a CLI key)
    expires: float | None = None  # when it stops working (None: never)


@dataclass(frozen=True)
class UserInfo:
    account: str
    id: str
    role: str
    display_name: str
    email: str
    service_account: bool
    created: float
    updated: float


class UserError(ValueError):
    """A users-table change refused, with its HTTP status and Fireworks' error code: 404
    NOT_FOUND (no such user), 409 ALREADY_EXISTS, 409 FAILED_PRECONDITION (it would leave the
    account without an admin), 400 FAILED_PRECONDITION (a user's keys at their cap)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# a key's row, its role that of its user when it has one (a key whose user is gone: no row)
_KEY_COLUMNS = (
    "k.id, k.account, k.name, k.created, k.revoked, k.rpm, k.tpm, COALESCE(u.role, k.role),"
    " k.user_id, k.expires"
)
_KEY_FROM = " FROM api_keys k LEFT JOIN users u ON u.account = k.account AND u.id = k.user_id"
_KEY_SELECT = "SELECT " + _KEY_COLUMNS + _KEY_FROM
_USER_SELECT = (
    "SELECT account, id, role, display_name, email, service_account, created, updated FROM users"
)


def _user(row: tuple) -> UserInfo:
    *head, service, created, updated = row
    return UserInfo(*head, bool(service), created, updated)


def _make_private(path: Path) -> None:
    """Key digests and usage are the owner's alone: a folder we create 0700, the database 0600
    (an existing folder keeps its mode: it may be shared, e.g. --data-dir /tmp)."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        path.parent.chmod(0o700)  # mkdir's mode passes through the umask
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    path.chmod(0o600)


class Database:
    """One SQLite connection shared by threads (serialized by a lock); WAL so that the
    `girandole keys|usage` commands can read and write while a server runs."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = str(path) if path is not None else ":memory:"
        if path is not None:
            _make_private(Path(path))
        self._conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=10
        )
        self._lock = threading.Lock()
        with self._lock:
            if path is not None:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._add_role_column()
            self._add_column("api_keys", "user_id", "TEXT")
            self._add_column("api_keys", "expires", "REAL")
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(usage)")}
            if "metadata" not in columns:  # a database from before the column
                self._conn.execute("ALTER TABLE usage ADD COLUMN metadata TEXT")
        if path is not None:
            for suffix in ("-wal", "-shm"):  # SQLite copies the database's mode; make sure
                extra = Path(self.path + suffix)
                if extra.exists():
                    extra.chmod(0o600)
        self._has_keys = False

    def _add_role_column(self) -> None:
        """A database made before keys had roles gets the column; its keys become `user`s."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(api_keys)")}
        if "role" in columns:
            return
        try:
            self._conn.execute(
                f"ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT '{DEFAULT_ROLE}'"
            )
        except sqlite3.OperationalError as exc:  # another process added it first
            if "duplicate column" not in str(exc):
                raise

    def _add_column(self, table: str, column: str, kind: str) -> None:
        """A column added since the table was first made (NULL in older rows)."""
        columns = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
        if column in columns:
            return
        try:
            self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as exc:  # another process added it first
            if "duplicate column" not in str(exc):
                raise

    @classmethod
    def in_folder(cls, folder: str | Path) -> Database:
        return cls(Path(folder) / DB_NAME)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[Callable[[str, tuple], list[tuple]]]:
        """Statements run as one: the lock held throughout (no other thread's statement comes
        between) and one SQLite transaction (rolled back if the block raises)."""
        with self._lock:

            def run(sql: str, params: tuple = ()) -> list[tuple]:
                return self._conn.execute(sql, params).fetchall()

            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield run
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT has rolled back already
                    self._conn.execute("ROLLBACK")
                raise

    # -- keys ------------------------------------------------------------------------------

    def create_key(
        self,
        account: str,
        name: str = "",
        rpm: int | None = None,
        tpm: int | None = None,
        role: str = DEFAULT_ROLE,
    ) -> tuple[str, KeyInfo]:
        """A new key for `account`: (the key, shown only now; its row)."""
        check_role(role)
        check_key_name(name)
        check_limit(rpm, "rpm")
        check_limit(tpm, "tpm")
        key_id, key = _new_key()
        created = time.time()
        self.execute(
            "INSERT INTO api_keys (id, account, name, digest, created, rpm, tpm, role)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, account, name, digest(key), created, rpm, tpm, role),
        )
        return key, KeyInfo(key_id, account, name, created, None, rpm, tpm, role)

    def create_user_key(
        self,
        account: str,
        user_id: str,
        name: str = "",
        expires: float | None = None,
        max_keys: int = 0,
    ) -> tuple[str, KeyInfo]:
        """A new key of an existing user (the server's default limits; its user's role):
        (the key, shown only now; its row). UserError 404 when there is no such user, 400
        FAILED_PRECONDITION when it has `max_keys` live keys already (0: no cap): limits are per
        key, so a user minting keys would multiply its allowance."""
        check_key_name(name)
        key_id, key = _new_key()
        created = time.time()
        with self.transaction() as run:  # the count and the insert as one: no race past the cap
            rows = run("SELECT role FROM users WHERE account = ? AND id = ?", (account, user_id))
            if not rows:
                raise UserError(
                    404, "NOT_FOUND", f"user {user_id!r} not found in account {account}"
                )
            role = rows[0][0]
            if max_keys > 0:
                live = run(
                    "SELECT COUNT(*) FROM api_keys WHERE account = ? AND user_id = ?"
                    " AND revoked IS NULL AND (expires IS NULL OR expires > ?)",
                    (account, user_id, created),
                )[0][0]
                if live >= max_keys:
                    raise UserError(
                        400,
                        "FAILED_PRECONDITION",
                        f"user {user_id!r} of account {account} has {live} live API keys, the"
                        f" most a user may have on this server (--max-keys-per-user {max_keys}):"
                        f" delete one first (POST /v1/accounts/{account}/users/{user_id}"
                        "/apiKeys:delete {keyId}) or wait for one to expire",
                    )
            run(
                "INSERT INTO api_keys (id, account, name, digest, created, role, user_id, expires)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, account, name, digest(key), created, role, user_id, expires),
            )
        self._has_keys = True
        return key, KeyInfo(
            key_id, account, name, created, None, None, None, role, user_id, expires
        )

    def set_role(self, key_id: str, role: str) -> bool:
        """Give a live key another role (from its next request); False when no such key. A
        key of a user has its user's role: ValueError."""
        check_role(role)
        with self._lock:
            owned = self._conn.execute(
                "SELECT user_id FROM api_keys WHERE id = ? AND user_id IS NOT NULL", (key_id,)
            ).fetchall()
            if owned:
                raise ValueError(
                    f"key {key_id} belongs to user {owned[0][0]} and has its role: change the"
                    " user's role (PATCH .../users/USER_ID)"
                )
            cur = self._conn.execute(
                "UPDATE api_keys SET role = ? WHERE id = ? AND revoked IS NULL", (role, key_id)
            )
            return cur.rowcount > 0

    def list_keys(self, account: str | None = None) -> list[KeyInfo]:
        sql = _KEY_SELECT
        params: tuple = ()
        if account is not None:
            sql += " WHERE k.account = ?"
            params = (account,)
        return [KeyInfo(*row) for row in self.execute(sql + " ORDER BY k.created", params)]

    def user_keys(self, account: str, user_id: str) -> list[KeyInfo]:
        """The live (not revoked) keys of one user of `account`, oldest first."""
        sql = _KEY_SELECT + " WHERE k.account = ? AND k.user_id = ? AND k.revoked IS NULL"
        return [
            KeyInfo(*row) for row in self.execute(sql + " ORDER BY k.created", (account, user_id))
        ]

    def revoke_user_key(self, account: str, user_id: str, key_id: str) -> bool:
        """Revoke a live key of one user of `account`; False when it has no such key."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND account = ? AND user_id = ?"
                " AND revoked IS NULL",
                (time.time(), key_id, account, user_id),
            )
            return cur.rowcount > 0

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key by id; False when no such key (or it was already revoked)."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (time.time(), key_id),
            )
            return cur.rowcount > 0

    def has_keys(self) -> bool:
        """Whether any key was ever created (revoked ones count: revoking every key must not
        open the server)."""
        if not self._has_keys:
            self._has_keys = bool(self.execute("SELECT EXISTS (SELECT 1 FROM api_keys)")[0][0])
        return self._has_keys

    def authenticate(self, key: str) -> KeyInfo | None:
        """The key's row when `key` is a live key of this database, else None."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        rows = self.execute(
            f"SELECT {_KEY_COLUMNS}, k.digest, u.id {_KEY_FROM} WHERE k.id = ?",
            (key_id,),
        )
        if not rows:
            return None
        *fields, stored, user_found = rows[0]
        if not hmac.compare_digest(digest(key), stored):
            return None
        info = KeyInfo(*fields)
        if info.revoked is not None:
            return None
        if info.user_id is not None and user_found is None:  # its user was deleted
            return None
        if info.expires is not None and info.expires <= time.time():
            return None
        return info

    # -- users -----------------------------------------------------------------------------

    def create_user(
        self,
        account: str,
        user_id: str,
        role: str,
        display_name: str = "",
        email: str = "",
        service_account: bool = False,
    ) -> UserInfo:
        """A new user of `account`; UserError 409 when it has one of that id."""
        check_role(role)
        now = time.time()
        try:
            self.execute(
                "INSERT INTO users (account, id, role, display_name, email, service_account,"
                " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (account, user_id, role, display_name, email, int(service_account), now, now),
            )
        except sqlite3.IntegrityError:
            raise UserError(
                409, "ALREADY_EXISTS", f"user {user_id!r} already exists in account {account}"
            ) from None
        return UserInfo(account, user_id, role, display_name, email, service_account, now, now)

    def account_since(self, account: str) -> float | None:
        """When the database first heard of `account`: the creation of its earliest key (a
        revoked key's row stays) or of its earliest user still there; None: never."""
        rows = self.execute(
            "SELECT MIN(t) FROM (SELECT MIN(created) AS t FROM api_keys WHERE account = ?"
            " UNION ALL SELECT MIN(created) FROM users WHERE account = ?)",
            (account, account),
        )
        return rows[0][0]

    def get_user(self, account: str, user_id: str) -> UserInfo | None:
        rows = self.execute(_USER_SELECT + " WHERE account = ? AND id = ?", (account, user_id))
        return _user(rows[0]) if rows else None

    def list_users(self, account: str) -> list[UserInfo]:
        rows = self.execute(_USER_SELECT + " WHERE account = ? ORDER BY id", (account,))
        return [_user(row) for row in rows]

    def update_user(
        self, account: str, user_id: str, changes: dict[str, object], keep_admin: bool = True
    ) -> UserInfo:
        """Change some of a user's role, display_name, email and service_account; UserError
        404 when there is no such user, 409 when it would demote the account's last admin
        (unless not `keep_admin`)."""
        if "role" in changes:
            check_role(str(changes["role"]))
        allowed = ("role", "display_name", "email", "service_account")
        sets = {k: v for k, v in changes.items() if k in allowed}
        with self.transaction() as run:
            user = self._user_in(run, account, user_id)
            if keep_admin and sets.get("role", ADMIN) != ADMIN:
                self._keep_an_admin(run, user)
            if sets:
                assignments = ", ".join(f"{k} = ?" for k in sets)  # names from `allowed` only
                run(
                    f"UPDATE users SET {assignments}, updated = ? WHERE account = ? AND id = ?",
                    (*sets.values(), time.time(), account, user_id),
                )
            rows = run(_USER_SELECT + " WHERE account = ? AND id = ?", (account, user_id))
        return _user(rows[0])

    def delete_user(self, account: str, user_id: str, keep_admin: bool = True) -> None:
        """Delete a user and revoke its keys; UserError 404 when there is no such user, 409
        when it is the account's last admin (unless not `keep_admin`)."""
        with self.transaction() as run:
            user = self._user_in(run, account, user_id)
            if keep_admin:
                self._keep_an_admin(run, user)
            run(
                "UPDATE api_keys SET revoked = ? WHERE account = ? AND user_id = ?"
                " AND revoked IS NULL",
                (time.time(), account, user_id),
            )
            run("DELETE FROM users WHERE account = ? AND id = ?", (account, user_id))

    @staticmethod
    def _user_in(run: Callable[[str, tuple], list[tuple]], account: str, user_id: str) -> UserInfo:
        rows = run(_USER_SELECT + " WHERE account = ? AND id = ?", (account, user_id))
        if not rows:
            raise UserError(404, "NOT_FOUND", f"user {user_id!r} not found in account {account}")
        return _user(rows[0])

    @staticmethod
    def _keep_an_admin(run: Callable[[str, tuple], list[tuple]], user: UserInfo) -> None:
        """UserError 409 when `user` is the last admin user of its account (it is about to be
        demoted or deleted): an account that has admins keeps one."""
        if user.role != ADMIN:
            return
        admins = run(
            "SELECT COUNT(*) FROM users WHERE account = ? AND role = ?", (user.account, ADMIN)
        )[0][0]
        if admins <= 1:
            raise UserError(
                409,
                "FAILED_PRECONDITION",
                f"user {user.id!r} is the last admin of account {user.account}: make another"
                " user admin first",
            )

    # -- usage -----------------------------------------------------------------------------

    def insert_usage(self, rows: list[dict]) -> None:
        if not rows:
            return
        placeholders = ", ".join("?" for _ in USAGE_COLUMNS)
        values = [tuple(row.get(c) for c in USAGE_COLUMNS) for row in rows]
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({placeholders})",
                    values,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                # a COMMIT that failed (a full disk) has rolled back already: a second ROLLBACK
                # would raise "no transaction is active" in place of the real error
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def usage_summary(
        self,
        by: str = "account",
        account: str | None = None,
        since: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[dict]:
        """Totals grouped by `by` (account, key_id, model, endpoint, status, or `metadata.<key>`:
        a key of the requests' metadata), of the rows whose metadata has every pair of
        `metadata`."""
        where: list[str] = []
        params: list = []
        if by.startswith("metadata."):
            column, column_params = _metadata_value(by[len("metadata.") :])
            params += column_params
        elif by in ("account", "key_id", "model", "endpoint", "status"):
            column = by
        else:
            raise ValueError(f"cannot group usage by {by!r}")
        if account is not None:
            where.append("account = ?")
            params.append(account)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        for key, value in (metadata or {}).items():
            expr, expr_params = _metadata_value(key)
            where.append(f"{expr} = ?")
            params += [*expr_params, value]
        sql = (
            f"SELECT {column} AS grp, COUNT(*), SUM(aborted), SUM(status >= 400),"
            " SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), AVG(ttft_s),"
            " AVG(duration_s) FROM usage"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " GROUP BY grp ORDER BY grp"
        names = (
            by,
            "requests",
            "aborted",
            "errors",
            "prompt_tokens",
            "cached_tokens",
            "completion_tokens",
            "avg_ttft_s",
            "avg_duration_s",
        )
        return [dict(zip(names, row)) for row in self.execute(sql, tuple(params))]

    def usage_rows(self, request_id: str) -> list[dict]:
        """The usage rows of one request id (its metadata decoded)."""
        sql = f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage WHERE request_id = ? ORDER BY id"
        rows = [dict(zip(USAGE_COLUMNS, row)) for row in self.execute(sql, (request_id,))]
        for row in rows:
            row["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
        return rows

    def count_usage(self) -> int:
        return int(self.execute("SELECT COUNT(*) FROM usage")[0][0])
