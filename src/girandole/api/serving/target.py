"""Which engine serves an inference request.

The server's own model (and its own deployment) runs on the server's engine. Any other
`accounts/<a>/models/<m>` goes to that model's default deployment (the first one created of the
key's account), and `...#accounts/<a>/deployments/<d>` or the `fireworks-deployment` header to
the one named, on the engine of a replica of it (`DeploymentManager.engine_for`: 503
DEPLOYMENT_SCALING_UP from zero). A key reaches only its own account's deployments; a model or
deployment it cannot reach is a 404, as if it did not exist. A LoRA adapter's name goes to its
DeployedModel (the one on the deployment named, else its default one) and runs the adapter on
that deployment's engine (the server's own included). A request that names no model (tokenize,
detokenize, rerank, Responses' input_tokens) runs on the server's own: only for a key that
could name it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from girandole.api.http.errors import model_not_found
from girandole.api.ops.tracking import principal_of, record_of
from girandole.api.serving.adapter import AdapterEngine
from girandole.engine.protocol import EngineClient
from girandole.registry.models import PUBLIC_ACCOUNT
from girandole.registry.naming import ModelRef, parse_request_model

if TYPE_CHECKING:
    from girandole.api.ops.tracking import Principal
    from girandole.api.state import AppState
    from girandole.deploy.lora import DeployedModelManager
    from girandole.deploy.manager import DeploymentManager
    from girandole.registry.deployments import DeploymentRecord


@dataclass(frozen=True)
class Target:
    model: str  # accounts/<a>/models/<m>, for usage rows and the access log
    deployment: str | None  # a managed deployment; None: the server's own engine
    context_length: int | None = None  # a deployment's, when known before its engine runs
    adapter: str | None = None  # a LoRA adapter (its model name) run on the deployment


def resolve_target(
    request: Any, state: AppState, model: str, deployment_header: str | None
) -> Target:
    """The model and deployment a request's `model` (and header) name; 404 when unreachable."""
    own = state.ops.resolve(request, model, deployment_header)
    if own is not None:
        return Target(own.model.name, None)
    manager: DeploymentManager | None = getattr(request.app.state, "deployments", None)
    ref = parse_request_model(model, deployment_header, state.settings.account)
    record = record_of(request)
    principal = principal_of(request)
    account = principal.account if principal is not None else None  # None: an open server
    lora: DeployedModelManager | None = getattr(request.app.state, "lora", None)
    if (
        lora is not None
        and ref is not None
        and ref.model is not None
        and lora.is_adapter(ref.model)
    ):
        target = _adapter_target(request, state, lora, ref, principal, account)
        if target is not None:
            return target
    found = None
    if manager is not None and ref is not None:
        found = reachable_deployment(state, manager, principal, ref)
    if found is None:
        raise model_not_found()
    if record is not None:
        record.model = found.base_model
    context_length = found.max_context_length or None
    for engine in manager.backend.engines(found.name)[:1]:
        context_length = context_length or state.context_length_of(engine)
    return Target(found.base_model, found.name, context_length)


def reachable_deployment(
    state: AppState, manager: DeploymentManager, principal: Principal | None, ref: ModelRef
) -> DeploymentRecord | None:
    """The managed deployment `ref` names, when `principal`'s key may reach it; None (a 404)
    otherwise: the deployment named, or the model's default deployment of the key's account."""
    if ref.deployment is not None:
        found = manager.find(ref.deployment)
        if (
            found is None
            or not state.ops.can_see(principal, found.account)
            or (ref.model is not None and ref.model != found.base_model)
        ):
            return None
        return found
    catalog_model = manager.catalog.get(ref.model or "")
    if catalog_model is None or (
        catalog_model.account != PUBLIC_ACCOUNT
        and not state.ops.can_see(principal, catalog_model.account)
    ):
        return None
    account = principal.account if principal is not None else None  # None: an open server
    return manager.default_deployment(catalog_model.name, account)  # None: not deployed


def _adapter_target(
    request: Any,
    state: AppState,
    lora: DeployedModelManager,
    ref: ModelRef,
    principal: Any,
    account: str | None,
) -> Target | None:
    """The target of a request for a LoRA adapter: its DeployedModel on the deployment named,
    else its default one. None: not loaded anywhere reachable (a deployment created from the
    adapter, which merged it, may still serve it)."""
    adapter = lora.catalog.get(ref.model)
    if adapter.account != PUBLIC_ACCOUNT and not state.ops.can_see(principal, adapter.account):
        raise model_not_found()
    deployed = lora.find(ref.model, ref.deployment, account)
    if deployed is None:
        return None
    record = record_of(request)
    if record is not None:
        record.model = ref.model
    if deployed.deployment == lora.own_deployment:
        return Target(ref.model, None, adapter=ref.model)
    found = request.app.state.deployments.find(deployed.deployment)
    if found is None:
        raise model_not_found()
    context_length = found.max_context_length or None
    for engine in lora.engines_of(found.name)[:1]:
        context_length = context_length or state.context_length_of(engine)
    return Target(ref.model, found.name, context_length, adapter=ref.model)


def engine_of(request: Any, state: AppState, target: Target | None) -> EngineClient:
    """The engine that runs the request (503 while the model loads or the deployment is at 0);
    for a LoRA adapter, that engine running the adapter."""
    if target is None:
        check_own_model(request, state)
    if target is None or target.deployment is None:
        engine = state.require_engine()
    else:
        engine = request.app.state.deployments.engine_for(target.deployment)
    if target is not None and target.adapter is not None:
        lora = request.app.state.lora
        return AdapterEngine(engine, target.adapter, lora, target.deployment or lora.own_deployment)
    return engine


def check_own_model(request: Any, state: AppState) -> None:
    """A request that names no model (tokenize, detokenize, rerank and Responses' input_tokens
    may leave it out) runs on the server's own model, which belongs to `--account`: a key of
    another account gets the same 404 as when it names that model, never its engine."""
    if not state.ops.can_see(principal_of(request), state.served.owned_by):
        raise model_not_found()


def hold(request: Any, target: Target | None) -> AbstractContextManager[None]:
    """While the request waits for admission and starts on its engine, its deployment is not
    idle: no scale to zero under it (a long wait in the queue found its replica stopped)."""
    if target is None or target.deployment is None:
        return nullcontext()
    return request.app.state.deployments.hold(target.deployment)
