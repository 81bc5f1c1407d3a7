"""Request bodies of the deployments control plane, in Fireworks' camelCase (`Deployment` of
the Gateway REST API). Types are checked here; meanings (what can be honoured on this server)
in girandole.registry.deployments."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class AutoscalingPolicyBody(BaseModel):
    model_config = STRICT

    scaleUpWindow: str | None = None  # a duration: "30s", "10m", "1h"
    scaleDownWindow: str | None = None
    scaleToZeroWindow: str | None = None
    loadTargets: dict[str, float] | None = None
    scalingSchedules: list[Any] | None = None


class DeploymentBody(BaseModel):
    """A Deployment to create, or the fields of one to update."""

    model_config = STRICT

    baseModel: str | None = None
    displayName: str | None = None
    description: str | None = None
    annotations: dict[str, str] | None = None
    minReplicaCount: int | None = None
    maxReplicaCount: int | None = None
    autoscalingPolicy: AutoscalingPolicyBody | None = None
    maxContextLength: int | None = None
    enableSessionAffinity: bool | None = None
    # hardware and precision: accepted where this server has them, else a 400 saying why
    acceleratorType: str | None = None
    acceleratorCount: int | None = None
    precision: str | None = None
    # speculative decoding (deploy/speculation.py): unset, the server's flags
    draftModel: str | None = None
    draftTokenCount: int | None = None
    ngramSpeculationLength: int | None = None
    # a shape (deploy/shapes.py): accounts/<a>/deploymentShapes/<s>[/versions/<v>], <s>, "default"
    deploymentShape: str | None = None
    # features of Fireworks' fleet: a 400 unless unset or off
    enableMtp: bool | None = None
    enableAddons: bool | None = None
    numPeftDeviceCached: int | None = None
    enableHotLoad: bool | None = None
    enableHotReloadLatestAddon: bool | None = None
    hotLoadBucketUrl: str | None = None
    hotLoadBucketType: str | None = None
    activeModelVersion: str | None = None
    targetModelVersion: str | None = None
    deploymentTemplate: str | None = None
    directRouteType: str | None = None
    directRouteApiKeys: list[str] | None = None
    placement: dict[str, Any] | None = None
    region: str | None = None
    maxWithRevocableReplicaCount: int | None = None
    autoTune: dict[str, Any] | None = None
    # kept as given
    expireTime: str | None = None
    pricingPlanId: str | None = None
    disableDeploymentSizeValidation: bool | None = None
    # output only: a client may send back what it read; ignored
    name: str | None = None
    createTime: str | None = None
    updateTime: str | None = None
    deleteTime: str | None = None
    purgeTime: str | None = None
    state: str | None = None
    status: dict[str, Any] | None = None
    replicaCount: int | None = None
    desiredReplicaCount: int | None = None
    replicaStats: dict[str, Any] | None = None
    directRouteHandle: str | None = None
    cluster: str | None = None

    def fields(self) -> dict[str, Any]:
        """The fields the client set, nested objects as dicts."""
        return self.model_dump(exclude_unset=True)


class ScaleBody(BaseModel):
    model_config = STRICT

    replicaCount: int = 0  # proto3: an absent count is 0
