"""Deployments as Fireworks' control plane names them (`accounts/<a>/deployments/<d>`): the
record with its camelCase fields, its validation, and its table in the server's database.

A deployment is created from a base model with a replica range and an autoscaling policy. What
a backend runs for it (replicas, their engines) is not stored: only what the user asked for
(`desiredReplicaCount` included), so that a restarted server brings the same replicas back.
Deletion is soft (`state` DELETED, `deleteTime` set) until undeleted or deleted with `hard`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from girandole.registry.keystore import Database

STATES = ("CREATING", "READY", "UPDATING", "DELETING", "FAILED", "DELETED")

# Fireworks' `--load-targets` keys; targets are per replica.
LOAD_TARGETS = (
    "default",
    "concurrent_requests",
    "requests_per_second",
    "tokens_generated_per_second",
    "prompt_tokens_per_second",
)
MAX_WINDOW_S = 3600.0  # scaleUpWindow and scaleDownWindow: at most one hour (Fireworks' limit)
# scaleToZeroWindow: at most 7 days, after which Fireworks deletes an idle deployment anyway.
MAX_SCALE_TO_ZERO_S = 7 * 24 * 3600.0

DEPLOYMENT_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

# Features of Fireworks' fleet this server does not have: a true value is a 400 naming the field.
UNSUPPORTED_FEATURES = {
    "enableMtp": "multi-token prediction",
    "enableHotLoad": "hot loading of model versions",
    "enableHotReloadLatestAddon": "hot loading of model versions",
    "hotLoadBucketUrl": "hot loading of model versions",
    "hotLoadBucketType": "hot loading of model versions",
    "activeModelVersion": "model versions",
    "targetModelVersion": "model versions",
    "deploymentTemplate": "deployment templates",
    "directRouteType": "direct routes",
    "directRouteApiKeys": "direct routes",
    "placement": "placement across regions",
    "region": "regions",
    "maxWithRevocableReplicaCount": "revocable replicas",
    "autoTune": "auto-tuning",
    "numPeftDeviceCached": "LoRA addons",
}
# Fields a client may send back (read from a GET) that only the server sets.
OUTPUT_ONLY = (
    "name",
    "createTime",
    "updateTime",
    "deleteTime",
    "purgeTime",
    "state",
    "status",
    "replicaCount",
    "desiredReplicaCount",
    "replicaStats",
    "directRouteHandle",
    "cluster",
)
# Accepted and kept as given: they change nothing here (expireTime no longer does at Fireworks).
# enableAddons: every deployment takes LoRA addons here (deployedModels).
KEPT_AS_GIVEN = (
    "annotations",
    "expireTime",
    "pricingPlanId",
    "disableDeploymentSizeValidation",
    "enableAddons",
)


class DeploymentError(Exception):
    """A control-plane request that cannot be done; the API answers it in Fireworks' shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}


def invalid(message: str, param: str | None = None) -> DeploymentError:
    return DeploymentError(400, message, param=param)


def not_found(name: str) -> DeploymentError:
    return DeploymentError(404, f"Deployment {name} not found", code="NOT_FOUND", type="error")


# -- durations (protobuf Duration in JSON, "30s"; firectl's "10m", "1h30m" too) ---------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)", re.ASCII)  # digits 0-9 only
MAX_DURATION_S = 315_576_000_000  # protobuf's Duration: 10,000 years
MAX_COUNT = 2**31 - 1  # the proto's int32 fields
# ngramSpeculationLength and draftTokenCount: tokens proposed (and verified) per step and
# sequence; a tenant's value past this would only make verify rows long for nothing.
MAX_SPECULATION_TOKENS = 32
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: Any, param: str) -> float:
    if not isinstance(text, str) or not text.strip():
        raise invalid(f"{param} must be a duration such as '30s', '10m' or '1h'", param)
    value = text.strip()
    pos, seconds = 0, 0.0
    while pos < len(value):
        m = _DURATION_PART.match(value, pos)
        if m is None:
            raise invalid(
                f"{param} {text!r} is not a duration: write it as '30s', '10m', '1h' or '1h30m'",
                param,
            )
        seconds += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if seconds > MAX_DURATION_S:
        raise invalid(f"{param} {text!r} is longer than {MAX_DURATION_S} seconds", param)
    return seconds


def format_duration(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds:g}s"


