"""A key's role (admin, user, inference-user): stored with the key, added to a database made
before roles existed (its keys stay `user`s), and applied by the control plane of an app
in-process: `--api-key` keys are `admin`s, an open server is unchanged. A key of a user has its
user's role at each request, stops with its user and at its expiry."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from girandole.registry.keystore import DB_NAME, Database, UserError, digest

# api_keys as it was before keys had roles
OLD_SCHEMA = """CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, account TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
    digest BLOB NOT NULL, created REAL NOT NULL, revoked REAL, rpm INTEGER, tpm INTEGER
)"""
CATALOG_MODEL = "accounts/fireworks/models/gemma-3-270m"  # always in the catalog


def test_a_database_made_before_roles_keeps_its_keys_as_users(tmp_path):
    old_key = "gk_0123456789ab_secret"
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO api_keys (id, account, name, digest, created) VALUES (?, ?, ?, ?, ?)",
        ("0123456789ab", "acme", "old", digest(old_key), time.time()),
    )
    conn.commit()
    conn.close()

    db = Database.in_folder(tmp_path)
    info = db.authenticate(old_key)
    assert info is not None and (info.account, info.role) == ("acme", "user")
    new_key, new = db.create_key("acme", role="inference-user")
    assert db.authenticate(new_key).role == "inference-user" == new.role
    assert {k.name or k.id: k.role for k in db.list_keys()} == {
        "old": "user",
        new.id: "inference-user",
    }
    assert db.set_role(new.id, "user") and db.authenticate(new_key).role == "user"
    assert not db.set_role("nope", "user")
    with pytest.raises(ValueError, match="unknown role 'root'"):
        db.set_role(new.id, "root")
    with pytest.raises(ValueError, match="contributor.*not supported.*inference-user"):
        db.create_key("acme", role="contributor")
    assert db.create_key("acme", role="admin")[1].role == "admin"
    assert db.authenticate(old_key).user_id is None  # the columns added since: NULL
    db.close()
    Database.in_folder(tmp_path).close()  # opening it again: the column is there already


def _create(client, headers: dict[str, str]) -> int:
    return client.post(
        "/v1/accounts/fireworks/deployments",
        params={"validateOnly": "true"},
        json={"baseModel": CATALOG_MODEL},
        headers=headers,
    ).status_code


def test_the_app_applies_roles_and_an_open_server_is_unchanged():
    from fastapi.testclient import TestClient

    from girandole.api.app import create_app
    from girandole.api.settings import ServerSettings
    from girandole.api.state import AppState

    state = AppState(ServerSettings(api_keys=["static"]))
    reader, _ = state.ops.db.create_key("fireworks", role="inference-user")
    with TestClient(create_app(state)) as client:
        assert _create(client, {"Authorization": "Bearer static"}) == 200  # --api-key: an admin
        r = client.post(
            "/v1/accounts/fireworks/deployments",
            json={"baseModel": CATALOG_MODEL},
            headers={"Authorization": f"Bearer {reader}"},
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "PERMISSION_DENIED"
        listed = client.get(
            "/v1/accounts/fireworks/deployments", headers={"Authorization": f"Bearer {reader}"}
        )
        assert listed.status_code == 200 and listed.json()["deployments"] == []

    with TestClient(create_app(AppState(ServerSettings()))) as client:  # no keys at all
        assert _create(client, {}) == 200
        # ... but its first key is made on its machine, not by whoever reaches the port
        for method, path, body in (
            ("POST", "/v1/accounts/fireworks/users?userId=me", {"role": "admin"}),
            ("GET", "/v1/accounts/fireworks/users", None),
            ("POST", "/inference/v1/accounts/fireworks/users/me/apiKeys", {"apiKey": {}}),
        ):
            r = client.request(method, path, json=body)
            assert r.status_code == 403, r.text
            assert "girandole keys create" in r.json()["error"]["message"]
        assert client.app.state.girandole.ops.open  # still open: no key was made


def test_a_key_of_a_user_has_its_users_role_and_ends_with_it(tmp_path):
    db = Database.in_folder(tmp_path)
    db.create_user("acme", "bob", "inference-user", email="bob@example.com")
    key, info = db.create_user_key("acme", "bob", "laptop")
    other_key, _ = db.create_user_key("acme", "bob")
    assert (info.user_id, info.role) == ("bob", "inference-user")
    db.update_user("acme", "bob", {"role": "user"})
    assert db.authenticate(key).role == "user"  # at once, no new key
    with pytest.raises(ValueError, match="belongs to user bob"):
        db.set_role(info.id, "admin")  # the CLI cannot lift a user's key above its user
    assert db.revoke_user_key("acme", "bob", info.id) and db.authenticate(key) is None
    assert not db.revoke_user_key("other", "bob", info.id)  # another account's user: none
    assert [k.id for k in db.user_keys("acme", "bob")] != [info.id]
    db.delete_user("acme", "bob")
    assert db.authenticate(other_key) is None and db.user_keys("acme", "bob") == []
    with pytest.raises(ValueError, match="not found"):
        db.create_user_key("acme", "bob")
    db.create_user("acme", "bob", "user")  # the same id again: the old keys stay dead
    assert db.authenticate(other_key) is None
    db.close()


def test_an_expired_key_is_refused(tmp_path):
    db = Database.in_folder(tmp_path)
    db.create_user("acme", "bob", "user")
    key, _ = db.create_user_key("acme", "bob", expires=time.time() + 0.3)
    assert db.authenticate(key) is not None
    time.sleep(0.4)
    assert db.authenticate(key) is None
    db.close()


def test_a_users_live_keys_are_capped(tmp_path):
    """The cap counts live keys only: a revoked or an expired one frees its place; 0: no cap."""
    db = Database.in_folder(tmp_path)
    db.create_user("acme", "bob", "user")
    _, first = db.create_user_key("acme", "bob", max_keys=2)
    db.create_user_key("acme", "bob", expires=time.time() + 0.3, max_keys=2)
    with pytest.raises(UserError, match="--max-keys-per-user 2") as exc:
        db.create_user_key("acme", "bob", max_keys=2)
    assert (exc.value.status, exc.value.code) == (400, "FAILED_PRECONDITION")
    time.sleep(0.4)
    db.create_user_key("acme", "bob", max_keys=2)  # the expired one no longer counts
    assert db.revoke_user_key("acme", "bob", first.id)
    db.create_user_key("acme", "bob", max_keys=2)  # nor the revoked one
    db.create_user("acme", "cy", "user")  # the cap is per user
    db.create_user_key("acme", "cy", max_keys=2)
    assert db.create_user_key("acme", "bob", max_keys=0)  # no cap
    db.close()


def test_an_account_dates_from_its_first_key_or_user(tmp_path):
    db = Database.in_folder(tmp_path)
    assert db.account_since("acme") is None
    db.create_user("acme", "bob", "user")
    user_time = db.get_user("acme", "bob").created
    assert db.account_since("acme") == user_time
    _, key = db.create_key("other")
    assert db.account_since("other") == key.created and db.account_since("acme") == user_time
    db.revoke_key(key.id)
    assert db.account_since("other") == key.created  # a revoked key's row stays
    db.close()


def test_the_last_admin_user_stays_unless_the_operator_removes_it(tmp_path):
    db = Database.in_folder(tmp_path)
    db.create_user("acme", "ann", "admin")
    with pytest.raises(ValueError, match="last admin"):
        db.update_user("acme", "ann", {"role": "user"})
    with pytest.raises(ValueError, match="last admin"):
        db.delete_user("acme", "ann")
    db.create_user("acme", "cy", "admin")
    db.update_user("acme", "ann", {"role": "user"})  # another admin remains
    db.delete_user("acme", "cy", keep_admin=False)  # the operator's keys may
    assert [u.id for u in db.list_users("acme")] == ["ann"]
    db.close()


def test_the_keys_cli_makes_admins_and_leaves_a_users_key_to_its_user(tmp_path):
    def girandole(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "girandole.cli", "keys", *args, "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    made = girandole("create", "--account", "acme", "--role", "admin", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    db = Database.in_folder(tmp_path)
    assert db.authenticate(key).role == "admin"
    db.create_user("acme", "bob", "inference-user")
    _, info = db.create_user_key("acme", "bob")
    db.close()
    refused = girandole("update", info.id, "--role", "admin")
    assert refused.returncode == 2 and "belongs to user bob" in refused.stderr
    listed = json.loads(girandole("list", "--json").stdout)
    assert {k["id"]: (k["role"], k["user_id"]) for k in listed}[info.id] == (
        "inference-user",
        "bob",
    )
