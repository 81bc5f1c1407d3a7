"""The models and deployments this server serves, and how a request's model string finds one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from girandole.registry.naming import ModelRef, parse_deployment_header, parse_model_ref


@dataclass
class Deployment:
    name: str  # accounts/<a>/deployments/<d>
    model: str  # the model name it serves
    default: bool = True  # the deployment a request without a '#' suffix goes to


@dataclass
class ServedModel:
    name: str  # accounts/<a>/models/<m>
    owned_by: str  # the account
    created: int = field(default_factory=lambda: int(time.time()))
    kind: str = "HF_BASE_MODEL"
    context_length: int | None = None  # known once the model is loaded
    supports_chat: bool = False
    supports_image_input: bool = False
    supports_tools: bool = False

    def to_list_entry(self) -> dict:
        """One entry of `GET /v1/models`, in Fireworks' shape."""
        entry = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "kind": self.kind,
            "supports_chat": self.supports_chat,
            "supports_image_input": self.supports_image_input,
            "supports_tools": self.supports_tools,
        }
        if self.context_length is not None:
            entry["context_length"] = self.context_length
        return entry


@dataclass(frozen=True)
class Resolved:
    model: ServedModel
    deployment: Deployment


class ModelRegistry:
    def __init__(self, default_account: str) -> None:
        self.default_account = default_account
        self._models: dict[str, ServedModel] = {}
        self._deployments: dict[str, Deployment] = {}

    def add_model(self, model: ServedModel, deployment_name: str) -> None:
        self._models[model.name] = model
        is_default = not any(d.model == model.name for d in self._deployments.values())
        self._deployments[deployment_name] = Deployment(deployment_name, model.name, is_default)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    def get(self, name: str) -> ServedModel | None:
        ref = parse_model_ref(name, self.default_account)
        if ref is None or ref.model is None or ref.deployment is not None:
            return None
        return self._models.get(ref.model)

    def resolve(self, model: str, deployment_header: str | None = None) -> Resolved | None:
        """Find what serves `model` (plus the `fireworks-deployment` header); None means 404."""
        ref = parse_model_ref(model, self.default_account)
        if ref is None:
            return None
        if deployment_header is not None and deployment_header.strip():
            header_deployment = parse_deployment_header(deployment_header)
            if header_deployment is None:
                return None
            if ref.deployment is not None and ref.deployment != header_deployment:
                return None
            ref = ModelRef(model=ref.model, deployment=header_deployment)
        return self._resolve_ref(ref)

    def _resolve_ref(self, ref: ModelRef) -> Resolved | None:
        if ref.deployment is not None:
            deployment = self._deployments.get(ref.deployment)
            if deployment is None:
                return None
            if ref.model is not None and ref.model != deployment.model:
                return None
            return Resolved(self._models[deployment.model], deployment)
        served = self._models.get(ref.model or "")
        if served is None:
            return None
        for deployment in self._deployments.values():
            if deployment.model == served.name and deployment.default:
                return Resolved(served, deployment)
        return None
