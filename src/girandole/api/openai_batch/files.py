"""OpenAI's Files API, as the openai SDK's `client.files` calls it (also under /inference/v1):

    POST   /v1/files                  upload (multipart/form-data: `file`, `purpose`)
    GET    /v1/files                  list (purpose, limit, after, order)
    GET    /v1/files/{id}             the file object
    GET    /v1/files/{id}/content     its bytes
    DELETE /v1/files/{id}

Files live in the batch store (girandole.batch.files): an upload is a dataset of its own, which
`POST /v1/batches` reads. A key sees its own account's files (an open server's: `--account`).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from girandole.api.datasets.form import receive_form, sync_file
from girandole.api.datasets.route import (
    MAX_FILE_BYTES,
    count_lines,
    created_by,
    file_too_large,
    input_in_use,
    new_dataset,
    not_trained_on,
)
from girandole.api.deployments.route import authenticate
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.opened_file import opened_file_response
from girandole.api.http.pages import list_page
from girandole.batch.files import PURPOSES, FileRecord, FileStore, disk_name
from girandole.batch.store import BatchStore
from girandole.registry.roles import USER, may_change_resources

MAX_LIST = 10_000  # OpenAI's limit on a page of files
OCTETS = "application/octet-stream"


async def key_account(request: Request) -> str:
    """The account of the request's key (an open server's own): 401 without a live key; 403
    when a read-only key asks to change something."""
    principal = authenticate(request)
    if request.method not in ("GET", "HEAD") and not may_change_resources(principal.role):
        raise APIError(
            403,
            f"This API key has role {principal.role}, which may run inference but not upload"
            f" files or create batches; {request.method} {request.url.path} needs a key with"
            f" role {USER}",
            type="error",
            code="PERMISSION_DENIED",
        )
    return principal.account or request.app.state.girandole.settings.account


KeyAccount = Depends(key_account)
router = APIRouter(tags=["files"])


def files_of(request: Request) -> FileStore:
    return file_store(request.app.state)


def file_store(app_state: Any) -> FileStore:
    files = getattr(app_state, "file_store", None)
    if files is None:
        files = app_state.file_store = FileStore(app_state.batch_store)
    return files


def no_such_file(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id", code="NOT_FOUND")


def get_file(request: Request, account: str, file_id: str) -> FileRecord:
    found = files_of(request).get(account, file_id)
    if found is None:
        raise no_such_file(file_id)
    return found


@router.post("/files", summary="Upload a file (multipart/form-data: file, purpose)")
async def upload_file(request: Request, account: str = KeyAccount) -> dict[str, Any]:
    store: BatchStore = request.app.state.batch_store
    partial = store.partial_path()
    try:
        # the file's bytes go to disk as they arrive: read whole, a 100 MB upload took 850 MB
        form = await receive_form(request, partial, MAX_FILE_BYTES, file_too_large())
        files = files_of(request)
        by = created_by(request)

        def save() -> FileRecord:  # seconds for hundreds of MB: off the event loop
            for name in form.names:
                if name not in ("file", "purpose"):
                    raise bad_request(
                        f"The form part '{name[:64]}' is not supported: files are kept until"
                        " deleted, and a form has only 'file' and 'purpose'",
                        name[:64],
                    )
            if "purpose" not in form.fields:
                raise bad_request(f"purpose is required: one of {', '.join(PURPOSES)}", "purpose")
            purpose = form.fields["purpose"].decode("utf-8", "replace").strip()
            if purpose not in PURPOSES:
                raise bad_request(
                    f"purpose {purpose[:64]!r} is not one of {', '.join(PURPOSES)}", "purpose"
                )
            if not form.has_file:
                raise bad_request("The form has no part named 'file' (the file's bytes)", "file")
            filename = os.path.basename(form.file_name or "file")[:255] or "file"
            sync_file(partial)
            file_id = "file-" + uuid.uuid4().hex
            dataset = new_dataset(account, file_id, {"displayName": filename}, by)
            # counted before it is stored: the dataset and file appear at once, READY
            dataset.update(state="READY", exampleCount=str(count_lines([partial])))
            return files.add_upload(
                account, file_id, dataset, disk_name(filename), filename, purpose, partial
            )

        return (await asyncio.to_thread(save)).json()
    finally:
        partial.unlink(missing_ok=True)


@router.get("/files", summary="List files, newest first")
async def list_files(
    request: Request,
    account: str = KeyAccount,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = MAX_LIST,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    records = files_of(request).list(account, purpose)
    if order == "asc":
        records.reverse()
    return list_page(records, limit, after, id_of=lambda r: r.file_id, render=FileRecord.json)


@router.get("/files/{file_id}", summary="A file's object")
async def retrieve_file(file_id: str, request: Request, account: str = KeyAccount) -> Any:
    return get_file(request, account, file_id).json()


@router.get("/files/{file_id}/content", summary="A file's bytes")
async def file_content(file_id: str, request: Request, account: str = KeyAccount) -> Any:
    record = get_file(request, account, file_id)
    # opened now: a DELETE of the file while its bytes are sent cuts nothing
    found = opened_file_response(files_of(request).path_of(account, record), OCTETS)
    if found is None:
        raise no_such_file(file_id)
    return found


@router.delete("/files/{file_id}", summary="Delete a file")
async def delete_file(file_id: str, request: Request, account: str = KeyAccount) -> Any:
    record = get_file(request, account, file_id)
    reader = files_of(request).batch.job_reading(account, record.dataset_id)
    if record.dataset_id == file_id and reader is not None:  # an upload a batch still reads
        raise APIError(
            400, input_in_use(f"File {file_id}", reader), param="file_id",
            code="FAILED_PRECONDITION",
        )  # fmt: skip
    if record.dataset_id == file_id:  # a fine-tuning job may name the upload's dataset
        not_trained_on(request, account, file_id, f"File {file_id}", "file_id")
    if not files_of(request).delete(account, file_id):
        raise no_such_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
