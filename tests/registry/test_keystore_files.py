"""The keys database holds key digests and usage: only its owner may read it, and it refuses
limits and names that would break the server or `keys list`."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_folder_and_database_are_private(tmp_path):
    data = tmp_path / "fresh" / "data"
    subprocess.run(
        [sys.executable, "-m", "girandole.cli", "keys", "create", "--account", "a",
         "--data-dir", str(data)],
        check=True, capture_output=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert mode(data) == 0o700
    for f in data.iterdir():
        if f.name.startswith("girandole.db"):
            assert mode(f) == 0o600, (f, oct(mode(f)))


def test_an_existing_shared_folder_keeps_its_mode_but_the_database_is_private(tmp_path):
    from girandole.registry.keystore import Database

    tmp_path.chmod(0o755)
    db = Database.in_folder(tmp_path)
    db.create_key(account="a")
    db.close()
    assert mode(tmp_path) == 0o755
    assert mode(tmp_path / "girandole.db") == 0o600


def test_create_key_refuses_bad_limits_and_names(tmp_path):
    from girandole.registry.keystore import Database

    db = Database.in_folder(tmp_path)
    for limits, field in (({"rpm": -1}, "rpm"), ({"tpm": 2**63}, "tpm"), ({"rpm": 1.5}, "rpm"),
                          ({"tpm": True}, "tpm")):  # fmt: skip
        with pytest.raises(ValueError, match=f"^{field} must be an integer from 0"):
            db.create_key("a", **limits)
    with pytest.raises(ValueError, match="key name must not contain control"):
        db.create_key("a", name="a\nb\x1b[31m")
    assert db.list_keys() == []
    _, info = db.create_key("a", name="équipe ☕", rpm=0, tpm=2**63 - 1)
    assert (info.rpm, info.tpm) == (0, 2**63 - 1)
    db.close()


def test_a_usage_write_on_a_full_disk_raises_its_own_error(tmp_path):
    """SQLite rolls a transaction back itself when the disk fills: the writer's ROLLBACK then
    failed ("no transaction is active") and hid the real error; the next write still works."""
    import sqlite3
    import time

    from girandole.registry.keystore import Database

    db = Database.in_folder(tmp_path)
    try:
        db._conn.execute("PRAGMA max_page_count = 32")  # a full disk, portably
        row = {
            "time": time.time(), "request_id": "r", "account": "a", "endpoint": "chat",
            "status": 200, "stream": 0, "aborted": 0, "num_choices": 1, "prompt_tokens": 1,
            "cached_tokens": 0, "completion_tokens": 1, "duration_s": 0.1,
            "metadata": "x" * 2000,
        }  # fmt: skip
        with pytest.raises(sqlite3.OperationalError, match="full"):
            db.insert_usage([row] * 200)
        db.insert_usage([row])  # a small write fits: the connection is usable
    finally:
        db.close()
