"""Routes of Fireworks' datasets API, as the fireworks-ai SDK's `client.datasets` calls them:

    POST   /v1/accounts/{a}/datasets                        create {datasetId, dataset{...}}
    GET    /v1/accounts/{a}/datasets                        list (pageSize, pageToken, filter,
                                                            orderBy, readMask)
    GET    /v1/accounts/{a}/datasets/{d}                    get
    PATCH  /v1/accounts/{a}/datasets/{d}                    update (displayName, format,
                                                            userUploaded; others unchanged)
    DELETE /v1/accounts/{a}/datasets/{d}                    delete, with its files
    POST   /v1/accounts/{a}/datasets/{d}:upload             one file, multipart/form-data `file`
    POST   /v1/accounts/{a}/datasets/{d}:getUploadEndpoint  {filenameToSize} -> signed PUT URLs
    POST   /v1/accounts/{a}/datasets/{d}:validateUpload     the PUT files checked: READY
    GET    /v1/accounts/{a}/datasets/{d}:getDownloadEndpoint  signed GET URLs of its files
    PUT|GET /v1/accounts/{a}/datasets/{d}/files/{name}?expires=&signature=  the signed URLs

also under /inference/v1. The signed URLs (api/http/signed_upload.py) carry an HMAC of the
method, the file, an expiry (an hour) and, for a PUT, the size declared in filenameToSize, made
with a secret of this server process: they need no key, as a bucket's would not. A PUT of
another size is a 400.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from girandole.api.datasets.form import receive_form, sync_file
from girandole.api.deployments.route import Account, read_json
from girandole.api.http import signed_upload
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.openapi import body_doc
from girandole.api.http.opened_file import opened_file_response
from girandole.api.http.signed_upload import (
    check_content_length,
    check_filename,
    check_signature,
    check_sizes,
    receive_body,
    signed_url,
)
from girandole.api.ops.tracking import principal_of
from girandole.batch.files import is_uploaded_file
from girandole.batch.store import (
    FINAL,
    BatchStore,
    dataset_name,
    is_valid_filename,
    job_name,
    now_text,
)
from girandole.evaluators.store import CREATING, EVALUATION_JOBS, RUNNING
from girandole.registry.naming import is_valid_id, own_resource_id

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_FILE_BYTES = 500 * 1024 * 1024  # Fireworks' limit on a batch input dataset
_FORMATS = ("FORMAT_UNSPECIFIED", "CHAT", "COMPLETION", "RL")


class DatasetFields(BaseModel):
    model_config = STRICT

    displayName: str | None = None
    format: str | None = None
    exampleCount: str | int | None = None
    externalUrl: str | None = None
    sourceJobName: str | None = None
    userUploaded: dict[str, Any] | None = None
    evalProtocol: Any = None
    evaluationResult: Any = None
    splitted: Any = None
    transformed: Any = None


class UpdateDatasetBody(DatasetFields):
    """A PATCH's body: the Dataset, which may be one a GET returned, output fields and all."""

    name: str | None = None
    createTime: str | None = None
    updateTime: str | None = None
    createdBy: str | None = None
    state: str | None = None
    status: dict[str, Any] | None = None


# What a PATCH may change; any other field sent must be the dataset's own value (or empty where
# it has none), but for those the server moves by itself (every write, an upload ending): a GET's
# echo may be behind them, and a client never sets them (as the models route ignores its
# output-only fields).
CHANGEABLE = ("displayName", "format", "userUploaded")
SERVER_MOVED = ("updateTime", "state", "status")


class CreateDatasetBody(BaseModel):
    model_config = STRICT

    datasetId: str
    dataset: DatasetFields
    sourceDatasetId: str | None = None


class UploadEndpointBody(BaseModel):
    model_config = STRICT

    filenameToSize: dict[str, str | int]
    readMask: str | None = None


router = APIRouter(tags=["datasets"])


def store_of(request: Request) -> BatchStore:
    return request.app.state.batch_store


def not_found(account: str, dataset_id: str) -> APIError:
    name = dataset_name(account, dataset_id)
    return APIError(404, f"Dataset {name} not found", type="error", code="NOT_FOUND")


def get_or_404(request: Request, account: str, dataset_id: str) -> dict[str, Any]:
    found = store_of(request).get_dataset(account, dataset_id)
    if found is None:
        raise not_found(account, dataset_id)
    return found


