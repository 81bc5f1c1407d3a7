"""Deployment shapes: Fireworks' named, versioned presets of deployment fields
(`accounts/<a>/deploymentShapes/<s>/versions/<v>`), built in here from the model catalog.

This server has no curated fleet to validate shapes on, so it offers three per base model of the
catalog (READY, not a LoRA adapter), named after Fireworks' presets, each fixing only fields
whose effect here is known:

- `<m>-minimal` (MINIMAL): `maxContextLength` 4096 (the model's own when shorter: the engine
  takes the smaller), and no speculation: the least KV-cache and draft-model memory;
- `<m>-fast` (FAST): n-gram speculation (`ngramSpeculationLength` 4, no draft model): fewer
  steps per answer at small batches, where a step costs about the same for 1 or 1 + k tokens;
- `<m>-throughput` (THROUGHPUT): no speculation (at large batches verifying rejected proposals
  costs compute that other requests could use) and the model's full context.

Every shape also names this machine's accelerator where it has one (`acceleratorType`, count 1).
A shape lives in its model's account: the public catalog's (`fireworks`) are readable by every
key, an account's own models' shapes only by that account. Each has one version, "1", validated;
a shape changes only with the server's catalog (or hardware). `enableAddons` is no part of a
shape: every deployment here takes LoRA addons, so every shape matches a request with addons.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from girandole.registry.deployments import Hardware, format_time, invalid
from girandole.registry.models import PUBLIC_ACCOUNT, READY, CatalogModel, ModelCatalog
from girandole.registry.naming import is_valid_id

VERSION_ID = "1"
MINIMAL_CONTEXT = 4096
FAST_NGRAM_LENGTH = 4
DEFAULT_PRESET = "THROUGHPUT"  # `deploymentShape: "default"`: the model's full context, plain
# The fields of a DeploymentShape a list's filter, orderBy or readMask may name.
SHAPE_FIELDS = {
    "name", "displayName", "description", "baseModel", "presetType", "maxContextLength",
    "ngramSpeculationLength", "draftModel", "acceleratorType", "acceleratorCount", "createTime",
    "updateTime",
}  # fmt: skip
VERSION_FIELDS = {"name", "createTime", "snapshot", "validated", "latestValidated", "public"}
_SHAPE_NAME_RE = re.compile(
    r"^accounts/(?P<account>[^/]+)/deploymentShapes/(?P<shape>[^/]+)(?:/versions/(?P<v>[^/]+))?$"
)

PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "MINIMAL": (
        {"maxContextLength": MINIMAL_CONTEXT, "ngramSpeculationLength": 0, "draftModel": ""},
        f"A context of at most {MINIMAL_CONTEXT} tokens and no speculation: the least memory.",
    ),
    "FAST": (
        {"ngramSpeculationLength": FAST_NGRAM_LENGTH, "draftModel": ""},
        f"N-gram speculation ({FAST_NGRAM_LENGTH} tokens): lower latency at small batches.",
    ),
    "THROUGHPUT": (
        {"maxContextLength": 0, "ngramSpeculationLength": 0, "draftModel": ""},
        "No speculation and the model's full context: the most tokens per second at large batches.",
    ),
}


def shape_id(model_id: str, preset: str) -> str:
    """`<model id>-<preset>`, or where that is no valid id (too long, odd characters) a
    cleaned prefix of the model id with a hash of it, so two models never share a shape id."""
    suffix = "-" + preset.lower()
    plain = model_id + suffix
    if is_valid_id(plain):
        return plain
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^a-z0-9]+", "-", model_id.lower()).strip("-")
    room = 63 - len(suffix) - len(digest) - 1
    prefix = cleaned[:room].strip("-")
    if not prefix or not prefix[0].isalpha():
        prefix = ("m-" + prefix)[:room].strip("-")
    return f"{prefix}-{digest}{suffix}"


@dataclass(frozen=True)
class Shape:
    account: str
    shape_id: str
    preset: str  # MINIMAL, FAST, THROUGHPUT
    base_model: str  # accounts/<a>/models/<m>
    fields: dict[str, Any]  # the deployment fields it fixes, camelCase
    description: str
    created: float

    @property
    def name(self) -> str:
        return f"accounts/{self.account}/deploymentShapes/{self.shape_id}"

    @property
    def version_name(self) -> str:
        return f"{self.name}/versions/{VERSION_ID}"

    def to_json(self) -> dict[str, Any]:
        """Fireworks' DeploymentShape."""
        model_id = self.base_model.rsplit("/", 1)[1]
        return {
            "name": self.name,
            "displayName": f"{model_id} {self.preset.lower()}"[-63:],
            "description": self.description,
            "baseModel": self.base_model,
            "presetType": self.preset,
            **self.fields,
            "createTime": format_time(self.created),
            "updateTime": format_time(self.created),
        }

    def version_json(self) -> dict[str, Any]:
        """Fireworks' DeploymentShapeVersion: its only version, validated."""
        return {
            "name": self.version_name,
            "createTime": format_time(self.created),
            "snapshot": self.to_json(),
            "validated": True,
            "latestValidated": True,
            "public": self.account == PUBLIC_ACCOUNT,
        }


