"""Routes of Fireworks' accounts (the fireworks-ai SDK's `client.accounts`):

    GET /v1/accounts        the accounts the key may see (pageSize, pageToken, filter, orderBy,
                            readMask; ordered by name, as Fireworks)
    GET /v1/accounts/{a}    one Account (readMask)

also under /inference/v1. A key sees its own account only: the one it was made for, and for
the operator's keys (`--api-key`) the server's `--account`; another account is a 403, as on
every route under /accounts/{other}/ (deployments/route.authorize_account). An open server (no
keys) serves every account on its control-plane routes, so it gets any valid account id here
too, and lists its `--account`.

girandole keeps no account records: an Account is made from what it has. `displayName` is the
account id; `email` is the caller's user's (a key of a user with an email), else "";
`createTime` (and `updateTime`: nothing of an account changes here) is the creation of the
account's earliest key or user in the keys database, else (the operator's account before any
key of it, any account of an open server) the server's start.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request

from girandole.api.deployments.route import authenticate, authorize_account
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.ops.tracking import Principal, principal_of
from girandole.registry.deployments import format_time

ACCOUNT_FIELDS = {
    "name", "displayName", "email", "accountType", "state", "status", "suspendState",
    "createTime", "updateTime",
}  # fmt: skip


def account_json(request: Request, account: str, principal: Principal) -> dict[str, Any]:
    state = request.app.state.girandole
    db = state.ops.db
    since = db.account_since(account) or state.started
    email = ""
    if principal.user_id is not None and principal.account == account:
        user = db.get_user(account, principal.user_id)
        email = user.email if user is not None else ""
    return {
        "name": f"accounts/{account}",
        "displayName": account,
        "email": email,
        "accountType": "ACCOUNT_TYPE_UNSPECIFIED",
        "state": "READY",
        "status": {"code": "OK", "message": ""},
        "suspendState": "UNSUSPENDED",
        "createTime": format_time(since),
        "updateTime": format_time(since),
    }


router = APIRouter(tags=["accounts"])


@router.get("/accounts", summary="List the accounts the API key may see: its own")
async def list_accounts(request: Request, query: ListParams = ListQuery) -> dict:
    principal = authenticate(request)  # 401 without a live key
    own = principal.account or request.app.state.girandole.settings.account
    items = [account_json(request, own, principal)]
    return list_page(items, "accounts", query, ACCOUNT_FIELDS, [("name", False)])


@router.get("/accounts/{account}", summary="Get an account")
async def get_account(
    account: str, request: Request, read_mask: str | None = Query(default=None, alias="readMask")
) -> dict:
    await authorize_account(request, account)  # 401, 400 for a bad id, 403 for another's
    principal = principal_of(request)
    return read_masked(account_json(request, account, principal), read_mask, ACCOUNT_FIELDS)


def install_accounts(app: FastAPI, prefixes: tuple[str, ...]) -> None:
    """Serve the accounts routes under each of `prefixes` (/v1 and /inference/v1)."""
    for prefix in prefixes:  # the OpenAPI document shows the /v1 copy; /inference/v1 is an alias
        app.include_router(router, prefix=prefix, include_in_schema=prefix.startswith("/v1"))