def not_read_by_a_job(store: BatchStore, account: str, dataset_id: str) -> None:
    """A 400 when a batch job still reads the dataset as its input: a file added now would
    change, or break, the lines it was created with."""
    reader = store.job_reading(account, dataset_id)
    if reader is not None:
        what = f"Dataset {dataset_name(account, dataset_id)}"
        raise APIError(400, input_in_use(what, reader), code="FAILED_PRECONDITION")


def not_in_use(request: Request, account: str, dataset_id: str) -> None:
    """A 400 when a job that has not ended reads the dataset: a batch job's input, or what a
    fine-tuning job trains on; a file added now would change, or break, what the job reads."""
    not_read_by_a_job(store_of(request), account, dataset_id)
    not_trained_on(request, account, dataset_id)


def not_trained_on(
    request: Request, account: str, dataset_id: str, what: str = "", param: str | None = None
) -> None:
    """A 400 when a fine-tuning job that has not ended names the dataset (its `dataset` or
    `evaluationDataset`: it reads the file when it starts, and would fail then), or an
    evaluation job that has not ended does (its `inputDataset`, read when it starts, or its
    `outputDataset`, which it fills). `what`: the dataset as the message names it (an uploaded
    file's DELETE names the file)."""
    name = dataset_name(account, dataset_id)
    what = what or f"Dataset {name}"
    for jobs in getattr(request.app.state, "finetune_stores", {}).values():
        job = jobs.naming(account, name)
        if job is not None:
            message = input_in_use(what, job, jobs.kind.noun_inside)
            raise APIError(400, message, param=param, code="FAILED_PRECONDITION")
    stores = getattr(request.app.state, "evaluator_stores", {})
    evaluations = stores.get(EVALUATION_JOBS.collection)
    fields = ("inputDataset", "outputDataset")
    job = evaluations.naming(account, name, fields, (CREATING, RUNNING)) if evaluations else None
    if job is not None:
        role = "input" if job["inputDataset"] == name else "output"
        raise APIError(
            400,
            f"{what} is the {role} of evaluation job {job['name']}, which has not ended"
            f" ({job['state']}): delete the job or wait for it first",
            param=param,
            code="FAILED_PRECONDITION",
        )


# A Dataset's fields (Fireworks' gatewayDataset): what a filter, orderBy or readMask may name,
# whether or not some dataset has them now.
DATASET_FIELDS = set(DatasetFields.model_fields) | {
    "name",
    "createTime",
    "updateTime",
    "createdBy",
    "state",
    "status",
}


def new_dataset(account: str, dataset_id: str, fields: dict[str, Any], by: str) -> dict[str, Any]:
    now = now_text()
    body = {
        "name": dataset_name(account, dataset_id),
        "displayName": fields.get("displayName") or dataset_id,
        "createTime": now,
        "updateTime": now,
        "createdBy": by,
        "state": "UPLOADING",
        "status": {"code": "OK", "message": ""},
        "format": fields.get("format") or "FORMAT_UNSPECIFIED",
        "exampleCount": "0",
        "userUploaded": fields.get("userUploaded") or {},
    }
    if fields.get("sourceJobName"):
        body["sourceJobName"] = fields["sourceJobName"]
    return body


def check_fields(fields: DatasetFields, prefix: str = "dataset.") -> dict[str, Any]:
    """The fields set, checked (400 naming the field: `dataset.<f>` in a create's body, `<f>`
    in an update's, which is the Dataset itself)."""
    if fields.externalUrl:
        raise bad_request(
            "externalUrl (a dataset in a cloud bucket) is not supported by this server: upload"
            " the file with :upload or :getUploadEndpoint",
            f"{prefix}externalUrl",
        )
    if fields.format is not None and fields.format not in _FORMATS:
        raise bad_request(
            f"{prefix}format must be one of {', '.join(_FORMATS)}, got {fields.format!r}",
            f"{prefix}format",
        )
    return fields.model_dump(exclude_none=True)


def own_id(account: str, value: str, collection: str, param: str) -> str:
    """The id of one of `account`'s own `collection` that `value` names; a 400 naming `param`
    for another account's name (whether or not it exists) or a malformed one."""
    try:
        return own_resource_id(value, account, collection)
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from None


def own_job_id(account: str, source_job_name: str) -> str | None:
    """The id of the job a dataset's `sourceJobName` names, if it is one of `account`'s (a
    dataset stored before names were checked may name another account's: no job of this one)."""
    try:
        return own_resource_id(source_job_name, account, "batchInferenceJobs")
    except ValueError:
        return None


def created_by(request: Request) -> str:
    principal = principal_of(request)
    return (principal.key_id if principal is not None else None) or "anonymous"


