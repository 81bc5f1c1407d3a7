"""Users and API keys over REST (api/users/route.py), with the real fireworks-ai SDK
(`client.users`, `client.api_keys`) and httpx against one real `girandole serve` (a tiny random
Llama as account acme's model): the operator's `--api-key` is acme's admin; a key of account
`other` with role admin is acme's stranger. Who may do what, a role change applying to a
user's keys at once, a deleted user's and an expired key's 401, user ids made from emails, the
cap on a user's keys, `client.accounts`, and each refusal's 4xx."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fireworks
import httpx
import openai
import pytest
from api_helpers import api_conftest

from girandole.api.users.user_ids import id_from_email
from girandole.registry.keystore import Database
from girandole.registry.naming import is_valid_id

ACCOUNT = "acme"
ADMIN_KEY = "users-operator-key"
MODEL = f"accounts/{ACCOUNT}/models/tiny"
CATALOG_MODEL = "accounts/fireworks/models/gemma-3-270m"  # always in the catalog
USERS = f"/v1/accounts/{ACCOUNT}/users"
KEY_CAP = 3  # --max-keys-per-user: the other tests make at most 3 keys of one user


class Server:
    def __init__(self, tmp: Path) -> None:
        self.conftest = api_conftest()
        data = tmp / "data"
        db = Database.in_folder(data)
        self.stranger_key, _ = db.create_key("other", "other admin", role="admin")
        db.close()
        tiny = self.conftest.write_tiny_llama_for_ops(tmp / "tiny")
        self.server = self.conftest.start_server(
            tmp, "--model", str(tiny), "--model-id", "tiny", "--account", ACCOUNT,
            "--api-key", ADMIN_KEY, "--kv-cache-gb", "0.02", "--data-dir", str(data),
            "--max-keys-per-user", str(KEY_CAP), api_key=ADMIN_KEY,
        )  # fmt: skip
        self.url = self.server.url

    def sdk(self, key: str = ADMIN_KEY) -> fireworks.Fireworks:
        return fireworks.Fireworks(
            api_key=key, account_id=ACCOUNT, base_url=self.url, max_retries=0
        )

    def http(self, method: str, path: str, key: str = ADMIN_KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kw)

    def may_change(self, key: str) -> int:
        """A deployment's create, validated only: the status the key gets."""
        r = self.http(
            "POST", f"/v1/accounts/{ACCOUNT}/deployments", key,
            params={"validateOnly": "true"}, json={"baseModel": CATALOG_MODEL},
        )  # fmt: skip
        if r.status_code == 403:  # how to lift it: its user's role, not `girandole keys`
            assert "PATCH /v1/accounts/acme/users/" in r.json()["error"]["message"], r.text
        return r.status_code


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Server:
    s = Server(tmp_path_factory.mktemp("users"))
    try:
        yield s
    finally:
        s.conftest.stop_server(s.server)


def denied(exc: pytest.ExceptionInfo, needs: str) -> None:
    body = exc.value.response.json()["error"]
    assert body["code"] == "PERMISSION_DENIED" and needs in body["message"], body


