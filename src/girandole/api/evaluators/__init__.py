"""Fireworks' evaluators (user code scoring model outputs) and evaluation jobs (routes)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from girandole.api.evaluators.runtime import EvaluatorRuntime
from girandole.evaluators.runner import ChildLimits
from girandole.evaluators.secrets import secrets_env
from girandole.evaluators.store import EVALUATION_JOBS, EVALUATORS, JobStore

__all__ = ["install_evaluators"]


def evaluator_limits(settings: Any) -> ChildLimits:
    """An evaluator child's limits from the server's settings (--evaluator-timeout, -memory)."""
    return ChildLimits(settings.evaluator_timeout, settings.evaluator_memory)


def install_evaluators(app: FastAPI, state: Any, prefixes: tuple[str, ...]) -> EvaluatorRuntime:
    """The evaluator and evaluation job routes under each of `prefixes`, and their runtime (the
    app's lifespan starts and stops it). After install_batch (the datasets)."""
    from girandole.api.evaluators.jobs_route import router as jobs_router
    from girandole.api.evaluators.route import router
    from girandole.api.evaluators.upload_route import router as upload_router

    if state.settings.data_dir:
        folder = Path(state.settings.data_dir)
    else:
        scratch = tempfile.TemporaryDirectory(prefix="girandole-evaluators-")
        app.state.evaluators_scratch = scratch
        folder = Path(scratch.name)
    stores = {kind.collection: JobStore(state.ops.db, kind) for kind in (EVALUATORS, EVALUATION_JOBS)}  # fmt: skip
    runtime = EvaluatorRuntime(
        stores[EVALUATORS.collection], stores[EVALUATION_JOBS.collection], app.state.batch_store,
        folder, lambda account: secrets_env(state, account), evaluator_limits(state.settings),
        state.settings.max_evaluator_processes,
    )  # fmt: skip
    app.state.evaluator_stores, app.state.evaluators = stores, runtime
    for prefix in prefixes:
        for routes in (router, upload_router, jobs_router):
            app.include_router(routes, prefix=prefix, include_in_schema=prefix.startswith("/v1"))
    return runtime