def count_lines(paths: list[Any]) -> int:
    count = 0
    for path in paths:
        with open(path, "rb") as f:
            count += sum(1 for line in f if line.strip())
    return count


def mark_ready(store: BatchStore, account: str, dataset_id: str, body: dict[str, Any]) -> None:
    """The dataset READY, its lines counted; `body` (what the caller answers) as stored then."""
    ready = {
        "state": "READY",
        "exampleCount": str(count_lines(store.dataset_files(account, dataset_id))),
    }
    # only these fields: `body` was read before the upload's wait, a PATCH since is kept
    body.update(store.update_dataset(account, dataset_id, ready) or ready)


def still_open(request: Request, account: str, dataset_id: str) -> Callable[[], None]:
    """The check a file's bytes pass as they join the dataset, under the store's lock (they
    arrived over seconds): the dataset still exists (404) and no job reads it, nor a batch job
    being created counts its lines (400)."""
    store = store_of(request)

    def check() -> None:
        if store.get_dataset(account, dataset_id) is None:
            raise not_found(account, dataset_id)
        not_in_use(request, account, dataset_id)
        if is_uploaded_file(store, account, dataset_id):
            raise APIError(
                400,
                f"Dataset {dataset_name(account, dataset_id)} holds the file {dataset_id} uploaded"
                " through /v1/files, whose content is fixed: upload a new file instead",
                code="FAILED_PRECONDITION",
            )
        if store.input_counted(account, dataset_id):
            raise APIError(
                400,
                f"Dataset {dataset_name(account, dataset_id)} is the input of a batch job being"
                " created, which counts its lines now",
                code="FAILED_PRECONDITION",
            )

    return check


# -- signed file URLs (api/http/signed_upload.py) ---------------------------------------------


def resource_of(account: str, dataset_id: str) -> str:
    """What a dataset's signed URLs are signed for, and where they point."""
    return dataset_name(account, dataset_id)


def file_too_large() -> APIError:
    return signed_upload.file_too_large(MAX_FILE_BYTES)


async def receive_file(request: Request, store: BatchStore, account: str, dataset_id: str,
                       name: str, declared: int | None = None) -> int:  # fmt: skip
    """Stream the request body into the dataset's file `name` (413 above the limit; with
    `declared`, the size filenameToSize gave it, a 400 for a body of another size)."""
    partial = store.partial_path()
    try:
        size = await receive_body(request, partial, name, MAX_FILE_BYTES, declared)
        store.place_file(
            account, dataset_id, name, partial, still_open(request, account, dataset_id)
        )
    finally:
        partial.unlink(missing_ok=True)
    return size


# -- routes: ':verb' ones first (the plain `{dataset_id}` pattern would take them) ------------


@router.post("/accounts/{account}/datasets/{dataset_id}:upload", summary="Upload a dataset file")
async def upload(dataset_id: str, request: Request, account: str = Account) -> dict:
    store = store_of(request)
    body = get_or_404(request, account, dataset_id)
    not_in_use(request, account, dataset_id)
    partial = store.partial_path()
    try:
        # the file's bytes go to disk as they arrive: read whole, a 100 MB upload took 850 MB
        form = await receive_form(request, partial, MAX_FILE_BYTES, file_too_large())

        def save() -> str:  # seconds for hundreds of MB: off the event loop
            if not form.has_file:
                raise bad_request("The form has no part named 'file' (the dataset file)", "file")
            filename = os.path.basename(form.file_name or "input.jsonl")
            check_filename(filename, "file")
            sync_file(partial)
            # checked again as the file joins: the dataset may be gone, or read by a job, by now
            store.place_file(
                account, dataset_id, filename, partial, still_open(request, account, dataset_id)
            )
            mark_ready(store, account, dataset_id, body)
            return filename

        filename = await asyncio.to_thread(save)
    finally:
        partial.unlink(missing_ok=True)
    return {
        "id": body["name"],
        "bytes": form.file_size,
        "created_at": int(time.time()),
        "filename": filename,
        "object": "file",
        "purpose": "batch",
    }


@router.post(
    "/accounts/{account}/datasets/{dataset_id}:getUploadEndpoint",
    summary="Signed URLs to PUT a dataset's files to",
    openapi_extra=body_doc(UploadEndpointBody),
)
async def get_upload_endpoint(dataset_id: str, request: Request, account: str = Account) -> dict:
    get_or_404(request, account, dataset_id)
    not_in_use(request, account, dataset_id)
    body = await read_json(request, UploadEndpointBody)
    resource = resource_of(account, dataset_id)
    sizes = check_sizes(body.filenameToSize, MAX_FILE_BYTES)
    urls = {name: signed_url(request, "PUT", resource, name, size) for name, size in sizes.items()}
    return {"filenameToSignedUrls": urls}


