"""Build the deployment manager of a server from its settings: the model catalog (the default
model and the server's own always in it), and the backend: embedded (its memory budget) or,
with `--ray`, Ray Serve."""

from __future__ import annotations

import time
from typing import Any

from girandole.deploy.backend import Backend, EngineOptions, ReplicaSpec
from girandole.deploy.embedded import EmbeddedBackend, default_budget_bytes, replica_bytes
from girandole.deploy.hardware import detect_hardware
from girandole.deploy.manager import DeploymentManager
from girandole.model.default import DEFAULT_MODEL_ID
from girandole.registry.deployments import DeploymentStore
from girandole.registry.keystore import Database
from girandole.registry.models import PUBLIC_ACCOUNT, CatalogModel, ModelCatalog
from girandole.registry.naming import deployment_name, model_name

DEFAULT_KV_CACHE_GB = 1.0  # EngineConfig's


def built_in_models(settings: Any) -> list[CatalogModel]:
    now = time.time()
    models = {
        model_name(PUBLIC_ACCOUNT, DEFAULT_MODEL_ID): CatalogModel(
            model_name(PUBLIC_ACCOUNT, DEFAULT_MODEL_ID), None, now, built_in=True
        )
    }
    own = model_name(settings.account, settings.model_id)
    if own not in models or settings.model is not None:
        models[own] = CatalogModel(own, settings.model, now, built_in=True)
    return list(models.values())


def own_spec(settings: Any) -> ReplicaSpec:
    """The replica of the server's own model and deployment."""
    return ReplicaSpec(
        deployment_name(settings.account, settings.deployment_id or settings.model_id),
        settings.model,
        settings.kv_cache_gb or DEFAULT_KV_CACHE_GB,
        settings.max_model_len,
        options=EngineOptions.from_settings(settings),
    )


def deployment_manager(settings: Any, db: Database) -> DeploymentManager:
    kv_cache_gb = settings.kv_cache_gb or DEFAULT_KV_CACHE_GB
    own = own_spec(settings)
    backend: Backend
    if getattr(settings, "ray", None):
        from girandole.deploy.ray_backend import RayBackend, RayOptions

        address = None if settings.ray == "local" else settings.ray
        backend = RayBackend(
            detect_hardware(),
            RayOptions(
                address=address,
                router=settings.ray_router,
                replica_cpus=settings.ray_replica_cpus,
                replicas_per_node=settings.ray_replicas_per_node or None,
                grammar_compile_timeout=settings.grammar_compile_timeout,
                acquire_timeout=settings.queue_timeout,
                engine_stall_seconds=settings.engine_stall_seconds,
            ),
        )
    else:

        def own_bytes() -> int:
            try:
                return replica_bytes(own)
            except Exception:  # noqa: BLE001 - an estimate; the model's own load reports errors
                return 0

        backend = EmbeddedBackend(detect_hardware(), default_budget_bytes(), own_bytes)
    return DeploymentManager(
        DeploymentStore(db),
        ModelCatalog(db, built_in_models(settings)),
        backend,
        kv_cache_gb=kv_cache_gb,
        max_model_len=settings.max_model_len,
        options=own.options,
        reserved={own.deployment},
        engine_stall_seconds=settings.engine_stall_seconds,
    )
