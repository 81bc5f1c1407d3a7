"""Fireworks' secrets (api/secrets/route.py, registry/secrets.py) with the real fireworks-ai SDK
(`client.secrets`) and httpx against one real `girandole serve` (a tiny random Llama, account
acme with a data dir): the round trip, a value never answered nor logged, keyName unique per
account, each bad input's 400, another account's 403, an inference-user's read-only access,
`env_of_account`, the values encrypted at rest (registry/secret_box.py: no value in the database
file, rows from before encryption sealed on open, GIRANDOLE_SECRETS_KEY, a changed key named), and
the secrets kept over a restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import fireworks
import httpx
import pytest
from api_helpers import api_conftest

from girandole.registry.keystore import Database
from girandole.registry.secret_box import KEY_ENV, KEY_FILE, SecretsUnreadable, new_key
from girandole.registry.secrets import SecretStore, env_of_account

ACCOUNT = "acme"
SECRETS = f"/v1/accounts/{ACCOUNT}/secrets"
VALUE = "sk-very-secret-value-7f3a"  # searched for in every answer and in the server's log


class Server:
    def __init__(self, tmp: Path) -> None:
        self.conftest = api_conftest()
        self.tmp, self.data = tmp, tmp / "data"
        db = Database.in_folder(self.data)
        self.key, _ = db.create_key(ACCOUNT)
        self.reader_key, _ = db.create_key(ACCOUNT, role="inference-user")
        self.other_key, _ = db.create_key("other")
        db.close()
        self.model = self.conftest.write_tiny_llama_for_ops(tmp / "tiny")
        self.start()

    def start(self) -> None:
        self.server = self.conftest.start_server(
            self.tmp, "--model", str(self.model), "--model-id", "tiny", "--account", ACCOUNT,
            "--kv-cache-gb", "0.02", "--data-dir", str(self.data), api_key=self.key,
        )  # fmt: skip

    def sdk(self, key: str | None = None, base: str = "") -> fireworks.Fireworks:
        return fireworks.Fireworks(
            api_key=key or self.key,
            account_id=ACCOUNT,
            base_url=self.server.url + base,
            max_retries=0,
        )

    def http(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        r = httpx.request(method, self.server.url + path, headers=headers, timeout=60, **kw)
        assert VALUE not in r.text, r.text
        return r


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Server:
    s = Server(tmp_path_factory.mktemp("secrets"))
    try:
        yield s
    finally:
        s.conftest.stop_server(s.server)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_round_trip_never_answers_the_value(srv: Server) -> None:
    fw = srv.sdk()
    made = fw.secrets.create(
        name=f"accounts/{ACCOUNT}/secrets/openai", key_name="OPENAI_KEY", value=VALUE
    )
    assert (made.name, made.key_name, made.value) == (f"{SECRETS[4:]}/openai", "OPENAI_KEY", None)
    assert fw.secrets.get("openai").model_dump(by_alias=True, exclude_none=True) == {
        "name": f"accounts/{ACCOUNT}/secrets/openai",
        "keyName": "OPENAI_KEY",
    }
    # the bare id as name; the /inference/v1 prefix too
    fw_inference = srv.sdk(base="/inference")
    fw_inference.secrets.create(name="hf-token", key_name="HF_TOKEN", value="hf_" + VALUE)
    listed = [s.model_dump(by_alias=True, exclude_none=True) for s in fw.secrets.list()]
    assert listed == [
        {"name": f"accounts/{ACCOUNT}/secrets/hf-token", "keyName": "HF_TOKEN"},
        {"name": f"accounts/{ACCOUNT}/secrets/openai", "keyName": "OPENAI_KEY"},
    ]
    for path in (
        SECRETS,
        f"{SECRETS}/openai",
        f"{SECRETS}?readMask=keyName",
        f"{SECRETS}?pageSize=1",
    ):
        srv.http("GET", path)  # http() asserts the value is in no answer
    assert srv.http("GET", f"{SECRETS}/openai?readMask=key_name").json() == {
        "keyName": "OPENAI_KEY"
    }
    page = srv.http("GET", SECRETS, params={"pageSize": 1}).json()
    assert len(page["secrets"]) == 1 and page["nextPageToken"] and page["totalSize"] == 2

    updated = fw.secrets.update("openai", key_name="OPENAI_API_KEY", value=VALUE + "-2")
    assert (updated.key_name, updated.value) == ("OPENAI_API_KEY", None)
    # keyName alone (the value kept), and updateMask naming the one field changed
    srv.http("PATCH", f"{SECRETS}/openai", json={"keyName": "OPENAI_API_KEY"})
    r = srv.http(
        "PATCH", f"{SECRETS}/hf-token", params={"updateMask": "value"},
        json={"keyName": "IGNORED", "value": "hf_" + VALUE + "-2"},
    )  # fmt: skip
    assert r.json()["keyName"] == "HF_TOKEN", r.text
    db = Database.in_folder(srv.data)
    try:
        state = SimpleNamespace(ops=SimpleNamespace(db=db))  # what env_of_account reads
        assert env_of_account(state, ACCOUNT) == {
            "HF_TOKEN": "hf_" + VALUE + "-2",
            "OPENAI_API_KEY": VALUE + "-2",
        }
        assert env_of_account(state, "other") == {}
    finally:
        db.close()

    assert fw.secrets.delete("hf-token") == {}
    error_of(srv.http("GET", f"{SECRETS}/hf-token"), 404)
    error_of(srv.http("DELETE", f"{SECRETS}/hf-token"), 404)
    error_of(srv.http("PATCH", f"{SECRETS}/hf-token", json={"keyName": "X"}), 404)
    assert VALUE not in srv.server.log()


def test_key_name_unique_per_account(srv: Server) -> None:
    srv.sdk().secrets.create(name="first", key_name="SHARED_NAME", value=VALUE)
    r = srv.http("POST", SECRETS, json={"name": "second", "keyName": "SHARED_NAME", "value": VALUE})
    err = error_of(r, 409)
    assert err["code"] == "ALREADY_EXISTS" and f"{SECRETS[4:]}/first" in err["message"], err
    srv.http("POST", SECRETS, json={"name": "second", "keyName": "OTHER_NAME", "value": VALUE})
    err = error_of(srv.http("PATCH", f"{SECRETS}/second", json={"keyName": "SHARED_NAME"}), 409)
    assert f"{SECRETS[4:]}/first" in err["message"], err
    # the same id again
    r = srv.http("POST", SECRETS, json={"name": "first", "keyName": "THIRD_NAME", "value": VALUE})
    assert "already exists" in error_of(r, 409)["message"]
    with pytest.raises(fireworks.ConflictError):
        srv.sdk().secrets.create(name="third", key_name="SHARED_NAME", value=VALUE)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"keyName": "A", "value": VALUE}, "name"),
        ({"name": "x", "value": VALUE}, "keyName"),
        ({"name": "x", "keyName": "A"}, "value"),
        ({"name": "x", "keyName": "A", "value": ""}, "value"),
        ({"name": "x", "keyName": "A", "value": 12345}, "value"),
        ({"name": "x", "keyName": "A", "value": [VALUE]}, "value"),
        ({"name": "Bad_Id", "keyName": "A", "value": VALUE}, "name"),
        ({"name": "accounts/other/secrets/x", "keyName": "A", "value": VALUE}, "name"),
        ({"name": "accounts/acme/datasets/x", "keyName": "A", "value": VALUE}, "name"),
        ({"name": "x", "keyName": "1ABC", "value": VALUE}, "keyName"),
        ({"name": "x", "keyName": "MY-KEY", "value": VALUE}, "keyName"),
        ({"name": "x", "keyName": "A", "value": VALUE, "valu": VALUE}, "valu"),
    ],
)
def test_bad_create_is_a_400_naming_the_field(srv: Server, body: dict, field: str) -> None:
    err = error_of(srv.http("POST", SECRETS, json=body), 400)
    assert err["param"] == field and field in err["message"], err
    assert "12345" not in err["message"]


def test_lone_surrogate_value_is_a_400(srv: Server) -> None:
    body = b'{"name": "x", "keyName": "A", "value": "\\ud800"}'  # JSON's escape: no UTF-8 text
    err = error_of(srv.http("POST", SECRETS, content=body), 400)
    assert err["param"] == "value", err


def test_bad_update_is_a_400(srv: Server) -> None:
    srv.http("POST", SECRETS, json={"name": "patched", "keyName": "PATCHED", "value": VALUE})
    for params, body, field in (
        ({}, {"keyName": "no good"}, "keyName"),
        ({}, {"value": ""}, "value"),
        ({}, {"value": 7}, "value"),
        ({}, {"name": "renamed", "keyName": "PATCHED"}, "name"),
        ({"updateMask": "name"}, {"keyName": "PATCHED"}, "updateMask"),
        ({"updateMask": "value"}, {"keyName": "PATCHED"}, "value"),
    ):
        err = error_of(srv.http("PATCH", f"{SECRETS}/patched", params=params, json=body), 400)
        assert err["param"] == field, (body, err)
    # a GET's body sent back is a PATCH that changes nothing
    got = srv.http("GET", f"{SECRETS}/patched").json()
    assert srv.http("PATCH", f"{SECRETS}/patched", json=got).json() == got
    err = error_of(srv.http("GET", SECRETS, params={"readMask": "value"}), 400)
    assert err["param"] == "readMask", err


def test_roles_and_accounts(srv: Server) -> None:
    srv.http("POST", SECRETS, json={"name": "guarded", "keyName": "GUARDED", "value": VALUE})
    for method, path, body in (
        ("GET", SECRETS, None), ("POST", SECRETS, {"name": "y", "keyName": "Y", "value": VALUE}),
        ("GET", f"{SECRETS}/guarded", None), ("PATCH", f"{SECRETS}/guarded", {"keyName": "Z"}),
        ("DELETE", f"{SECRETS}/guarded", None),
    ):  # fmt: skip
        err = error_of(srv.http(method, path, key=srv.other_key, json=body), 403)
        assert err["code"] == "PERMISSION_DENIED", err
    # an inference-user reads the names, changes nothing
    names = [s.name for s in srv.sdk(srv.reader_key).secrets.list()]
    assert f"accounts/{ACCOUNT}/secrets/guarded" in names
    with pytest.raises(fireworks.PermissionDeniedError):
        srv.sdk(srv.reader_key).secrets.create(name="y", key_name="Y", value=VALUE)
    with pytest.raises(fireworks.PermissionDeniedError):
        srv.sdk(srv.reader_key).secrets.update("guarded", key_name="Z", value=VALUE)
    with pytest.raises(fireworks.PermissionDeniedError):
        srv.sdk(srv.reader_key).secrets.delete("guarded")
    # the other account's own secrets are its own: same keyName, none of acme's
    other = fireworks.Fireworks(
        api_key=srv.other_key, account_id="other", base_url=srv.server.url, max_retries=0
    )
    other.secrets.create(name="guarded", key_name="GUARDED", value="theirs")
    assert [s.key_name for s in other.secrets.list()] == ["GUARDED"]
    error_of(srv.http("GET", "/v1/accounts/acme/secrets/y"), 404)


def test_store_keeps_secrets_in_the_database(tmp_path: Path) -> None:
    db = Database.in_folder(tmp_path)
    store = SecretStore(db)
    store.create("acme", "a", "A_KEY", "one")
    assert store.create("acme", "a", "B_KEY", "two") is None  # the id is taken
    db.close()
    db = Database.in_folder(tmp_path)
    try:
        store = SecretStore(db)
        assert [s.name for s in store.list("acme")] == ["accounts/acme/secrets/a"]
        assert store.values("acme") == {"A_KEY": "one"}
        assert store.update("acme", "a", None, "uno").key_name == "A_KEY"
        assert store.values("acme") == {"A_KEY": "uno"}
        assert store.update("acme", "missing", "X", None) is None
        assert store.delete("acme", "a") and not store.delete("acme", "a")
        assert store.values("acme") == {}
    finally:
        db.close()


def _database_bytes(folder: Path) -> bytes:
    """girandole.db with its write-ahead log: every byte a copy of the database holds."""
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.name.startswith("girandole.db"))


def test_values_are_encrypted_at_rest(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    db = Database.in_folder(tmp_path)
    try:
        store = SecretStore(db)
        store.create("acme", "a", "A_KEY", VALUE)
        store.update("acme", "a", None, VALUE + "-2")
        assert VALUE.encode() not in _database_bytes(tmp_path)
        key_file = tmp_path / KEY_FILE
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert SecretStore(db).values("acme") == {"A_KEY": VALUE + "-2"}  # a second store: same key
        key_file.write_text(new_key())  # the key lost and made again: the value cannot be read
        with pytest.raises(SecretsUnreadable, match="secret accounts/acme/secrets/a cannot be"):
            SecretStore(db).values("acme")
    finally:
        db.close()


def test_plaintext_rows_from_before_encryption_are_sealed(tmp_path: Path, monkeypatch) -> None:
    """A database of a server before encryption (no `sealed` column, values as given)."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = tmp_path / "girandole.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE secrets (account TEXT NOT NULL, id TEXT NOT NULL, key_name TEXT NOT NULL,"
        " value TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,"
        " PRIMARY KEY (account, id), UNIQUE (account, key_name))"
    )
    old.execute("INSERT INTO secrets VALUES ('acme', 'old', 'OLD_KEY', ?, 1.0, 1.0)", (VALUE,))
    old.commit()
    old.close()
    db = Database.in_folder(tmp_path)
    try:
        store = SecretStore(db)
        store.create("acme", "new", "NEW_KEY", "fresh")
        ((stored,),) = db.execute("SELECT value FROM secrets WHERE id = 'old'")
        assert VALUE not in stored
        expected = {"NEW_KEY": "fresh", "OLD_KEY": VALUE}
        assert store.values("acme") == expected
        assert SecretStore(db).values("acme") == expected  # opened again: nothing sealed twice
    finally:
        db.close()
    assert VALUE.encode() not in _database_bytes(tmp_path)  # not in a freed page either


