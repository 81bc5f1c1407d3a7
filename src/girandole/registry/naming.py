"""Fireworks resource names: `accounts/<a>/models/<m>`, `accounts/<a>/deployments/<d>`.

A request's `model` may be
- a model name `accounts/<a>/models/<m>`, optionally with a deployment suffix
  `#accounts/<a>/deployments/<d>` (or the shorthand `#<a>/<d>`);
- the shorthand `<a>/<m>` (optionally `#<a>/<d>`), as Fireworks' docs show;
- a deployment name `accounts/<a>/deployments/<d>` (the Completions guide's "Querying deployments");
- a bare model id `<m>`, taken as `accounts/<default account>/models/<m>` (a convenience of ours).

A field that names one of the caller's own objects of a collection (`inputDatasetId`,
`sourceDatasetId`, `sourceJobName`, ...) takes `<id>` or `accounts/<its account>/<collection>/<id>`
(`own_resource_id`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# 1-63 characters of [a-z0-9-], not starting with a digit or '-', not ending with '-'.
_ID = r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
ID_RE = re.compile(rf"^{_ID}$")
_MODEL_RE = re.compile(rf"^accounts/({_ID})/models/({_ID})$")
_DEPLOYMENT_RE = re.compile(
    rf"^accounts/({_ID})/deployments/([a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?)$"
)
_SHORT_RE = re.compile(rf"^({_ID})/([a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?)$")


def is_valid_id(value: str) -> bool:
    return bool(ID_RE.match(value))


def model_name(account: str, model_id: str) -> str:
    return f"accounts/{account}/models/{model_id}"


def deployment_name(account: str, deployment_id: str) -> str:
    return f"accounts/{account}/deployments/{deployment_id}"


# What a message calls one object of a collection.
_NOUNS = {"datasets": "dataset", "batchInferenceJobs": "batch inference job", "secrets": "secret"}


def own_resource_id(value: str, account: str, collection: str) -> str:
    """The id that `value` names: a bare `<id>`, or `accounts/<account>/<collection>/<id>` of
    the caller's own `account`. ValueError, its message for a 400 naming the field, for a name
    of another account (the same answer whether or not that object exists: nothing is looked
    up), of another collection, or malformed (empty parts, extra segments, a bad id)."""
    noun = _NOUNS.get(collection, collection)
    expected = f"accounts/{account}/{collection}/<id>, or the id alone"
    object_id = value
    parts = value.split("/")
    if len(parts) == 4 and parts[0] == "accounts" and parts[2] == collection:
        if is_valid_id(parts[1]) and parts[1] != account:
            raise ValueError(
                f"{value!r} names another account's {noun}: only its own account's can be named"
                f" here ({expected})"
            )
        if parts[1] == account:
            object_id = parts[3]
    if not is_valid_id(object_id):
        raise ValueError(f"{value!r} is not a {noun} id or name ({expected})")
    return object_id


@dataclass(frozen=True)
class ModelRef:
    """What a request asked for: a model, a deployment, or a model on a given deployment."""

    model: str | None  # full model name, or None when only a deployment was named
    deployment: str | None  # full deployment name, or None for the model's default deployment


def _parse_deployment(text: str) -> str | None:
    m = _DEPLOYMENT_RE.match(text)
    if m:
        return deployment_name(m.group(1), m.group(2))
    m = _SHORT_RE.match(text)
    if m:
        return deployment_name(m.group(1), m.group(2))
    return None


def _parse_model(text: str, default_account: str) -> str | None:
    m = _MODEL_RE.match(text)
    if m:
        return model_name(m.group(1), m.group(2))
    m = _SHORT_RE.match(text)
    if m and ID_RE.match(m.group(2)):
        return model_name(m.group(1), m.group(2))
    if ID_RE.match(text):
        return model_name(default_account, text)
    return None


def parse_model_ref(value: str, default_account: str) -> ModelRef | None:
    """Parse the `model` field; None when it is not a well-formed name (the caller answers 404)."""
    value = value.strip()
    if "#" in value:
        model_part, _, deployment_part = value.partition("#")
        model = _parse_model(model_part, default_account)
        deployment = _parse_deployment(deployment_part)
        if model is None or deployment is None:
            return None
        return ModelRef(model=model, deployment=deployment)
    deployment = _DEPLOYMENT_RE.match(value)
    if deployment:
        return ModelRef(model=None, deployment=deployment_name(*deployment.groups()))
    model = _parse_model(value, default_account)
    if model is None:
        return None
    return ModelRef(model=model, deployment=None)


def parse_deployment_header(value: str) -> str | None:
    """The `fireworks-deployment` header: `accounts/<a>/deployments/<d>` or `<a>/<d>`."""
    return _parse_deployment(value.strip())


def parse_request_model(
    value: str, deployment_header: str | None, default_account: str
) -> ModelRef | None:
    """The `model` field with the `fireworks-deployment` header; None (a 404) when either is
    malformed or they name different deployments."""
    ref = parse_model_ref(value, default_account)
    if ref is None or deployment_header is None or not deployment_header.strip():
        return ref
    header_deployment = parse_deployment_header(deployment_header)
    if header_deployment is None:
        return None
    if ref.deployment is not None and ref.deployment != header_deployment:
        return None
    return ModelRef(model=ref.model, deployment=header_deployment)