@router.post(
    "/accounts/{account}/datasets/{dataset_id}:validateUpload",
    summary="Mark a dataset uploaded through its signed URLs ready",
)
async def validate_upload(dataset_id: str, request: Request, account: str = Account) -> dict:
    store = store_of(request)
    body = get_or_404(request, account, dataset_id)
    if not store.dataset_files(account, dataset_id):
        raise APIError(
            400,
            f"Dataset {body['name']} has no file yet: PUT it to a URL of :getUploadEndpoint",
            code="FAILED_PRECONDITION",
        )
    mark_ready(store, account, dataset_id, body)
    return {}


@router.get(
    "/accounts/{account}/datasets/{dataset_id}:getDownloadEndpoint",
    summary="Signed URLs to GET a dataset's files from",
)
async def get_download_endpoint(
    dataset_id: str,
    request: Request,
    account: str = Account,
    download_lineage: bool = Query(default=False, alias="downloadLineage"),
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    get_or_404(request, account, dataset_id)
    files = store_of(request).dataset_files(account, dataset_id)
    return {
        "filenameToSignedUrls": {
            p.name: signed_url(request, "GET", resource_of(account, dataset_id), p.name)
            for p in files
        }
    }


@router.put("/accounts/{account}/datasets/{dataset_id}/files/{filename}", include_in_schema=False)
async def put_file(
    account: str, dataset_id: str, filename: str, request: Request, expires: int, signature: str,
    size: int | None = None,
) -> Response:  # fmt: skip
    check_signature("PUT", resource_of(account, dataset_id), filename, expires, signature, size)
    check_filename(filename)
    store = store_of(request)
    if store.get_dataset(account, dataset_id) is None:
        raise not_found(account, dataset_id)
    not_in_use(request, account, dataset_id)
    check_content_length(request, filename, size)
    await receive_file(request, store, account, dataset_id, filename, size)
    return Response(status_code=200)


@router.get("/accounts/{account}/datasets/{dataset_id}/files/{filename}", include_in_schema=False)
async def get_file(
    account: str, dataset_id: str, filename: str, request: Request, expires: int, signature: str
) -> Response:
    check_signature("GET", resource_of(account, dataset_id), filename, expires, signature)
    path = store_of(request).dataset_dir(account, dataset_id) / filename
    # opened now: the file deleted or PUT again while it is sent cuts nothing
    found = opened_file_response(path, "application/jsonl") if is_valid_filename(filename) else None
    if found is None:
        raise APIError(404, f"No file {filename!r} in that dataset", type="error", code="NOT_FOUND")
    return found


@router.post(
    "/accounts/{account}/datasets",
    summary="Create a dataset",
    openapi_extra=body_doc(CreateDatasetBody),
)
async def create_dataset(request: Request, account: str = Account) -> dict:
    body = await read_json(request, CreateDatasetBody)
    store = store_of(request)
    if not is_valid_id(body.datasetId):
        raise bad_request(
            f"datasetId {body.datasetId!r} is not a valid id: 1-63 characters of a-z, 0-9 and"
            " '-', starting with a letter",
            "datasetId",
        )
    fields = check_fields(body.dataset)
    if "sourceJobName" in fields:  # a job of this account's, named in full as the server names it
        job_id = own_id(
            account, fields["sourceJobName"], "batchInferenceJobs", "dataset.sourceJobName"
        )
        fields["sourceJobName"] = job_name(account, job_id)
    dataset = new_dataset(account, body.datasetId, fields, created_by(request))
    copies: dict[str, Path] = {}
    try:
        if body.sourceDatasetId:
            source_id = own_id(account, body.sourceDatasetId, "datasets", "sourceDatasetId")
            if store.get_dataset(account, source_id) is None:
                raise bad_request(
                    f"sourceDatasetId: {dataset_name(account, source_id)} does not exist",
                    "sourceDatasetId",
                )
            if store.get_dataset(account, body.datasetId) is not None:  # before a long copy
                raise already_exists(dataset)
            # copied and counted before the dataset is made, off the event loop (seconds for
            # hundreds of MB): it appears READY with its files, or not at all (a kill in the
            # copy left it UPLOADING with part of them, and a retry was a 409)
            copies = await asyncio.to_thread(copy_files, store, account, source_id)
            count = await asyncio.to_thread(count_lines, list(copies.values()))
            dataset.update(state="READY", exampleCount=str(count))
        if not store.add_dataset(account, body.datasetId, dataset, copies):
            raise already_exists(dataset)
    finally:
        for partial in copies.values():
            partial.unlink(missing_ok=True)
    return dataset


def already_exists(dataset: dict[str, Any]) -> APIError:
    return APIError(
        409, f"Dataset {dataset['name']} already exists", type="error", code="ALREADY_EXISTS"
    )


def copy_files(store: BatchStore, account: str, dataset_id: str) -> dict[str, Path]:
    """The dataset's files copied to temporary files (name -> partial_path), synced."""
    copies: dict[str, Path] = {}
    try:
        for path in store.dataset_files(account, dataset_id):
            copies[path.name] = store.partial_path()
            shutil.copyfile(path, copies[path.name])
            sync_file(copies[path.name])
    except BaseException as exc:
        for partial in copies.values():
            partial.unlink(missing_ok=True)
        if isinstance(exc, FileNotFoundError):  # the source deleted while it was copied
            raise bad_request(
                f"sourceDatasetId: {dataset_name(account, dataset_id)} was deleted while it"
                " was copied",
                "sourceDatasetId",
            ) from None
        raise
    return copies


@router.get("/accounts/{account}/datasets", summary="List datasets")
async def list_datasets(
    request: Request,
    account: str = Account,
    query: ListParams = ListQuery,
) -> dict:
    datasets = store_of(request).list_datasets(account)  # by name
    fields = DATASET_FIELDS | {f for dataset in datasets for f in dataset}
    return list_page(datasets, "datasets", query, fields)


@router.get("/accounts/{account}/datasets/{dataset_id}", summary="Get a dataset")
async def get_dataset(
    dataset_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    return read_masked(get_or_404(request, account, dataset_id), read_mask, DATASET_FIELDS)


@router.patch(
    "/accounts/{account}/datasets/{dataset_id}",
    summary="Update a dataset's displayName, format or userUploaded",
    openapi_extra=body_doc(UpdateDatasetBody),
)
async def update_dataset(dataset_id: str, request: Request, account: str = Account) -> dict:
    current = get_or_404(request, account, dataset_id)
    fields = check_fields(await read_json(request, UpdateDatasetBody), prefix="")
    for key, value in fields.items():
        if key in CHANGEABLE or key in SERVER_MOVED:
            continue
        value = str(value) if key == "exampleCount" else value  # an int64, a string in JSON
        if value != current.get(key) and (key in current or value):
            raise bad_request(
                f"{key} of a dataset cannot be changed (only {', '.join(CHANGEABLE)} can): it"
                f" is {current.get(key)!r}, the body has {value!r}",
                key,
            )
    changes = {k: fields[k] for k in CHANGEABLE if k in fields}
    # the body as it is now (an upload may have made it READY while this one's body arrived)
    body = store_of(request).update_dataset(account, dataset_id, changes)
    if body is None:  # deleted meanwhile
        raise not_found(account, dataset_id)
    return body


@router.delete("/accounts/{account}/datasets/{dataset_id}", summary="Delete a dataset")
async def delete_dataset(dataset_id: str, request: Request, account: str = Account) -> dict:
    body = get_or_404(request, account, dataset_id)
    store = store_of(request)
    source = str(body.get("sourceJobName") or "")
    source_job = own_job_id(account, source)
    job = store.get_job(account, source_job) if source_job else None
    if job is not None and job.get("outputDatasetId") == body["name"] and job["state"] not in FINAL:
        raise APIError(
            400,
            f"Dataset {body['name']} is where batch job {source} writes its results, and the"
            f" job has not ended ({job['state']}): cancel the job or wait for it first",
            code="FAILED_PRECONDITION",
        )
    not_in_use(request, account, dataset_id)
    store.delete_dataset(account, dataset_id)
    return {}


def input_in_use(what: str, job: dict[str, Any], noun: str = "batch job") -> str:
    """Why the input of `job` (a dataset or an uploaded file, `what`), a `noun` (a batch job's
    or a fine-tuning job's), cannot be deleted now."""
    for api, kind, then in (
        ("anthropic", "message batch", "delete the message batch, which deletes its requests"),
        ("openai", "batch", "cancel the batch or wait for it to end first"),
    ):
        if api in job:
            return f"{what} is the input of {kind} {job[api]['id']}: {then}"
    return (
        f"{what} is the input of {noun} {job['name']}, which has not ended ({job['state']}):"
        " cancel the job or wait for it first"
    )