def format_time(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    if text is None:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


# -- the record ----------------------------------------------------------------------------


@dataclass
class AutoscalingPolicy:
    scale_up_window: float = 30.0
    scale_down_window: float = 600.0
    scale_to_zero_window: float = 3600.0
    load_targets: dict[str, float] = field(default_factory=lambda: {"default": 0.8})

    def to_json(self) -> dict[str, Any]:
        return {
            "scaleUpWindow": format_duration(self.scale_up_window),
            "scaleDownWindow": format_duration(self.scale_down_window),
            "scaleToZeroWindow": format_duration(self.scale_to_zero_window),
            "loadTargets": dict(self.load_targets),
        }

    def updated(self, body: dict[str, Any]) -> AutoscalingPolicy:
        """This policy with the fields of `body` (an `autoscalingPolicy` object) replaced."""
        if not isinstance(body, dict):
            raise invalid("autoscalingPolicy must be an object", "autoscalingPolicy")
        policy = replace(self, load_targets=dict(self.load_targets))
        for key, value in body.items():
            param = f"autoscalingPolicy.{key}"
            if value is None:
                continue
            if key == "scaleUpWindow":
                policy.scale_up_window = _window(value, param, MAX_WINDOW_S)
            elif key == "scaleDownWindow":
                policy.scale_down_window = _window(value, param, MAX_WINDOW_S)
            elif key == "scaleToZeroWindow":
                policy.scale_to_zero_window = _window(value, param, MAX_SCALE_TO_ZERO_S)
            elif key == "loadTargets":
                policy.load_targets = parse_load_targets(value)
            elif key == "scalingSchedules":
                if value:
                    raise invalid(
                        "autoscalingPolicy.scalingSchedules is not supported by this server:"
                        " leave it empty",
                        param,
                    )
            else:
                raise invalid(f"Unknown field {param}", param)
        return policy


def _window(value: Any, param: str, maximum: float) -> float:
    seconds = parse_duration(value, param)
    if seconds > maximum:
        limit = format_duration(maximum)
        raise invalid(f"{param} must be at most {limit}, got {value!r}", param)
    return seconds


def parse_load_targets(value: Any) -> dict[str, float]:
    param = "autoscalingPolicy.loadTargets"
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object of target names to numbers", param)
    targets: dict[str, float] = {}
    for key, target in value.items():
        if key not in LOAD_TARGETS:
            raise invalid(
                f"Unknown load target {key!r}: use one of {', '.join(LOAD_TARGETS)}", param
            )
        if isinstance(target, bool) or not isinstance(target, int | float) or target <= 0:
            raise invalid(f"Load target {key} must be a positive number, got {target!r}", param)
        if key == "default" and target > 1:
            raise invalid(f"Load target default is a fraction in (0, 1], got {target!r}", param)
        targets[key] = float(target)
    return targets or {"default": 0.8}


@dataclass
class DeploymentRecord:
    """What is stored of one deployment (runtime fields such as `replicaCount` come from the
    backend when it is shown)."""

    account: str
    deployment_id: str
    base_model: str
    display_name: str = ""
    description: str = ""
    state: str = "CREATING"
    status_code: str = "OK"
    status_message: str = ""
    min_replica_count: int = 0
    max_replica_count: int = 1
    desired_replica_count: int = 1
    autoscaling_policy: AutoscalingPolicy = field(default_factory=AutoscalingPolicy)
    max_context_length: int = 0  # 0: the model's
    accelerator_type: str | None = None
    accelerator_count: int | None = None
    precision: str | None = None
    enable_session_affinity: bool = False
    # Speculative decoding (deploy/speculation.py): None, the server's flags; a deployment that
    # sets ngramSpeculationLength or draftModel (0 or "": off) takes none of them.
    ngram_speculation_length: int | None = None
    draft_model: str | None = None  # a model of the registry, accounts/<a>/models/<m>
    draft_token_count: int | None = None
    # the version of the shape it was made on (deploy/shapes.py), its full name; None: none
    deployment_shape: str | None = None
    kept: dict[str, Any] = field(default_factory=dict)  # KEPT_AS_GIVEN fields
    create_time: float = field(default_factory=time.time)
    update_time: float = field(default_factory=time.time)
    delete_time: float | None = None

    @property
    def name(self) -> str:
        return f"accounts/{self.account}/deployments/{self.deployment_id}"

    @property
    def deleted(self) -> bool:
        return self.state == "DELETED"

    def to_json(self) -> dict[str, Any]:
        """The stored fields, camelCase (the API adds replicaCount and replicaStats)."""
        body: dict[str, Any] = {
            "name": self.name,
            "displayName": self.display_name,
            "description": self.description,
            "baseModel": self.base_model,
            "state": self.state,
            "status": {"code": self.status_code, "message": self.status_message},
            "minReplicaCount": self.min_replica_count,
            "maxReplicaCount": self.max_replica_count,
            "desiredReplicaCount": self.desired_replica_count,
            "autoscalingPolicy": self.autoscaling_policy.to_json(),
            "maxContextLength": self.max_context_length,
            "enableSessionAffinity": self.enable_session_affinity,
            "createTime": format_time(self.create_time),
            "updateTime": format_time(self.update_time),
        }
        if self.delete_time is not None:
            body["deleteTime"] = format_time(self.delete_time)
        for key, value in (
            ("acceleratorType", self.accelerator_type),
            ("acceleratorCount", self.accelerator_count),
            ("precision", self.precision),
            ("ngramSpeculationLength", self.ngram_speculation_length),
            ("draftModel", self.draft_model),
            ("draftTokenCount", self.draft_token_count),
            ("deploymentShape", self.deployment_shape),
        ):
            if value is not None:
                body[key] = value
        body.update(self.kept)
        return body

    @classmethod
    def from_json(cls, account: str, deployment_id: str, body: dict[str, Any]) -> DeploymentRecord:
        """Read back what `to_json` stored."""
        policy = body.get("autoscalingPolicy") or {}
        return cls(
            account=account,
            deployment_id=deployment_id,
            base_model=body["baseModel"],
            display_name=body.get("displayName", ""),
            description=body.get("description", ""),
            state=body.get("state", "READY"),
            status_code=body.get("status", {}).get("code", "OK"),
            status_message=body.get("status", {}).get("message", ""),
            min_replica_count=body.get("minReplicaCount", 0),
            max_replica_count=body.get("maxReplicaCount", 1),
            desired_replica_count=body.get("desiredReplicaCount", 0),
            autoscaling_policy=AutoscalingPolicy().updated(policy),
            max_context_length=body.get("maxContextLength", 0),
            accelerator_type=body.get("acceleratorType"),
            accelerator_count=body.get("acceleratorCount"),
            precision=body.get("precision"),
            enable_session_affinity=body.get("enableSessionAffinity", False),
            ngram_speculation_length=body.get("ngramSpeculationLength"),
            draft_model=body.get("draftModel"),
            draft_token_count=body.get("draftTokenCount"),
            deployment_shape=body.get("deploymentShape"),
            kept={k: body[k] for k in KEPT_AS_GIVEN if k in body},
            create_time=parse_time(body.get("createTime")) or time.time(),
            update_time=parse_time(body.get("updateTime")) or time.time(),
            delete_time=parse_time(body.get("deleteTime")),
        )


@dataclass(frozen=True)
class Hardware:
    """What this server's replicas run on, to judge the hardware fields of a request."""

    accelerator_type: str | None  # the Fireworks acceleratorType of its GPU; None: CPU only
    accelerator_count: int  # GPUs a replica can use (a replica uses one)
    description: str  # for messages: "CPU only", "one NVIDIA H200"


def apply_fields(
    record: DeploymentRecord, body: dict[str, Any], hardware: Hardware, *, creating: bool
) -> DeploymentRecord:
    """`record` with the fields of a create or update body applied, each validated (400 naming
    the field). Replica counts are checked by the caller, against the backend's limits."""
    out = replace(record, autoscaling_policy=record.autoscaling_policy, kept=dict(record.kept))
    for key, value in body.items():
        if value is None or key in OUTPUT_ONLY:
            continue
        if key == "baseModel":
            if not creating and value != record.base_model:
                raise invalid(
                    f"baseModel cannot change ({record.base_model}): create a new deployment"
                    " for another model",
                    key,
                )
        elif key == "displayName":
            if len(value) >= 64:
                raise invalid("displayName must be shorter than 64 characters", key)
            out.display_name = value
        elif key == "description":
            out.description = value
        elif key == "minReplicaCount":
            out.min_replica_count = _count(value, key)
        elif key == "maxReplicaCount":
            out.max_replica_count = _count(value, key)
        elif key == "autoscalingPolicy":
            out.autoscaling_policy = out.autoscaling_policy.updated(value)
        elif key == "maxContextLength":
            out.max_context_length = _count(value, key)
        elif key == "enableSessionAffinity":
            out.enable_session_affinity = bool(value)
        elif key == "acceleratorType":
            out.accelerator_type = _accelerator_type(value, hardware)
        elif key == "acceleratorCount":
            out.accelerator_count = _accelerator_count(value, hardware)
        elif key == "precision":
            if value not in ("PRECISION_UNSPECIFIED", ""):
                raise invalid(
                    f"precision {value} cannot be honoured: this server runs each model in its"
                    " own weights' precision; leave precision unset",
                    key,
                )
        elif key == "ngramSpeculationLength":
            out.ngram_speculation_length = _speculation_tokens(value, key, 0)
        elif key == "draftTokenCount":
            out.draft_token_count = _speculation_tokens(value, key, 1)
        elif key == "draftModel":
            out.draft_model = value.strip()  # the manager checks it names a usable model
        elif key == "deploymentShape":
            # the manager resolved it to a version's name (deploy/shapes.py); "" is no shape
            out.deployment_shape = value or out.deployment_shape
        elif key in UNSUPPORTED_FEATURES:
            if value not in (False, 0, "", [], {}) and not str(value).endswith("_UNSPECIFIED"):
                raise invalid(
                    f"{key} is not supported by this server ({UNSUPPORTED_FEATURES[key]});"
                    " leave it unset",
                    key,
                )
        elif key in KEPT_AS_GIVEN:
            out.kept[key] = value
        else:
            raise invalid(f"Unknown field {key}", key)
    if "maxReplicaCount" not in body and creating:
        out.max_replica_count = max(out.min_replica_count, 1)
    if out.min_replica_count > out.max_replica_count:
        raise invalid(
            f"minReplicaCount ({out.min_replica_count}) is above maxReplicaCount"
            f" ({out.max_replica_count})",
            "minReplicaCount",
        )
    if out.ngram_speculation_length and out.draft_model:
        raise invalid(
            f"ngramSpeculationLength ({out.ngram_speculation_length}) and draftModel"
            f' ({out.draft_model}) are mutually exclusive: set one (the other to 0 or "")',
            "ngramSpeculationLength" if "ngramSpeculationLength" in body else "draftModel",
        )
    return out


def _speculation_tokens(value: Any, param: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{param} must be an integer, got {value!r}", param)
    if not minimum <= value <= MAX_SPECULATION_TOKENS:
        raise invalid(
            f"{param} must be from {minimum} to {MAX_SPECULATION_TOKENS}, got {value}", param
        )
    return value


def _count(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise invalid(f"{param} must be an integer from 0 to {MAX_COUNT}, got {value!r}", param)
    return value


def _accelerator_type(value: str, hardware: Hardware) -> str | None:
    if value in ("ACCELERATOR_TYPE_UNSPECIFIED", ""):
        return None
    if value != hardware.accelerator_type:
        raise invalid(
            f"acceleratorType {value} is not available on this server ({hardware.description});"
            " leave acceleratorType unset",
            "acceleratorType",
        )
    return value


def _accelerator_count(value: Any, hardware: Hardware) -> int | None:
    count = _count(value, "acceleratorCount")
    if count == 0:
        return None
    if hardware.accelerator_type is None:
        raise invalid(
            f"acceleratorCount {count} cannot be honoured: this server has no accelerator"
            f" ({hardware.description}); leave acceleratorCount unset",
            "acceleratorCount",
        )
    if count > 1:
        raise invalid(
            f"acceleratorCount {count} cannot be honoured: a replica here runs on one"
            f" accelerator ({hardware.description})",
            "acceleratorCount",
        )
    return count


# -- the table -------------------------------------------------------------------------------

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS deployments (
        account TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (account, deployment_id)
    )""",
)


class DeploymentStore:
    """The deployments table of the server's database (girandole.db)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        for statement in _SCHEMA:
            db.execute(statement)

    def insert(self, record: DeploymentRecord) -> bool:
        """False when a deployment of that name exists (deleted ones too: undelete it)."""
        rows = self.db.execute(
            "INSERT INTO deployments (account, deployment_id, body) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING deployment_id",
            (record.account, record.deployment_id, json.dumps(record.to_json())),
        )
        return bool(rows)

    def save(self, record: DeploymentRecord) -> None:
        self.db.execute(
            "UPDATE deployments SET body = ? WHERE account = ? AND deployment_id = ?",
            (json.dumps(record.to_json()), record.account, record.deployment_id),
        )

    def get(self, account: str, deployment_id: str) -> DeploymentRecord | None:
        rows = self.db.execute(
            "SELECT body FROM deployments WHERE account = ? AND deployment_id = ?",
            (account, deployment_id),
        )
        return (
            DeploymentRecord.from_json(account, deployment_id, json.loads(rows[0][0]))
            if rows
            else None
        )

    def list(self, account: str | None = None) -> list[DeploymentRecord]:
        sql, params = "SELECT account, deployment_id, body FROM deployments", ()
        if account is not None:
            sql, params = sql + " WHERE account = ?", (account,)
        return [
            DeploymentRecord.from_json(a, d, json.loads(body))
            for a, d, body in self.db.execute(sql, params)
        ]

    def remove(self, account: str, deployment_id: str) -> None:
        self.db.execute(
            "DELETE FROM deployments WHERE account = ? AND deployment_id = ?",
            (account, deployment_id),
        )
