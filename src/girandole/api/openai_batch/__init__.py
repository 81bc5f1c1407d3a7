"""OpenAI's Files and Batch APIs (`/v1/files`, `/v1/batches`) over the batch jobs' store and
runner (girandole.batch): the openai SDK's `client.files` and `client.batches` work unchanged."""

from __future__ import annotations

from fastapi import FastAPI

from girandole.api.openai_batch import batches, files


def install_openai_batch(app: FastAPI, prefixes: tuple[str, ...]) -> None:
    """The routes under each of `prefixes` (after install_batch: they use its store and runner)."""
    for prefix in prefixes:
        app.include_router(files.router, prefix=prefix)
        app.include_router(batches.router, prefix=prefix)