def test_an_inference_user_manages_only_its_own_keys(srv):
    admin = srv.sdk()
    user = admin.users.create(
        user_id="reader", role="inference-user", display_name="Reader", email="r@example.com"
    )
    assert (user.name, user.role, user.email) == (f"accounts/{ACCOUNT}/users/reader",
                                                  "inference-user", "r@example.com")  # fmt: skip
    admin.users.create(user_id="peer", role="user")
    made = admin.api_keys.create("reader", api_key={"display_name": "laptop"})
    key = made.key
    assert key.startswith(f"gk_{made.key_id}_") and made.display_name == "laptop"
    peer_key = admin.api_keys.create("peer", api_key={}).key

    # inference, and reading the account's users
    out = openai.OpenAI(api_key=key, base_url=srv.url + "/v1", max_retries=0).completions.create(
        model=MODEL, prompt="hi", max_tokens=2
    )
    assert out.choices[0].text is not None
    reader = srv.sdk(key)
    assert {"reader", "peer"} <= {u.name.rsplit("/", 1)[1] for u in reader.users.list()}
    assert reader.users.get("peer").role == "user"
    assert srv.may_change(key) == 403

    # its own keys: create, list (no secrets), delete
    second = reader.api_keys.create("reader", api_key={"display_name": "second"})
    listed = list(reader.api_keys.list("reader"))
    assert {k.key_id for k in listed} == {made.key_id, second.key_id}
    assert (
        all(k.key is None for k in listed)
        and key not in srv.http("GET", f"{USERS}/reader/apiKeys").text
    )
    reader.api_keys.delete("reader", key_id=second.key_id)
    assert srv.http("GET", USERS, second.key).status_code == 401
    assert srv.http("GET", USERS, key).status_code == 200

    # nothing of another user's keys, no user management, no escalation
    with pytest.raises(fireworks.PermissionDeniedError) as exc:
        reader.api_keys.list("peer")
    denied(exc, "needs a key with role admin")
    with pytest.raises(fireworks.PermissionDeniedError):
        reader.api_keys.create("peer", api_key={})
    peer_key_id = next(iter(admin.api_keys.list("peer"))).key_id
    with pytest.raises(fireworks.PermissionDeniedError):
        reader.api_keys.delete("peer", key_id=peer_key_id)
    assert srv.http("GET", USERS, peer_key).status_code == 200  # not revoked
    with pytest.raises(fireworks.PermissionDeniedError) as exc:
        reader.users.create(user_id="mallory", role="admin")
    denied(exc, "only an admin creates users")
    with pytest.raises(fireworks.PermissionDeniedError):
        reader.users.update("reader", role="admin")
    r = srv.http("DELETE", f"{USERS}/peer", key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "PERMISSION_DENIED"
    assert admin.users.get("reader").role == "inference-user"

    # a peer (role user) is no admin either
    with pytest.raises(fireworks.PermissionDeniedError):
        srv.sdk(peer_key).api_keys.create("reader", api_key={})


def test_lists_filter_and_page(srv):
    admin = srv.sdk()
    for name in ("pager-a", "pager-b", "pager-c"):
        admin.users.create(user_id=name, role="inference-user" if name != "pager-b" else "user")
        admin.api_keys.create("pager-a", api_key={"display_name": name})
    paged = [u.name for u in admin.users.list(page_size=1)]  # the SDK follows nextPageToken
    assert paged == sorted(paged) and {f"accounts/{ACCOUNT}/users/pager-{x}" for x in "abc"} <= set(
        paged
    )
    found = admin.users.list(filter='role = "user" AND name:"pager"')
    assert [u.name for u in found] == [f"accounts/{ACCOUNT}/users/pager-b"]
    keys = list(admin.api_keys.list("pager-a", page_size=2))
    assert [k.display_name for k in keys] == ["pager-a", "pager-b", "pager-c"]  # oldest first


def test_a_role_change_applies_at_once_and_deleting_a_user_ends_its_keys(srv):
    admin = srv.sdk()
    admin.users.create(user_id="mover", role="inference-user")
    key = admin.api_keys.create("mover", api_key={}).key
    assert srv.may_change(key) == 403
    assert admin.users.update("mover", role="user").role == "user"
    assert srv.may_change(key) == 200  # the same key, no new one
    r = srv.http("DELETE", f"/inference/v1/accounts/{ACCOUNT}/users/mover")
    assert (r.status_code, r.json()) == (200, {})
    assert srv.http("GET", USERS, key).status_code == 401
    r = srv.http("POST", "/v1/completions", key, json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401
    with pytest.raises(fireworks.NotFoundError):
        admin.users.get("mover")


def test_an_expired_key_gets_401(srv):
    admin = srv.sdk()
    admin.users.create(user_id="brief", role="user")
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    made = admin.api_keys.create("brief", api_key={"expire_time": soon})
    assert made.expire_time is not None
    assert srv.http("GET", USERS, made.key).status_code == 200
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)
    assert srv.http("GET", USERS, made.key).status_code == 401


def test_an_admin_user_keeps_its_account_an_admin(srv):
    admin = srv.sdk()
    admin.users.create(user_id="boss", role="admin")
    boss = srv.sdk(admin.api_keys.create("boss", api_key={}).key)
    boss.users.create(user_id="helper", role="user")  # an admin user manages users
    assert boss.api_keys.create("helper", api_key={}).key
    with pytest.raises(fireworks.ConflictError) as exc:
        boss.users.update("boss", role="user")  # the last admin user of acme
    assert exc.value.response.json()["error"]["code"] == "FAILED_PRECONDITION"
    boss.users.update("helper", role="admin")
    assert boss.users.update("boss", role="user").role == "user"  # another admin remains
    with pytest.raises(fireworks.PermissionDeniedError):
        boss.users.update("boss", role="admin")  # no longer an admin: no way back by itself
    assert admin.users.update("helper", role="user").role == "user"  # the operator may


def test_a_user_without_user_id_gets_one_from_its_email(srv):
    admin = srv.sdk()
    first = admin.users.create(role="user", email="José.Díaz+x@example.com")
    assert first.name == f"accounts/{ACCOUNT}/users/jose-diaz-x" and first.role == "user"
    again = admin.users.create(role="user", email="jose.diaz-x@example.org")  # the same id: taken
    assert re.fullmatch(rf"accounts/{ACCOUNT}/users/jose-diaz-x-[0-9a-f]{{6}}", again.name)
    for email in (None, "42@example.com"):  # nothing usable: a random id
        made = admin.users.create(role="inference-user", **({"email": email} if email else {}))
        assert re.fullmatch(rf"accounts/{ACCOUNT}/users/user-[0-9a-f]{{6}}", made.name)
    assert admin.users.get("jose-diaz-x").email == "José.Díaz+x@example.com"


@pytest.mark.parametrize(
    "email, expected",
    [("Ann.Lee@x.io", "ann-lee"), ("__9-bob__@x", "bob"), ("@x", None), ("ß@x", "ss"),
     ("日本@x", None), ("a" * 80 + "@x", "a" * 56), ("a" * 55 + ".b@x", "a" * 55), ("", None)],
)  # fmt: skip
def test_an_emails_id_is_a_valid_id_with_room_for_a_suffix(email, expected):
    made = id_from_email(email)
    assert made == expected
    assert made is None or is_valid_id(made + "-abcdef")


def test_a_users_keys_are_capped(srv):
    admin = srv.sdk()
    admin.users.create(user_id="hoarder", role="user")
    hoarder = srv.sdk(admin.api_keys.create("hoarder", api_key={}).key)
    made = [hoarder.api_keys.create("hoarder", api_key={}) for _ in range(KEY_CAP - 1)]
    for sdk in (hoarder, admin):  # the admin too: the cap is the user's
        with pytest.raises(fireworks.BadRequestError) as exc:
            sdk.api_keys.create("hoarder", api_key={"display_name": "one more"})
        error = exc.value.response.json()["error"]
        assert error["code"] == "FAILED_PRECONDITION", error
        assert f"--max-keys-per-user {KEY_CAP}" in error["message"]
        assert "apiKeys:delete" in error["message"]
    assert len(list(admin.api_keys.list("hoarder"))) == KEY_CAP
    hoarder.api_keys.delete("hoarder", key_id=made[0].key_id)  # frees a place
    assert hoarder.api_keys.create("hoarder", api_key={}).key


def test_accounts_are_the_keys_own(srv):
    admin = srv.sdk()
    listed = list(admin.accounts.list())
    assert [a.name for a in listed] == [f"accounts/{ACCOUNT}"]
    got = admin.accounts.get()
    assert (got.name, got.display_name, got.email, got.state, got.suspend_state) == (
        f"accounts/{ACCOUNT}",
        ACCOUNT,
        "",
        "READY",
        "UNSUSPENDED",
    )
    assert got.status.code == "OK" and got.account_type == "ACCOUNT_TYPE_UNSPECIFIED"
    assert got.create_time == got.update_time and got.create_time <= datetime.now(UTC)
    assert listed[0] == got

    # a key of a user with an email: its email; the account dates from its earliest key
    admin.users.create(user_id="viewer", role="inference-user", email="v@example.com")
    made = admin.api_keys.create("viewer", api_key={})
    viewer = srv.sdk(made.key).accounts.get(account_id=ACCOUNT)
    assert viewer.email == "v@example.com" and viewer.create_time <= made.create_time

    # another account's key: its own account only, 403 for acme's
    stranger = srv.sdk(srv.stranger_key)
    assert [a.name for a in stranger.accounts.list()] == ["accounts/other"]
    with pytest.raises(fireworks.PermissionDeniedError) as exc:
        stranger.accounts.get(account_id=ACCOUNT)
    denied(exc, "belongs to account other")

    r = srv.http("GET", f"/inference/v1/accounts/{ACCOUNT}", params={"readMask": "name,email"})
    assert r.json() == {"name": f"accounts/{ACCOUNT}", "email": ""}
    r = srv.http("GET", "/v1/accounts", params={"filter": 'name = "accounts/nope"'})
    assert r.json()["accounts"] == []
    for path, params, status, param in [
        ("/v1/accounts/Bad_Id", {}, 400, "account"),
        ("/v1/accounts/acme", {"readMask": "owner"}, 400, "readMask"),
        ("/v1/accounts", {"pageToken": "nope"}, 400, "pageToken"),
    ]:
        r = srv.http("GET", path, params=params)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
    for path in ("/v1/accounts", f"/v1/accounts/{ACCOUNT}"):
        assert srv.http("GET", path, "gk_nobody_x").status_code == 401


@pytest.mark.parametrize(
    "method, path, body, status, param",
    [
        ("POST", f"{USERS}?userId=x1", {"role": "root"}, 400, "role"),
        ("POST", f"{USERS}?userId=x1", {"role": "contributor"}, 400, "role"),
        ("POST", f"{USERS}?userId=Bad_Id", {"role": "user"}, 400, "userId"),
        ("POST", f"{USERS}?userId=x1", {"displayName": "no role"}, 400, "role"),
        ("POST", f"{USERS}?userId=x1", {"role": "user", "extra": 1}, 400, None),
        ("PATCH", f"{USERS}/fixed", {"role": "contributor"}, 400, "role"),
        ("POST", f"{USERS}?userId=fixed", {"role": "user"}, 409, None),
        ("GET", f"{USERS}/ghost", None, 404, None),
        ("PATCH", f"{USERS}/ghost", {"role": "user"}, 404, None),
        ("DELETE", f"{USERS}/ghost", None, 404, None),
        ("GET", f"{USERS}/ghost/apiKeys", None, 404, None),
        ("POST", f"{USERS}/ghost/apiKeys", {"apiKey": {}}, 404, None),
        ("POST", f"{USERS}/fixed/apiKeys:delete", {"keyId": "000000000000"}, 404, "keyId"),
        ("POST", f"{USERS}/fixed/apiKeys:delete", {}, 400, None),
        ("POST", f"{USERS}/fixed/apiKeys", {"apiKey": {"expireTime": "2020-01-01T00:00:00Z"}},
         400, "apiKey.expireTime"),
        ("POST", f"{USERS}/fixed/apiKeys", {"apiKey": {"expireTime": "soon"}},
         400, "apiKey.expireTime"),
        ("GET", f"{USERS}?pageToken=nope", None, 400, "pageToken"),
        # hostile strings: a 4xx, never a 500 (SQLite cannot store a lone surrogate)
        ("POST", f"{USERS}/fixed/apiKeys:delete", {"keyId": "\ud800"}, 400, "keyId"),
        ("POST", f"{USERS}/fixed/apiKeys", {"apiKey": {"displayName": "\ud800"}},
         400, "apiKey.displayName"),
        ("POST", f"{USERS}/fixed/apiKeys", {"apiKey": {"expireTime": "\ud800"}},
         400, "apiKey.expireTime"),
        ("POST", f"{USERS}/fixed/apiKeys:delete", {"keyId": "gk_x'--"}, 404, "keyId"),
        ("PATCH", f"{USERS}/fixed", {"email": "a\nb"}, 400, "email"),
        ("PATCH", f"{USERS}/fixed", {"displayName": "x" * 64}, 400, "displayName"),
        ("POST", f"{USERS}?userId=%ED%A0%80", {"role": "user"}, 400, "userId"),
        ("GET", f"{USERS}/%ED%A0%80", None, 400, "user"),
    ],
)  # fmt: skip
def test_each_bad_request_gets_its_4xx(srv, method, path, body, status, param):
    if srv.http("GET", f"{USERS}/fixed").status_code == 404:
        srv.sdk().users.create(user_id="fixed", role="user")
    # json.dumps escapes a lone surrogate, which httpx's json= cannot encode
    content = None if body is None else json.dumps(body)
    r = srv.http(method, path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (param is None or error["param"] == param), error
    assert error["code"] == {404: "NOT_FOUND", 409: "ALREADY_EXISTS"}.get(status, error["code"])
    if body and body.get("role") == "contributor":
        assert "does not track" in error["message"]


ROUTES = [
    ("POST", "/users?userId=x2", {"role": "user"}),
    ("GET", "/users", None),
    ("GET", "/users/fixed", None),
    ("PATCH", "/users/fixed", {"role": "admin"}),
    ("DELETE", "/users/fixed", None),
    ("POST", "/users/fixed/apiKeys", {"apiKey": {}}),
    ("GET", "/users/fixed/apiKeys", None),
    ("POST", "/users/fixed/apiKeys:delete", {"keyId": "000000000000"}),
]


@pytest.mark.parametrize("prefix", ["/v1", "/inference/v1"])
@pytest.mark.parametrize("method, path, body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_another_accounts_admin_is_refused_on_every_route(srv, prefix, method, path, body):
    if srv.http("GET", f"{USERS}/fixed").status_code == 404:
        srv.sdk().users.create(user_id="fixed", role="user")
    url = f"{prefix}/accounts/{ACCOUNT}{path}"
    r = srv.http(method, url, srv.stranger_key, json=body)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "PERMISSION_DENIED" and "belongs to account other" in error["message"]
    assert srv.http(method, url, "gk_nobody_x", json=body).status_code == 401
    assert srv.http("GET", f"{USERS}/fixed").json()["role"] == "user"  # unchanged


def test_a_conflict_is_not_retried_by_the_sdks(srv):
    """A 409 says `x-should-retry: false`: the Stainless SDKs would send it twice more (with
    back-off) otherwise, to get the same conflict."""
    sent: list[str] = []
    client = httpx.Client(event_hooks={"request": [lambda r: sent.append(r.method)]})
    sdk = fireworks.Fireworks(
        api_key=ADMIN_KEY, account_id=ACCOUNT, base_url=srv.url, http_client=client
    )  # max_retries: the SDK's default (2)
    sdk.users.create(user_id="twice", role="user")
    sent.clear()
    with pytest.raises(fireworks.ConflictError) as exc:
        sdk.users.create(user_id="twice", role="user")
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert sent == ["POST"]
