"""The batch runner wired into the server: its store in the server's database and data folder,
its lines run through the serving pipeline (`execute`), its capacity read from the admission
queue and the engine."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from girandole.api.batch.execute import execute
from girandole.api.ops.tracking import Principal
from girandole.batch.runner import BatchRunner, Capacity
from girandole.batch.store import BatchStore


def build_runner(app: FastAPI, state: Any) -> BatchRunner:
    settings = state.settings
    if settings.data_dir:
        folder = Path(settings.data_dir) / "datasets"
    else:  # an app built without a data folder (in-memory database): files die with it (the
        # folder is removed when the app is collected, or at exit)
        scratch = tempfile.TemporaryDirectory(prefix="girandole-datasets-")
        app.state.datasets_scratch = scratch
        folder = Path(scratch.name)
    store = BatchStore(state.ops.db, folder)

    async def run(url: str, account: str, key_id: str | None, body: dict, label: str):
        return await execute(app, Principal(account, key_id), url, body, label)

    def engine_stats() -> dict[str, float] | None:
        engine = state.engine
        return dict(engine.stats()) if engine is not None else None

    capacity = Capacity(
        admission=state.ops.admission,
        engine_stats=engine_stats,
        paused=lambda: state.ops.draining or state.engine is None,
    )
    runner = BatchRunner(store, run, capacity, settings.batch_max_in_flight)
    app.state.batch_store = store
    app.state.batch = runner
    return runner
