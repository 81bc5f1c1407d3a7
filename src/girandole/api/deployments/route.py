"""Routes of the deployments control plane (Fireworks' Gateway REST API shapes):

    POST   /v1/accounts/{a}/deployments            create (?deploymentId, validateOnly,
                                                   disableAutoDeploy,
                                                   disableSpeculativeDecoding,
                                                   skipShapeValidation)
    GET    /v1/accounts/{a}/deployments            list (pageSize, pageToken, filter, orderBy,
                                                   showDeleted, readMask)
    GET    /v1/accounts/{a}/deployments/{d}        get
    PATCH  /v1/accounts/{a}/deployments/{d}        update (?skipShapeValidation)
    DELETE /v1/accounts/{a}/deployments/{d}        soft delete (?hard=true: for good)
    PATCH  /v1/accounts/{a}/deployments/{d}:scale  {"replicaCount": N}
    POST   /v1/accounts/{a}/deployments/{d}:undelete
    ...    /v1/accounts/{a}/models[/{m}]           the models a deployment can use, and their
                                                   upload (models_route.py)
    GET    /v1/accounts/{a}/metrics                Prometheus text of its deployments
                                                   (metrics_route.py)
    GET    /v1/accounts/{a}/deploymentShapes[...]  the built-in shapes (shapes_route.py)

also under /inference/v1 (the fireworks-ai SDK's base_url ".../inference"). A key manages only
its own account's deployments, and only when its role allows changes (an `inference-user` key
reads them only); on an open server (no keys) every account is open.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from girandole.api.deployments.schema import DeploymentBody, ScaleBody
from girandole.api.http.errors import APIError, deployment_error, request_id_of
from girandole.api.http.list_params import ListParams, ListQuery
from girandole.api.http.list_params import read_masked as masked_fields
from girandole.api.http.openapi import body_doc
from girandole.api.http.validation import parse_json_object, read_body, validate_model
from girandole.api.ops.replica_gauges import install_replica_gauges
from girandole.api.ops.tracking import record_of
from girandole.deploy.manager import DeploymentManager
from girandole.registry.deployments import DeploymentError
from girandole.registry.naming import is_valid_id
from girandole.registry.roles import USER, may_change_resources

READ_METHODS = ("GET", "HEAD")  # every role may read; the others change the control plane


def authenticate(request: Request) -> Any:
    """Who is asking (401 without a live key; `x-api-key` as Anthropic's clients send it is one
    too), noted for the access log."""
    headers = request.headers
    ops = request.app.state.girandole.ops
    principal = ops.authenticate(headers.get("authorization"), headers.get("x-api-key"))
    request.state.principal = principal
    record = record_of(request)
    if record is not None:
        record.principal = principal
    return principal


async def authorize_account(request: Request, account: str) -> str:
    """401 without a live key; 403 when the key belongs to another account, or when it asks to
    change something and its role may only read (registry/roles.py)."""
    return check_account(request, account, changes=request.method not in READ_METHODS)


def check_account(request: Request, account: str, *, changes: bool) -> str:
    """authorize_account's checks; `changes` False: a POST that only reads (a shape :match)."""
    principal = authenticate(request)
    if not is_valid_id(account):
        raise APIError(
            400,
            f"{account!r} is not a valid account id: 1-63 characters of a-z, 0-9 and '-'",
            param="account",
        )
    if principal.account is not None and principal.account != account:
        raise APIError(
            403,
            f"This API key belongs to account {principal.account}; it cannot manage account"
            f" {account}",
            type="error",
            code="PERMISSION_DENIED",
        )
    if changes:
        check_may_change(request, principal)
    return account


def check_may_change(request: Request, principal: Any) -> None:
    """403 when the key's role may only read (a GET that changes something calls this too:
    the SDK's `:validateUpload` is one)."""
    if not may_change_resources(principal.role):
        how = f"`girandole keys update KEY_ID --role {USER}`"
        if principal.user_id is not None:  # a key of a user has its user's role
            how = f"an admin's PATCH /v1/accounts/{principal.account}/users/{principal.user_id}"
        raise APIError(
            403,
            f"This API key has role {principal.role}, which may run inference and read"
            f" deployments and models but not change them; {request.method} {request.url.path}"
            f" needs a key with role {USER} ({how})",
            type="error",
            code="PERMISSION_DENIED",
        )


router = APIRouter(tags=["deployments"])
Account = Depends(authorize_account)


def manager_of(request: Request) -> DeploymentManager:
    return request.app.state.deployments


M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, schema: type[M]) -> M:
    """The body as `schema` (JSON whatever the content type, as the inference routes read it)."""
    raw = await read_body(request, request.app.state.girandole.settings.max_request_bytes)
    return validate_model(schema, parse_json_object(raw) if raw.strip() else {})


def read_masked(body: dict[str, Any], read_mask: str | None) -> dict[str, Any]:
    """`readMask` on a Deployment (its request fields are known even when unset)."""
    return masked_fields(body, read_mask, DeploymentBody.model_fields)


