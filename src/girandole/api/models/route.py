"""GET /v1/models and /v1/models/{name} in Fireworks' list shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from girandole.api.http.auth import require_api_key
from girandole.api.http.errors import model_not_found

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/models", summary="List the models this server serves")
async def list_models(request: Request) -> dict:
    state = request.app.state.girandole
    principal = getattr(request.state, "principal", None)
    visible = [m for m in state.registry.models() if state.ops.can_see(principal, m.owned_by)]
    return {"object": "list", "data": [m.to_list_entry() for m in visible]}


@router.get("/models/{name:path}", summary="Describe one model")
async def get_model(name: str, request: Request) -> dict:
    state = request.app.state.girandole
    served = state.registry.get(name)
    if served is None or not state.ops.can_see(
        getattr(request.state, "principal", None), served.owned_by
    ):
        raise model_not_found()
    return served.to_list_entry()
