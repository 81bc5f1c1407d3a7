"""GET /v1/models and /v1/models/{name} in Fireworks' list shape: the server's own model, and the
deployments the key can reach (each as `<model>#<deployment>`, and its model once for the
model's default deployment), the ids a request's `model` may use."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Depends, Request

from girandole.api.http.auth import require_api_key
from girandole.api.http.errors import model_not_found
from girandole.api.lora.listing import adapter_entries
from girandole.deploy.manager import DeploymentManager
from girandole.registry.deployments import DeploymentRecord
from girandole.registry.models import ServedModel
from girandole.tokenizer.chat_template import chat_template_for

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/models", summary="List the models this server serves")
async def list_models(request: Request) -> dict:
    state = request.app.state.girandole
    principal = getattr(request.state, "principal", None)
    visible = [m for m in state.registry.models() if state.ops.can_see(principal, m.owned_by)]
    entries = [m.to_list_entry() for m in visible]
    listed = {e["id"] for e in entries}
    manager = request.app.state.deployments
    account = principal.account if principal is not None else None
    for record in manager.reachable(account):
        served = _deployed_model(manager, record)
        for name in (record.base_model, f"{record.base_model}#{record.name}"):
            if name not in listed:
                listed.add(name)
                entries.append(replace(served, name=name).to_list_entry())
    entries += adapter_entries(request, account, listed)  # LoRA adapters on deployments
    return {"object": "list", "data": entries}


def _deployed_model(manager: DeploymentManager, record: DeploymentRecord) -> ServedModel:
    """A deployment's model as /v1/models shows it (context and chat known once it runs)."""
    served = ServedModel(
        name=record.base_model, owned_by=record.account, created=int(record.create_time)
    )
    engines = manager.backend.engines(record.name)
    if engines:
        engine = engines[0]
        served.context_length = int(engine.max_model_len or engine.model_config.max_position)
        served.supports_chat = bool(chat_template_for(engine.tokenizer))
    return served


@router.get("/models/{name:path}", summary="Describe one model")
async def get_model(name: str, request: Request) -> dict:
    state = request.app.state.girandole
    served = state.registry.get(name)
    if served is None or not state.ops.can_see(
        getattr(request.state, "principal", None), served.owned_by
    ):
        raise model_not_found()
    return served.to_list_entry()
