"""GET /v1/models and /v1/models/{name} in Fireworks' list shape: the server's own model, and the
deployments the key can reach (each as `<model>#<deployment>`, and its model once for the
model's default deployment), the ids a request's `model` may use. With `anthropic-version`
(the `anthropic` SDK), the same ids in Anthropic's shape (`anthropic.py`)."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Depends, Request

from girandole.api.http.auth import require_api_key
from girandole.api.http.errors import model_not_found
from girandole.api.lora.listing import adapter_entries
from girandole.api.models.anthropic import (
    anthropic_errors_if_asked,
    model_object,
    model_page,
    wants_anthropic,
)
from girandole.api.serving.target import reachable_deployment
from girandole.api.state import mark_embedding_model
from girandole.deploy.manager import DeploymentManager
from girandole.registry.deployments import DeploymentRecord
from girandole.registry.models import ServedModel
from girandole.registry.naming import ModelRef, parse_model_ref
from girandole.tokenizer.chat_template import chat_template_for

router = APIRouter(dependencies=[Depends(anthropic_errors_if_asked), Depends(require_api_key)])


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
    if wants_anthropic(request):
        return model_page(entries, request.query_params)
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
        served.supports_image_input = engine.model_config.vision is not None
        mark_embedding_model(served, engine)
    return served


@router.get("/models/{name:path}", summary="Describe one model")
async def get_model(name: str, request: Request) -> dict:
    entry = _model_entry(name, request)
    return model_object(entry) if wants_anthropic(request) else entry


def _model_entry(name: str, request: Request) -> dict:
    """One id of `GET /v1/models`: the server's own model (or `<model>#<its deployment>`), a
    model with a deployment the key can reach, `<model>#<deployment>` or a deployment's name
    (`#` sent as %23), a LoRA adapter loaded on such a deployment; 404 for anything else, as
    for a model of another account."""
    state = request.app.state.girandole
    principal = getattr(request.state, "principal", None)
    ref = parse_model_ref(name, state.settings.account)
    if ref is None:
        raise model_not_found()
    own = state.registry.resolve(name)
    if own is not None:
        if not state.ops.can_see(principal, own.model.owned_by):
            raise model_not_found()
        return replace(own.model, name=_id_of(ref)).to_list_entry()
    manager = request.app.state.deployments
    record = reachable_deployment(state, manager, principal, ref)
    if record is not None:
        return replace(_deployed_model(manager, record), name=_id_of(ref)).to_list_entry()
    account = principal.account if principal is not None else None
    for entry in adapter_entries(request, account, set()):  # a LoRA adapter, as listed
        if entry["id"] == _id_of(ref):
            return entry
    raise model_not_found()


def _id_of(ref: ModelRef) -> str:
    """The full name of what was asked for, as `GET /v1/models` spells its ids."""
    if ref.model is not None and ref.deployment is not None:
        return f"{ref.model}#{ref.deployment}"
    return ref.model or ref.deployment or ""
