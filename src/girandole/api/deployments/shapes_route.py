"""Routes of Fireworks' deployment shapes, as the fireworks-ai SDK's `client.deployment_shapes`
and `client.deployment_shape_versions` call them (the shapes themselves: deploy/shapes.py):

    GET  /v1/accounts/{a}/deploymentShapes                   list (pageSize, pageToken, filter,
                                                             orderBy, readMask, targetModel)
    GET  /v1/accounts/{a}/deploymentShapes/{s}               get (readMask)
    GET  /v1/accounts/{a}/deploymentShapes/{s}/versions      list its versions
    GET  /v1/accounts/{a}/deploymentShapes/{s}/versions/{v}  get a version
    POST /v1/accounts/{a}/deploymentShapeVersions:match      {createDeploymentRequest: {parent,
                                                             deployment}} -> the versions a
                                                             deployment of that body may use

also under /inference/v1. Every key reads the public catalog's shapes (account `fireworks`), as
it reads its models; another account's only that account's keys (403). `:match` only reads: a
key of any role may call it.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from girandole.api.deployments.route import authenticate, check_account, manager_of, read_json
from girandole.api.deployments.schema import DeploymentBody
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.openapi import body_doc
from girandole.deploy.shapes import (
    SHAPE_FIELDS,
    VERSION_FIELDS,
    VERSION_ID,
    Shape,
    ShapeCatalog,
    shaped_body,
)
from girandole.registry.deployments import DeploymentError
from girandole.registry.models import PUBLIC_ACCOUNT

router = APIRouter(tags=["deployment shapes"])
FORBID = ConfigDict(extra="forbid", strict=True)


class CreateDeploymentRequest(BaseModel):
    """What `deployments.create` would send, as one object (Fireworks' CreateDeploymentRequest)."""

    model_config = FORBID

    parent: str
    deployment: DeploymentBody
    deploymentId: str | None = None
    validateOnly: bool | None = None
    disableAutoDeploy: bool | None = None
    disableSpeculativeDecoding: bool | None = None
    skipShapeValidation: bool | None = None


class MatchBody(BaseModel):
    model_config = FORBID

    createDeploymentRequest: CreateDeploymentRequest


def shapes_of(request: Request) -> ShapeCatalog:
    return manager_of(request).shapes


def readable_account(request: Request, account: str) -> str:
    """Every key reads the public catalog's shapes; an account's own only its keys."""
    if account == PUBLIC_ACCOUNT:
        authenticate(request)
        return account
    return check_account(request, account, changes=False)


def shape_or_404(request: Request, account: str, shape_id: str) -> Shape:
    shape = shapes_of(request).get(account, shape_id)
    if shape is None:
        raise APIError(
            404,
            f"Deployment shape accounts/{account}/deploymentShapes/{shape_id} not found",
            code="NOT_FOUND",
            type="error",
        )
    return shape


def base_model_of(request: Request, account: str, text: str, param: str) -> str:
    """The model name `text` gives, if `account` may deploy it; else a 400 naming `param`."""
    model = manager_of(request).registry_model(account, text)
    if model is None:
        raise bad_request(
            f"{param} {text!r} is not a model of this server's registry that account {account}"
            f" may use (see GET /v1/accounts/{account}/models)",
            param,
        )
    return model.name


@router.get("/accounts/{account}/deploymentShapes", summary="List deployment shapes")
async def list_shapes(
    account: str,
    request: Request,
    query: ListParams = ListQuery,
    target_model: str | None = Query(default=None, alias="targetModel"),
) -> dict:
    account = readable_account(request, account)
    shapes = shapes_of(request).list(account)
    if target_model:
        model = base_model_of(request, account, target_model, "targetModel")
        wanted = {s.name for s in shapes_of(request).for_model(model)}
        shapes = [s for s in shapes if s.name in wanted]
    items = [s.to_json() for s in shapes]
    return list_page(items, "deploymentShapes", query, SHAPE_FIELDS, [])  # by name


@router.get("/accounts/{account}/deploymentShapes/{shape_id}", summary="Get a deployment shape")
async def get_shape(
    account: str,
    shape_id: str,
    request: Request,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    account = readable_account(request, account)
    return read_masked(shape_or_404(request, account, shape_id).to_json(), read_mask, SHAPE_FIELDS)


@router.get(
    "/accounts/{account}/deploymentShapes/{shape_id}/versions",
    summary="List a deployment shape's versions",
)
async def list_versions(
    account: str, shape_id: str, request: Request, query: ListParams = ListQuery
) -> dict:
    account = readable_account(request, account)
    versions = [shape_or_404(request, account, shape_id).version_json()]
    return list_page(versions, "deploymentShapeVersions", query, VERSION_FIELDS)


@router.get(
    "/accounts/{account}/deploymentShapes/{shape_id}/versions/{version_id}",
    summary="Get a deployment shape version",
)
async def get_version(
    account: str,
    shape_id: str,
    version_id: str,
    request: Request,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    account = readable_account(request, account)
    shape = shape_or_404(request, account, shape_id)
    if version_id != VERSION_ID:
        raise APIError(
            404,
            f"Deployment shape version {shape.name}/versions/{version_id} not found: its only"
            f" version is {VERSION_ID}",
            code="NOT_FOUND",
            type="error",
        )
    return read_masked(shape.version_json(), read_mask, VERSION_FIELDS)


@router.post(
    "/accounts/{account}/deploymentShapeVersions:match",
    openapi_extra=body_doc(MatchBody),
    summary="Match deployment shape versions",
)
async def match_versions(account: str, request: Request) -> dict:
    account = readable_account(request, account)
    create = (await read_json(request, MatchBody)).createDeploymentRequest
    param = "createDeploymentRequest"
    if create.parent != f"accounts/{account}":
        raise bad_request(
            f"{param}.parent {create.parent!r} must be the account of the path: accounts/{account}",
            f"{param}.parent",
        )
    body = create.deployment.fields()
    if not body.get("baseModel"):
        raise bad_request(
            f"{param}.deployment.baseModel is required", f"{param}.deployment.baseModel"
        )
    model = base_model_of(request, account, body["baseModel"], f"{param}.deployment.baseModel")
    versions = []
    for shape in shapes_of(request).for_model(model):
        try:  # a shape the deployment's own fields contradict does not match
            shaped_body(body, shape, skip_validation=False, fill=False)
        except DeploymentError:
            continue
        versions.append(shape.version_json())
    return {"deploymentShapeVersions": versions, "nextPageToken": "", "totalSize": len(versions)}
