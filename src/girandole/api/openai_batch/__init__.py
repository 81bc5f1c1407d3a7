"""OpenAI's Files and Batch APIs (`/v1/files`, `/v1/batches`) over the batch jobs' store and
runner (girandole.batch): the openai SDK's `client.files` and `client.batches` work unchanged."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from girandole.api.openai_batch import batches, files


def install_openai_batch(app: FastAPI, prefixes: tuple[str, ...]) -> None:
    """The routes under each of `prefixes` (after install_batch: they use its store and runner),
    and the webhooks of batches ending (`batch.completed | failed | cancelled`)."""
    for prefix in prefixes:
        app.include_router(files.router, prefix=prefix)
        app.include_router(batches.router, prefix=prefix)

    def ended(account: str, job_id: str, job: dict[str, Any]) -> None:
        if "openai" in job:  # a batch of OpenAI's API: its files, listed from now on
            batches.output_files(app.state.batch_store, files.file_store(app.state), account, job)
            app.state.webhooks.send(f"batch.{batches.STATUS[job['state']]}", job["openai"]["id"])

    app.state.batch.on_end = ended