def test_stores_on_one_in_memory_database_share_its_key(monkeypatch) -> None:
    """No --data-dir: the routes' store and env_of_account's are opened apart on one database."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    db, other = Database(None), Database(None)
    try:
        SecretStore(db).create("acme", "a", "A_KEY", VALUE)
        state = SimpleNamespace(ops=SimpleNamespace(db=db))  # what env_of_account reads
        assert env_of_account(state, "acme") == {"A_KEY": VALUE}
        ((token,),) = db.execute("SELECT value FROM secrets")
        other_box = SecretStore(other).box  # another database's key cannot read it
        with pytest.raises(SecretsUnreadable):
            other_box.decrypt(token, "secret a")
    finally:
        db.close()
        other.close()


def test_key_from_the_environment_stays_off_the_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, new_key())
    db = Database.in_folder(tmp_path)
    try:
        SecretStore(db).create("acme", "a", "A_KEY", VALUE)
        assert not (tmp_path / KEY_FILE).exists()
        assert SecretStore(db).values("acme") == {"A_KEY": VALUE}
        monkeypatch.setenv(KEY_ENV, new_key())
        with pytest.raises(SecretsUnreadable, match=KEY_ENV):
            SecretStore(db).values("acme")
        monkeypatch.setenv(KEY_ENV, "not-a-key")
        with pytest.raises(ValueError, match="not a Fernet key"):
            SecretStore(db)
    finally:
        db.close()


def test_restart_keeps_secrets(srv: Server) -> None:
    """Last in the module: the server is started again on its data dir."""
    srv.sdk().secrets.create(name="durable", key_name="DURABLE", value=VALUE)
    srv.conftest.stop_server(srv.server)
    srv.start()
    assert srv.sdk().secrets.get("durable").key_name == "DURABLE"
    assert VALUE not in srv.server.log()
    assert VALUE.encode() not in _database_bytes(srv.data)


def test_a_server_with_a_bad_key_does_not_start(tmp_path: Path, monkeypatch) -> None:
    """The store opens with the app (api/secrets/route.py): a GIRANDOLE_SECRETS_KEY that is no
    Fernet key stops the start, naming it, instead of failing the first secrets request."""
    import argparse

    from girandole.api.app import create_app
    from girandole.api.server import add_serve_parser, settings_from_args
    from girandole.api.state import AppState

    monkeypatch.setenv(KEY_ENV, "not-a-key")
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path / "data"), "--account", ACCOUNT])
    with pytest.raises(ValueError, match=f"{KEY_ENV}.*not a Fernet key"):
        create_app(AppState(settings_from_args(args)))
