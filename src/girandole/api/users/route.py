"""Routes of Fireworks' account users and API keys (the fireworks-ai SDK's `client.users` and
`client.api_keys`, firectl's user and api-key commands):

    POST   /v1/accounts/{a}/users[?userId=U]          create a user   {role, displayName, email}
                                                      (no userId: one made from the email)
    GET    /v1/accounts/{a}/users                     list (pageSize, pageToken, filter, orderBy,
                                                      readMask)
    GET    /v1/accounts/{a}/users/{u}                 get
    PATCH  /v1/accounts/{a}/users/{u}                 change role, displayName, email
    DELETE /v1/accounts/{a}/users/{u}                 delete it and revoke its keys
    POST   /v1/accounts/{a}/users/{u}/apiKeys         a new key of the user {apiKey: {displayName,
                                                      expireTime}}: its secret, shown only here;
                                                      400 at --max-keys-per-user live keys
    GET    /v1/accounts/{a}/users/{u}/apiKeys         its live keys (never their secrets)
    POST   /v1/accounts/{a}/users/{u}/apiKeys:delete  revoke one {keyId}

also under /inference/v1. Who may (registry/roles.py): a key of the account only (another
account's: 403 on every route); every role lists and reads the account's users and manages the
keys of its own user; only an `admin` creates, changes and deletes users and manages the keys
of other users. A key's role is its user's at each request, so these routes cannot raise a
key above its user, and a non-admin cannot change any user (its own role included). A key of a
user cannot demote or delete the last admin user of its account (409: an account managed over
REST keeps an admin); the operator's keys, of no user (`--api-key`, `girandole keys`), may,
since they do not depend on the account's users. An open server (no keys) refuses
them all (403): its first key is made with `girandole keys create`, so that nobody who merely
reaches the port can make the key that closes it to everyone else.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request

from girandole.api.deployments.route import authenticate, read_json
from girandole.api.http.errors import APIError
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.openapi import body_doc
from girandole.api.ops.tracking import Principal
from girandole.api.users.schema import CreateApiKeyBody, DeleteApiKeyBody, UserBody
from girandole.api.users.user_ids import candidate_ids
from girandole.registry.deployments import format_time
from girandole.registry.keystore import Database, KeyInfo, UserError, UserInfo
from girandole.registry.naming import is_valid_id
from girandole.registry.roles import ADMIN, check_role, may_manage_users

USER_FIELDS = {
    "name", "role", "displayName", "email", "serviceAccount", "createTime", "updateTime", "state",
}  # fmt: skip
KEY_FIELDS = {"name", "keyId", "displayName", "createTime", "expireTime", "prefix", "email"}
MAX_DISPLAY_NAME = 63  # Fireworks: "fewer than 64 characters"
MAX_EMAIL = 320
KEY_ID = re.compile(r"[0-9a-f]{1,64}")


def _denied(message: str) -> APIError:
    return APIError(403, message, type="error", code="PERMISSION_DENIED")


async def caller(request: Request, account: str) -> Principal:
    """The key asking (401 without a live one), when it may use these routes for `account`:
    403 on an open server or for a key of another account; 400 for an invalid account id."""
    principal = authenticate(request)
    if principal.account is None:
        raise _denied(
            "This server has no API keys, so it is open to every request; users and API keys"
            " are managed over REST only once it has one. Create the first key on the server's"
            " machine: `girandole keys create --account ACCOUNT --role admin`"
        )
    if not is_valid_id(account):
        raise APIError(
            400,
            f"{account!r} is not a valid account id: 1-63 characters of a-z, 0-9 and '-'",
            param="account",
        )
    if principal.account != account:
        raise _denied(
            f"This API key belongs to account {principal.account}; it cannot manage account"
            f" {account}"
        )
    return principal


Caller = Depends(caller)


def require_admin(request: Request, principal: Principal, why: str) -> None:
    """403 unless the key's role may manage users (`why`: what needs it)."""
    if not may_manage_users(principal.role):
        raise _denied(
            f"This API key has role {principal.role}; {why}, so {request.method}"
            f" {request.url.path} needs a key with role {ADMIN}"
        )


def require_keys_of(request: Request, principal: Principal, user_id: str) -> None:
    """Every role manages the keys of its own user; those of another user need an admin."""
    if principal.user_id is None or principal.user_id != user_id:
        require_admin(request, principal, "only an admin manages the API keys of another user")