# Routes with a ':verb' suffix come first: the plain `{deployment_id}` pattern would take them.


@router.patch(
    "/accounts/{account}/deployments/{deployment_id}:scale",
    openapi_extra=body_doc(ScaleBody),
    summary="Scale a deployment",
)
async def scale_deployment(deployment_id: str, request: Request, account: str = Account) -> dict:
    body = await read_json(request, ScaleBody)
    manager_of(request).scale(account, deployment_id, body.replicaCount)
    return {}


@router.post(
    "/accounts/{account}/deployments/{deployment_id}:undelete", summary="Undelete a deployment"
)
async def undelete_deployment(deployment_id: str, request: Request, account: str = Account) -> dict:
    return manager_of(request).undelete(account, deployment_id)


@router.post(
    "/accounts/{account}/deployments",
    openapi_extra=body_doc(DeploymentBody),
    summary="Create a deployment",
)
async def create_deployment(
    request: Request,
    account: str = Account,
    deployment_id: str | None = Query(default=None, alias="deploymentId"),
    validate_only: bool = Query(default=False, alias="validateOnly"),
    disable_auto_deploy: bool = Query(default=False, alias="disableAutoDeploy"),
    disable_speculative_decoding: bool = Query(default=False, alias="disableSpeculativeDecoding"),
    skip_shape_validation: bool = Query(default=False, alias="skipShapeValidation"),
) -> dict:
    body = await read_json(request, DeploymentBody)
    return manager_of(request).create(
        account,
        body.fields(),
        deployment_id,
        validate_only=validate_only,
        disable_auto_deploy=disable_auto_deploy,
        disable_speculative_decoding=disable_speculative_decoding,
        skip_shape_validation=skip_shape_validation,
    )


@router.get("/accounts/{account}/deployments", summary="List deployments")
async def list_deployments(
    request: Request,
    account: str = Account,
    query: ListParams = ListQuery,
    show_deleted: bool = Query(default=False, alias="showDeleted"),
) -> dict:
    listing = manager_of(request).list(
        account,
        page_size=query.page_size,
        page_token=query.page_token,
        filter=query.filter,
        order_by=query.order_by,
        show_deleted=show_deleted,
    )
    listing["deployments"] = [read_masked(d, query.read_mask) for d in listing["deployments"]]
    return listing


@router.get("/accounts/{account}/deployments/{deployment_id}", summary="Get a deployment")
async def get_deployment(
    deployment_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    return read_masked(manager_of(request).get(account, deployment_id), read_mask)


@router.patch(
    "/accounts/{account}/deployments/{deployment_id}",
    openapi_extra=body_doc(DeploymentBody),
    summary="Update a deployment",
)
async def update_deployment(
    deployment_id: str,
    request: Request,
    account: str = Account,
    skip_shape_validation: bool = Query(default=False, alias="skipShapeValidation"),
) -> dict:
    body = await read_json(request, DeploymentBody)
    return manager_of(request).update(
        account, deployment_id, body.fields(), skip_shape_validation=skip_shape_validation
    )


@router.delete("/accounts/{account}/deployments/{deployment_id}", summary="Delete a deployment")
async def delete_deployment(
    deployment_id: str,
    request: Request,
    account: str = Account,
    hard: bool = Query(default=False),
    ignore_checks: bool = Query(default=False, alias="ignoreChecks"),
) -> dict:
    manager_of(request).delete(account, deployment_id, hard=hard)
    return {}


def install_deployments(app: FastAPI, state: Any, prefixes: tuple[str, ...]) -> DeploymentManager:
    """Serve the control plane under each of `prefixes` (/v1 and /inference/v1), over the
    embedded backend and the server's database; the app's lifespan starts and stops it."""
    from girandole.deploy.setup import deployment_manager, own_spec

    manager = deployment_manager(state.settings, state.ops.db)
    if manager.backend.autoscales:  # the server's own model runs as a replica too (Ray)
        state.engine_factory = lambda: manager.serve_own(own_spec(state.settings))
    app.state.deployments = manager
    install_replica_gauges(state, manager)
    from girandole.api.deployments import metrics_route, models_route, shapes_route

    models_route.install_model_files(app, state)
    for prefix in prefixes:  # the OpenAPI document shows the /v1 copy; /inference/v1 is an alias
        app.include_router(router, prefix=prefix, include_in_schema=prefix.startswith("/v1"))
        app.include_router(
            models_route.router, prefix=prefix, include_in_schema=prefix.startswith("/v1")
        )
        app.include_router(
            metrics_route.router, prefix=prefix, include_in_schema=prefix.startswith("/v1")
        )
        app.include_router(
            shapes_route.router, prefix=prefix, include_in_schema=prefix.startswith("/v1")
        )

    @app.exception_handler(DeploymentError)
    async def _deployment_error(request: Request, exc: DeploymentError) -> JSONResponse:
        return deployment_error(exc).response(request_id_of(request))

    return manager