def readable(account: str, by: str | None) -> bool:
    """Whether a caller of account `by` (None: an open server) may read `account`'s shapes."""
    return by is None or account in (by, PUBLIC_ACCOUNT)


class ShapeCatalog:
    """The built-in shapes, computed from the model catalog at each call (a model added or
    removed is seen at once)."""

    def __init__(self, catalog: ModelCatalog, hardware: Hardware) -> None:
        self.catalog = catalog
        self.hardware = hardware

    def _shapes_of(self, model: CatalogModel) -> list[Shape]:
        hardware: dict[str, Any] = {}
        if self.hardware.accelerator_type is not None:
            hardware = {"acceleratorType": self.hardware.accelerator_type, "acceleratorCount": 1}
        model_id = model.name.rsplit("/", 1)[1]
        return [
            Shape(
                model.account,
                shape_id(model_id, preset),
                preset,
                model.name,
                {**fields, **hardware},
                description,
                model.created,
            )  # fmt: skip
            for preset, (fields, description) in PRESETS.items()
        ]

    def list(self, account: str) -> list[Shape]:
        """The shapes of `account`: three per deployable base model of that account's."""
        return [
            shape
            for model in self.catalog.list(account)
            if model.state == READY and not model.is_adapter
            for shape in self._shapes_of(model)
        ]

    def get(self, account: str, shape: str) -> Shape | None:
        return next((s for s in self.list(account) if s.shape_id == shape), None)

    def for_model(self, base_model: str) -> list[Shape]:
        """The shapes a deployment of `base_model` (a model name; an adapter: its base's) may
        use; [] for a model that is not in the catalog."""
        model = self.catalog.get(base_model)
        if model is not None and model.is_adapter:
            model = self.catalog.get(model.base_model or "")
        if model is None or model.state != READY:
            return []
        return self._shapes_of(model)

    def resolve(self, text: str, account: str, base_model: str) -> Shape:
        """The shape a deployment of `account` names in `deploymentShape`: a shape or version
        name, a bare shape id (the account's, else the public catalog's) or "default" (the
        base model's THROUGHPUT shape); a 400 naming deploymentShape for anything else, and for
        a shape of another base model."""
        param = "deploymentShape"
        text = text.strip()
        if text == "default":
            defaults = [s for s in self.for_model(base_model) if s.preset == DEFAULT_PRESET]
            if not defaults:
                raise invalid(f"baseModel {base_model} has no deployment shape", param)
            return defaults[0]
        m = _SHAPE_NAME_RE.match(text)
        shape: Shape | None = None
        if m is not None:
            if m["v"] is not None and m["v"] != VERSION_ID:
                raise invalid(
                    f"deploymentShape {text!r}: the shape's only version is {VERSION_ID}"
                    f" ({m['account']}/deploymentShapes/{m['shape']}/versions/{VERSION_ID})",
                    param,
                )
            if readable(m["account"], account):
                shape = self.get(m["account"], m["shape"])
        elif is_valid_id(text):
            shape = self.get(account, text) or self.get(PUBLIC_ACCOUNT, text)
        if shape is None:
            raise invalid(
                f"deploymentShape {text!r} is not a deployment shape that account {account} may"
                f" use (see GET /v1/accounts/{account}/deploymentShapes and"
                f" /v1/accounts/{PUBLIC_ACCOUNT}/deploymentShapes)",
                param,
            )
        if shape.base_model not in {s.base_model for s in self.for_model(base_model)}:
            raise invalid(
                f"deploymentShape {shape.name} is a shape of {shape.base_model}, not of the"
                f" deployment's baseModel {base_model}",
                param,
            )
        return shape


def shaped_body(
    body: dict[str, Any], shape: Shape, *, skip_validation: bool, fill: bool
) -> dict[str, Any]:
    """A create or update body on `shape`: the shape's fields where the body leaves them unset
    (`fill`: a create, or an update that changes the shape), and a 400 naming a body field that
    contradicts the shape's unless `skip_validation` (then the body's value stands)."""
    out = dict(body)
    for key, value in shape.fields.items():
        given = body.get(key)
        if given is None or (isinstance(given, str) and given.endswith("_UNSPECIFIED")):
            if fill:
                out[key] = value
        elif given != value and not skip_validation:
            raise invalid(
                f"{key} {given!r} contradicts deploymentShape {shape.version_name} ({key}"
                f" {value!r}): leave it unset, choose another shape, or pass"
                " skipShapeValidation=true",
                key,
            )
    out["deploymentShape"] = shape.version_name
    return out