def check_user_id(user_id: str, param: str = "userId") -> str:
    if not is_valid_id(user_id):
        raise APIError(
            400,
            f"{user_id!r} is not a valid user id: 1-63 characters of a-z, 0-9 and '-'",
            param=param,
        )
    return user_id


def db_of(request: Request) -> Database:
    return request.app.state.girandole.ops.db


def user_error(exc: UserError) -> APIError:
    return APIError(exc.status, str(exc), code=exc.code)


def _text(value: str | None, field: str, limit: int) -> str | None:
    """A display name or email: printable (they are shown by lists and firectl) and short."""
    if value is None:
        return None
    if len(value) > limit or not value.isprintable():
        raise APIError(
            400, f"{field} must be at most {limit} printable characters, got {value!r}", param=field
        )
    return value


def _role(role: str) -> str:
    try:
        return check_role(role)
    except ValueError as exc:
        raise APIError(400, str(exc), param="role") from None


def user_json(user: UserInfo) -> dict[str, Any]:
    return {
        "name": f"accounts/{user.account}/users/{user.id}",
        "role": user.role,
        "displayName": user.display_name,
        "email": user.email,
        "serviceAccount": user.service_account,
        "createTime": format_time(user.created),
        "updateTime": format_time(user.updated),
        "state": "READY",
    }


def key_json(info: KeyInfo, email: str, secret: str | None = None) -> dict[str, Any]:
    """An APIKey; `key` (the secret) only in the answer that created it."""
    body: dict[str, Any] = {
        "name": f"accounts/{info.account}/users/{info.user_id}/apiKeys/{info.id}",
        "keyId": info.id,
        "displayName": info.name,
        "createTime": format_time(info.created),
        "prefix": f"gk_{info.id}",  # the key's id part: not secret
        "email": email,
        "secure": True,  # the server keeps only a digest of the key
    }
    if info.expires is not None:
        body["expireTime"] = format_time(info.expires)
    if secret is not None:
        body["key"] = secret
    return body


