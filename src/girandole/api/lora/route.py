"""Routes of the LoRA addons (Fireworks' Gateway REST API shapes; the fireworks-ai SDK's
`client.lora.load/list/get/update/unload`):

    POST   /v1/accounts/{a}/deployedModels        load {model, deployment, default, ...}
    GET    /v1/accounts/{a}/deployedModels        list (pageSize, pageToken, filter, orderBy,
                                                  readMask)
    GET    /v1/accounts/{a}/deployedModels/{id}   get
    PATCH  /v1/accounts/{a}/deployedModels/{id}   update (displayName, description, default,
                                                  public)
    DELETE /v1/accounts/{a}/deployedModels/{id}   unload

also under /inference/v1. A key manages only its own account's; an open server every account's.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request

from girandole.api.deployments.route import Account
from girandole.api.http.list_params import ListParams, ListQuery, read_masked
from girandole.api.http.validation import parse_json_object, read_body
from girandole.deploy.lora import DeployedModelManager
from girandole.registry.deployed_models import DeployedModelStore
from girandole.registry.naming import deployment_name, model_name

router = APIRouter(tags=["lora"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "model": {"type": "string"},
                        "deployment": {"type": "string"},
                        "default": {"type": "boolean"},
                        "displayName": {"type": "string"},
                        "description": {"type": "string"},
                        "public": {"type": "boolean"},
                    },
                }
            }
        },
    }
}


def lora_of(request: Request) -> DeployedModelManager:
    return request.app.state.lora


async def _body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, request.app.state.girandole.settings.max_request_bytes)
    return parse_json_object(raw) if raw.strip() else {}


@router.post("/accounts/{account}/deployedModels", openapi_extra=_BODY_DOC, summary="Load a LoRA")
async def load_lora(
    request: Request,
    account: str = Account,
    replace_merged_addon: bool = Query(default=False, alias="replaceMergedAddon"),
) -> dict:
    return await lora_of(request).load(account, await _body(request))


@router.get("/accounts/{account}/deployedModels", summary="List LoRAs")
async def list_loras(
    request: Request,
    account: str = Account,
    query: ListParams = ListQuery,
) -> dict:
    listing = lora_of(request).list(
        account,
        page_size=query.page_size,
        page_token=query.page_token,
        filter=query.filter,
        order_by=query.order_by,
    )
    listing["deployedModels"] = [read_masked(d, query.read_mask) for d in listing["deployedModels"]]
    return listing


@router.get("/accounts/{account}/deployedModels/{deployed_model_id}", summary="Get a LoRA")
async def get_lora(
    deployed_model_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    return read_masked(lora_of(request).get(account, deployed_model_id), read_mask)


@router.patch(
    "/accounts/{account}/deployedModels/{deployed_model_id}",
    openapi_extra=_BODY_DOC,
    summary="Update a LoRA",
)
async def update_lora(deployed_model_id: str, request: Request, account: str = Account) -> dict:
    return lora_of(request).update(account, deployed_model_id, await _body(request))


@router.delete("/accounts/{account}/deployedModels/{deployed_model_id}", summary="Unload a LoRA")
async def unload_lora(deployed_model_id: str, request: Request, account: str = Account) -> dict:
    lora_of(request).unload(account, deployed_model_id)
    return {}


def install_lora(app: FastAPI, state: Any, prefixes: tuple[str, ...]) -> DeployedModelManager:
    """Serve the deployedModels routes under each of `prefixes`, over the deployments manager
    (install_deployments first) and the server's database."""
    settings = state.settings
    manager = DeployedModelManager(
        DeployedModelStore(state.ops.db),
        app.state.deployments,
        own_deployment=deployment_name(
            settings.account, settings.deployment_id or settings.model_id
        ),
        own_model=model_name(settings.account, settings.model_id),
        own_engine=lambda: state.engine,
    )
    app.state.lora = manager
    for prefix in prefixes:
        app.include_router(router, prefix=prefix, include_in_schema=prefix.startswith("/v1"))
    return manager
