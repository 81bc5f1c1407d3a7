"""Routes of Fireworks' secrets (the fireworks-ai SDK's `client.secrets`):

    POST   /v1/accounts/{a}/secrets        create {name, keyName, value}
    GET    /v1/accounts/{a}/secrets        list (pageSize, pageToken, filter, orderBy, readMask)
    GET    /v1/accounts/{a}/secrets/{s}    get (readMask)
    PATCH  /v1/accounts/{a}/secrets/{s}    update {keyName, value} (?updateMask)
    DELETE /v1/accounts/{a}/secrets/{s}    delete

also under /inference/v1. A Secret reads {name, keyName}: its `value` is input only, never in
an answer. The bodies are checked by hand, not by pydantic, whose messages repeat a bad value:
no message here quotes `value`, and nothing logs these bodies. `name` is
`accounts/{a}/secrets/{id}` (or the id alone); `keyName` an environment variable's name, unique
in the account. Roles as for the other resources: every role reads, `inference-user` changes
nothing (deployments/route.authorize_account); another account's key is a 403.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel

from girandole.api.deployments.route import Account
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.openapi import body_doc
from girandole.api.http.validation import parse_json_object, read_body
from girandole.registry.naming import own_resource_id
from girandole.registry.secrets import (
    MAX_KEY_NAME,
    MAX_VALUE_BYTES,
    KeyNameTaken,
    Secret,
    SecretStore,
    is_valid_key_name,
    secret_name,
)

SECRET_FIELDS = {"name", "keyName"}  # what an answer has; `value` is input only
CHANGEABLE = ("keyName", "value")


class CreateSecretBody(BaseModel):
    """The create body (for the OpenAPI document: the route checks it by hand)."""

    name: str
    keyName: str
    value: str


class UpdateSecretBody(BaseModel):
    name: str | None = None
    keyName: str | None = None
    value: str | None = None


router = APIRouter(tags=["secrets"])


def store_of(request: Request) -> SecretStore:
    app_state = request.app.state
    store = getattr(app_state, "secret_store", None)
    if store is None:
        store = app_state.secret_store = SecretStore(app_state.girandole.ops.db)
    return store


def secret_json(secret: Secret) -> dict[str, Any]:
    return {"name": secret.name, "keyName": secret.key_name}


def not_found(account: str, secret_id: str) -> APIError:
    name = secret_name(account, secret_id)
    return APIError(404, f"Secret {name} not found", type="error", code="NOT_FOUND")


def key_name_taken(exc: KeyNameTaken) -> APIError:
    holder = exc.holder
    return APIError(
        409,
        f"keyName {holder.key_name!r} is already the keyName of secret {holder.name}: a keyName"
        " is unique in an account (change or delete that secret first)",
        type="error",
        code="ALREADY_EXISTS",
    )


async def read_fields(request: Request) -> dict[str, str]:
    """The body's fields (name, keyName, value), each a string; 400 naming a field that is
    unknown or not a string (its value is never repeated: it may be the secret)."""
    raw = await read_body(request, request.app.state.girandole.settings.max_request_bytes)
    body = parse_json_object(raw)
    fields: dict[str, str] = {}
    for key, value in body.items():
        if key not in ("name", "keyName", "value"):
            shown = key if len(key) <= 80 else key[:80] + "..."
            raise bad_request(
                f"Unknown field {shown!r} in a Secret: it has name, keyName and value", shown
            )
        if value is None:
            continue
        if not isinstance(value, str):
            raise bad_request(f"{key} must be a string", key)
        fields[key] = value
    return fields


def check_key_name(key_name: str) -> str:
    if not is_valid_key_name(key_name):
        shown = key_name if len(key_name) <= 80 else key_name[:80] + "..."
        raise bad_request(
            f"keyName {shown!r} is not an environment variable's name: 1-{MAX_KEY_NAME}"
            " characters of A-Z, a-z, 0-9 and '_', not starting with a digit",
            "keyName",
        )
    return key_name


def check_value(value: str) -> str:
    if not value:
        raise bad_request("value must not be empty", "value")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): no text to store
        raise bad_request("value is not valid Unicode text (a lone surrogate)", "value") from None
    if size > MAX_VALUE_BYTES:
        raise bad_request(f"value is longer than {MAX_VALUE_BYTES} bytes", "value")
    if "\x00" in value:  # an environment variable cannot hold one
        raise bad_request("value must not contain a NUL character", "value")
    return value


def own_id(account: str, name: str) -> str:
    try:
        return own_resource_id(name, account, "secrets")
    except ValueError as exc:
        raise bad_request(f"name: {exc}", "name") from None


@router.post(
    "/accounts/{account}/secrets",
    summary="Create a secret",
    openapi_extra=body_doc(CreateSecretBody),
)
async def create_secret(request: Request, account: str = Account) -> dict:
    fields = await read_fields(request)
    for required in ("name", "keyName", "value"):
        if required not in fields:
            raise bad_request(f"{required} is required", required)
    secret_id = own_id(account, fields["name"])
    key_name = check_key_name(fields["keyName"])
    value = check_value(fields["value"])
    try:
        secret = store_of(request).create(account, secret_id, key_name, value)
    except KeyNameTaken as exc:
        raise key_name_taken(exc) from None
    if secret is None:
        raise APIError(
            409,
            f"Secret {secret_name(account, secret_id)} already exists",
            type="error",
            code="ALREADY_EXISTS",
        )
    return secret_json(secret)


@router.get("/accounts/{account}/secrets", summary="List secrets (their values are not shown)")
async def list_secrets(
    request: Request, account: str = Account, query: ListParams = ListQuery
) -> dict:
    secrets = [secret_json(s) for s in store_of(request).list(account)]  # by name
    return list_page(secrets, "secrets", query, SECRET_FIELDS)


@router.get("/accounts/{account}/secrets/{secret_id}", summary="Get a secret (not its value)")
async def get_secret(
    secret_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    secret = store_of(request).get(account, secret_id)
    if secret is None:
        raise not_found(account, secret_id)
    return read_masked(secret_json(secret), read_mask, SECRET_FIELDS)


@router.patch(
    "/accounts/{account}/secrets/{secret_id}",
    summary="Change a secret's keyName or value",
    openapi_extra=body_doc(UpdateSecretBody),
)
async def update_secret(
    secret_id: str,
    request: Request,
    account: str = Account,
    update_mask: str | None = Query(default=None, alias="updateMask"),
) -> dict:
    store = store_of(request)
    if store.get(account, secret_id) is None:
        raise not_found(account, secret_id)
    fields = await read_fields(request)
    if "name" in fields and own_id(account, fields["name"]) != secret_id:
        raise bad_request(
            f"name {fields['name']!r} is not the secret's name {secret_name(account, secret_id)}:"
            " a secret cannot be renamed",
            "name",
        )
    changed = list(CHANGEABLE)
    if update_mask is not None and update_mask.strip() not in ("", "*"):
        changed = [f.strip() for f in update_mask.split(",") if f.strip()]
        for field in changed:
            if field not in CHANGEABLE:
                raise bad_request(
                    f"updateMask: {field!r} cannot be changed (only {', '.join(CHANGEABLE)})",
                    "updateMask",
                )
            if field not in fields:
                raise bad_request(f"updateMask names {field}, which the body lacks", field)
    key_name = (
        check_key_name(fields["keyName"]) if "keyName" in changed and "keyName" in fields else None
    )
    value = check_value(fields["value"]) if "value" in changed and "value" in fields else None
    try:
        secret = store.update(account, secret_id, key_name, value)
    except KeyNameTaken as exc:
        raise key_name_taken(exc) from None
    if secret is None:  # deleted meanwhile
        raise not_found(account, secret_id)
    return secret_json(secret)


@router.delete("/accounts/{account}/secrets/{secret_id}", summary="Delete a secret")
async def delete_secret(secret_id: str, request: Request, account: str = Account) -> dict:
    if not store_of(request).delete(account, secret_id):
        raise not_found(account, secret_id)
    return {}


def install_secrets(app: FastAPI, prefixes: tuple[str, ...]) -> None:
    """Serve the secrets routes under each of `prefixes` (/v1 and /inference/v1). The store
    opens now: values an older server stored in plaintext are sealed at start, and a secrets key
    that is no Fernet key (GIRANDOLE_SECRETS_KEY) stops the start, naming it."""
    app.state.secret_store = SecretStore(app.state.girandole.ops.db)
    for prefix in prefixes:  # the OpenAPI document shows the /v1 copy; /inference/v1 is an alias
        app.include_router(router, prefix=prefix, include_in_schema=prefix.startswith("/v1"))
