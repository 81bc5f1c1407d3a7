"""A key's role (user, inference-user): stored with the key, added to a database made before
roles existed (its keys stay `user`s), and applied by the control plane of an app in-process:
`--api-key` keys are `user`s, an open server is unchanged."""

from __future__ import annotations

import sqlite3
import time

import pytest

from girandole.registry.keystore import DB_NAME, Database, digest

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
    with pytest.raises(ValueError, match="inference-user"):
        db.create_key("acme", role="admin")
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
        assert _create(client, {"Authorization": "Bearer static"}) == 200  # --api-key: a user
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
