"""The server's embedded database (SQLite, `girandole.db` in the data folder): API keys and usage.

Keys look like `gk_<key id>_<secret>`. Only the SHA-256 digest of the whole key is stored, with
its id, account, name, role (registry/roles.py) and limits; the key itself is shown once, when it is created. A presented
key is found by its id (not secret), then its digest is compared with `hmac.compare_digest`, so
the comparison takes the same time whatever the secret's content.

Revocation takes effect at once on a running server: every authentication reads the key's row.
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

from girandole.registry.roles import DEFAULT_ROLE, check_role

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
    role: str = DEFAULT_ROLE  # registry/roles.py


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
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        created = time.time()
        self.execute(
            "INSERT INTO api_keys (id, account, name, digest, created, rpm, tpm, role)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, account, name, digest(key), created, rpm, tpm, role),
        )
        return key, KeyInfo(key_id, account, name, created, None, rpm, tpm, role)

    def set_role(self, key_id: str, role: str) -> bool:
        """Give a live key another role (from its next request); False when no such key."""
        check_role(role)
        with self._lock:
            cur = self._conn.execute(
                "UPDATE api_keys SET role = ? WHERE id = ? AND revoked IS NULL", (role, key_id)
            )
            return cur.rowcount > 0

    def list_keys(self, account: str | None = None) -> list[KeyInfo]:
        sql = "SELECT id, account, name, created, revoked, rpm, tpm, role FROM api_keys"
        params: tuple = ()
        if account is not None:
            sql += " WHERE account = ?"
            params = (account,)
        return [KeyInfo(*row) for row in self.execute(sql + " ORDER BY created", params)]

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
            "SELECT id, account, name, created, revoked, rpm, tpm, role, digest FROM api_keys"
            " WHERE id = ?",
            (key_id,),
        )
        if not rows:
            return None
        *fields, stored = rows[0]
        if not hmac.compare_digest(digest(key), stored):
            return None
        info = KeyInfo(*fields)
        return None if info.revoked is not None else info

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