def parse_expire_time(text: str | None) -> float | None:
    """`expireTime` (RFC 3339; no offset: UTC) as a time in the future, else a 400."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise APIError(
            400, f"apiKey.expireTime is not an RFC 3339 time: {text!r}", param="apiKey.expireTime"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    expires = when.timestamp()
    if expires <= datetime.now(UTC).timestamp():
        raise APIError(400, f"apiKey.expireTime is in the past: {text}", param="apiKey.expireTime")
    return expires


def existing_user(request: Request, account: str, user_id: str) -> UserInfo:
    user = db_of(request).get_user(account, check_user_id(user_id, "user"))
    if user is None:
        raise APIError(404, f"user {user_id!r} not found in account {account}", code="NOT_FOUND")
    return user


router = APIRouter(tags=["users"])

# Routes with a ':verb' suffix come first.


@router.post(
    "/accounts/{account}/users/{user_id}/apiKeys:delete",
    openapi_extra=body_doc(DeleteApiKeyBody),
    summary="Delete (revoke) an API key of a user",
)
async def delete_api_key(
    account: str, user_id: str, request: Request, principal: Principal = Caller
) -> dict:
    require_keys_of(request, principal, user_id)
    body = await read_json(request, DeleteApiKeyBody)
    existing_user(request, account, user_id)
    # a key id is hex (keystore._new_key): anything else names no key, and is not sent to
    # SQLite (a lone surrogate there would be a 500)
    if not KEY_ID.fullmatch(body.keyId) or not db_of(request).revoke_user_key(
        account, user_id, body.keyId
    ):
        raise APIError(
            404,
            f"API key {body.keyId!r} not found for user {user_id} of account {account}",
            code="NOT_FOUND",
            param="keyId",
        )
    return {}


@router.post(
    "/accounts/{account}/users/{user_id}/apiKeys",
    openapi_extra=body_doc(CreateApiKeyBody),
    summary="Create an API key of a user",
)
async def create_api_key(
    account: str, user_id: str, request: Request, principal: Principal = Caller
) -> dict:
    require_keys_of(request, principal, user_id)
    body = (await read_json(request, CreateApiKeyBody)).apiKey
    name = _text(body.displayName, "apiKey.displayName", MAX_DISPLAY_NAME) or ""
    expires = parse_expire_time(body.expireTime)
    user = existing_user(request, account, user_id)
    try:
        secret, info = db_of(request).create_user_key(
            account, user_id, name, expires, request.app.state.girandole.settings.max_keys_per_user
        )
    except UserError as exc:  # deleted meanwhile, or at its cap of keys
        raise user_error(exc) from None
    return key_json(info, user.email, secret)


@router.get("/accounts/{account}/users/{user_id}/apiKeys", summary="List the API keys of a user")
async def list_api_keys(
    account: str,
    user_id: str,
    request: Request,
    principal: Principal = Caller,
    query: ListParams = ListQuery,
) -> dict:
    require_keys_of(request, principal, user_id)
    user = existing_user(request, account, user_id)
    keys = [key_json(k, user.email) for k in db_of(request).user_keys(account, user_id)]
    return list_page(keys, "apiKeys", query, KEY_FIELDS, [("createTime", False)])


@router.post("/accounts/{account}/users", openapi_extra=body_doc(UserBody), summary="Create a user")
async def create_user(
    account: str,
    request: Request,
    principal: Principal = Caller,
    user_id: str | None = Query(default=None, alias="userId"),
) -> dict:
    require_admin(request, principal, "only an admin creates users")
    body = await read_json(request, UserBody)
    if user_id is not None:
        check_user_id(user_id)
    if body.role is None:
        raise APIError(400, "role is required: one of admin, user, inference-user", param="role")
    role = _role(body.role)
    display_name = _text(body.displayName, "displayName", MAX_DISPLAY_NAME) or ""
    email = _text(body.email, "email", MAX_EMAIL) or ""
    db = db_of(request)
    # no userId: as Fireworks, one made from the email (user_ids.py), suffixed while taken
    ids = [user_id] if user_id is not None else candidate_ids(email)
    for candidate in ids:
        try:
            user = db.create_user(
                account, candidate, role, display_name, email, bool(body.serviceAccount)
            )
        except UserError as exc:
            if user_id is not None or exc.code != "ALREADY_EXISTS":
                raise user_error(exc) from None
            continue
        return user_json(user)
    raise APIError(  # every generated id taken: astronomically unlikely
        409, "could not generate a free user id: give one as userId", code="ALREADY_EXISTS"
    )


@router.get("/accounts/{account}/users", summary="List users")
async def list_users(
    account: str, request: Request, principal: Principal = Caller, query: ListParams = ListQuery
) -> dict:
    users = [user_json(u) for u in db_of(request).list_users(account)]
    return list_page(users, "users", query, USER_FIELDS, [])


@router.get("/accounts/{account}/users/{user_id}", summary="Get a user")
async def get_user(
    account: str,
    user_id: str,
    request: Request,
    principal: Principal = Caller,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    return read_masked(user_json(existing_user(request, account, user_id)), read_mask, USER_FIELDS)


@router.patch(
    "/accounts/{account}/users/{user_id}",
    openapi_extra=body_doc(UserBody),
    summary="Update a user",
)
async def update_user(
    account: str, user_id: str, request: Request, principal: Principal = Caller
) -> dict:
    require_admin(request, principal, "only an admin changes users")
    body = await read_json(request, UserBody)
    check_user_id(user_id, "user")
    changes: dict[str, Any] = {}
    if body.role is not None:
        changes["role"] = _role(body.role)
    if body.displayName is not None:
        changes["display_name"] = _text(body.displayName, "displayName", MAX_DISPLAY_NAME)
    if body.email is not None:
        changes["email"] = _text(body.email, "email", MAX_EMAIL)
    if body.serviceAccount is not None:
        changes["service_account"] = int(body.serviceAccount)
    try:
        keep_admin = principal.user_id is not None  # see the module's docstring
        return user_json(db_of(request).update_user(account, user_id, changes, keep_admin))
    except UserError as exc:
        raise user_error(exc) from None


@router.delete("/accounts/{account}/users/{user_id}", summary="Delete a user and its keys")
async def delete_user(
    account: str, user_id: str, request: Request, principal: Principal = Caller
) -> dict:
    require_admin(request, principal, "only an admin deletes users")
    check_user_id(user_id, "user")
    try:
        db_of(request).delete_user(account, user_id, keep_admin=principal.user_id is not None)
    except UserError as exc:
        raise user_error(exc) from None
    return {}


def install_users(app: FastAPI, prefixes: tuple[str, ...]) -> None:
    """Serve the users and keys routes under each of `prefixes` (/v1 and /inference/v1)."""
    for prefix in prefixes:  # the OpenAPI document shows the /v1 copy; /inference/v1 is an alias
        app.include_router(router, prefix=prefix, include_in_schema=prefix.startswith("/v1"))
