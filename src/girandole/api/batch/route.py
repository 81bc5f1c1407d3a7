"""Routes of Fireworks' batch inference jobs, as the fireworks-ai SDK's
`client.batch_inference_jobs` calls them:

    POST   /v1/accounts/{a}/batchInferenceJobs?batchInferenceJobId=  create
    GET    /v1/accounts/{a}/batchInferenceJobs                       list (pageSize, pageToken,
                                                                     filter, orderBy, readMask)
    GET    /v1/accounts/{a}/batchInferenceJobs/{j}                   get
    DELETE /v1/accounts/{a}/batchInferenceJobs/{j}                   stop it and delete it (its
                                                                     output dataset stays, READY
                                                                     with what was done)
    POST   /v1/accounts/{a}/batchInferenceJobs/{j}:cancel            stop it, keep what is done

also under /inference/v1. Creating checks the whole input file (a 400 names the first bad line)
and the model (404 when the key cannot reach it), and creates the output dataset; the job then
waits (JOB_STATE_PENDING) for the runner (girandole.batch.runner).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict

from girandole.api.datasets.route import created_by, new_dataset, own_id
from girandole.api.deployments.route import Account, read_json
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.openapi import body_doc
from girandole.api.http.schema import MaxTokens, N, Temperature, TopK, TopP
from girandole.api.serving.target import resolve_target
from girandole.batch.lines import InputError, parse_parameters, read_input
from girandole.batch.runner import MAX_INPUT_LINES, BatchRunner
from girandole.batch.store import (
    CANCELLED,
    FINAL,
    PENDING,
    BatchStore,
    dataset_name,
    job_name,
    now_text,
)
from girandole.registry.list_query import (
    QueryError,
    decode_key_token,
    encode_key_token,
    page_size_of,
)
from girandole.registry.naming import is_valid_id

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class InferenceParameters(BaseModel):
    """The fields each line takes where its body sets none, within the endpoints' own ranges:
    a value out of them would fail every line alike, so the job is a 400 instead."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    maxTokens: MaxTokens = None
    temperature: Temperature = None
    topP: TopP = None
    topK: TopK = None
    n: N = None
    extraBody: str | None = None


class BatchJobBody(BaseModel):
    model_config = STRICT

    displayName: str | None = None
    model: str | None = None
    inputDatasetId: str | None = None
    outputDatasetId: str | None = None
    inferenceParameters: InferenceParameters | None = None
    precision: str | None = None
    continuedFromJobName: str | None = None


router = APIRouter(tags=["batch"])


def store_of(request: Request) -> BatchStore:
    return request.app.state.batch_store


def runner_of(request: Request) -> BatchRunner:
    return request.app.state.batch


def get_or_404(request: Request, account: str, job_id: str) -> dict[str, Any]:
    found = store_of(request).get_job(account, job_id)
    if found is None:
        raise APIError(
            404,
            f"Batch inference job {job_name(account, job_id)} not found",
            type="error",
            code="NOT_FOUND",
        )
    return found


def check_unsupported(body: BatchJobBody) -> None:
    if body.precision not in (None, "PRECISION_UNSPECIFIED"):
        raise bad_request(
            f"precision {body.precision!r}: a batch job runs at the precision the model is"
            " served at here; leave precision unset",
            "precision",
        )
    if body.continuedFromJobName:
        raise bad_request(
            "continuedFromJobName is not supported: a job stopped by a restart resumes by itself",
            "continuedFromJobName",
        )


def input_lines(request: Request, account: str, input_id: str) -> int:
    """How many lines the input dataset has, after checking them all (400 naming a bad one)."""
    store = store_of(request)
    dataset = store.get_dataset(account, input_id)
    name = dataset_name(account, input_id)
    if dataset is None:
        raise bad_request(f"inputDatasetId: {name} does not exist", "inputDatasetId")
    files = store.dataset_files(account, input_id)
    if dataset.get("state") != "READY" or not files:
        raise bad_request(
            f"inputDatasetId: {name} has no uploaded file yet (state {dataset.get('state')})",
            "inputDatasetId",
        )
    try:
        data = store.dataset_bytes(account, input_id)
        return len(read_input(data, MAX_INPUT_LINES))
    except InputError as exc:
        raise bad_request(f"inputDatasetId: {name}: {exc}", "inputDatasetId") from None
    except FileNotFoundError:  # the dataset deleted while it was read
        raise bad_request(f"inputDatasetId: {name} does not exist", "inputDatasetId") from None


@router.post("/accounts/{account}/batchInferenceJobs/{job_id}:cancel", summary="Cancel a batch job")
async def cancel_job(job_id: str, request: Request, account: str = Account) -> dict:
    return stop_job(request, account, get_or_404(request, account, job_id))


def stop_job(request: Request, account: str, body: dict[str, Any]) -> dict[str, Any]:
    """Cancel a job that has not ended (the runner stops its lines and writes what is done);
    the job as it is now."""
    job_id = body["name"].rsplit("/", 1)[-1]
    if body["state"] not in FINAL:
        store = store_of(request)
        body["state"] = CANCELLED
        body["status"] = {"code": "CANCELLED", "message": "cancelled by the user"}
        store.save_job(account, job_id, body)
        runner_of(request).stop_job(account, job_id, CANCELLED)
    return store_of(request).get_job(account, job_id) or body


@router.post(
    "/accounts/{account}/batchInferenceJobs",
    summary="Create a batch inference job",
    openapi_extra=body_doc(BatchJobBody),
)
async def create_job(
    request: Request,
    account: str = Account,
    job_id: str | None = Query(default=None, alias="batchInferenceJobId"),
) -> dict:
    body = await read_json(request, BatchJobBody)
    check_unsupported(body)
    if job_id is None:
        job_id = "batch-" + uuid.uuid4().hex[:12]
    elif not is_valid_id(job_id):
        raise bad_request(
            f"batchInferenceJobId {job_id!r} is not a valid id: 1-63 characters of a-z, 0-9 and"
            " '-', starting with a letter",
            "batchInferenceJobId",
        )
    if not body.model:
        raise bad_request("model is required: the model the job runs", "model")
    if not body.inputDatasetId:
        raise bad_request("inputDatasetId is required: the dataset of requests", "inputDatasetId")
    state = request.app.state.girandole
    resolve_target(request, state, body.model, None)  # 404 when out of reach
    parameters = body.inferenceParameters.model_dump(exclude_none=True) if body.inferenceParameters else {}  # fmt: skip
    try:
        parse_parameters(parameters)
    except InputError as exc:
        raise bad_request(str(exc), "inferenceParameters") from None
    input_id = own_id(account, body.inputDatasetId, "datasets", "inputDatasetId")
    store = store_of(request)
    # no file joins the input from its count until the job is saved (then the job refuses it):
    # one that joined in between ran without being counted in totalInputRequests
    with store.counting_input(account, input_id):
        # reading and checking up to 500 MB of lines takes seconds: off the event loop
        total = await asyncio.to_thread(input_lines, request, account, input_id)
        if store.get_dataset(account, input_id) is None:  # deleted while it was read
            raise bad_request(
                f"inputDatasetId: {dataset_name(account, input_id)} does not exist",
                "inputDatasetId",
            )
        output_text = body.outputDatasetId or f"{job_id[:56]}-output"
        output_id = own_id(account, output_text, "datasets", "outputDatasetId")
        if store.get_job(account, job_id) is not None:
            raise job_exists(account, job_id)
        by = created_by(request)
        output = new_dataset(account, output_id, {"sourceJobName": job_name(account, job_id)}, by)
        job = new_job(account, job_id, body.displayName or job_id, body.model, input_id, output_id,
                      parameters, total, by, body.precision or "PRECISION_UNSPECIFIED")  # fmt: skip
        return start_new_job(request, account, job_id, job, {output_id: (output, {})})


def new_job(
    account: str, job_id: str, display_name: str, model: str, input_id: str, output_id: str,
    parameters: dict[str, Any], total: int, by: str, precision: str = "PRECISION_UNSPECIFIED",
) -> dict[str, Any]:  # fmt: skip
    """A job's record as it is created: waiting for the runner."""
    now = now_text()
    return {
        "name": job_name(account, job_id),
        "displayName": display_name,
        "model": model,
        "inputDatasetId": dataset_name(account, input_id),
        "outputDatasetId": dataset_name(account, output_id),
        "inferenceParameters": parameters,
        "state": PENDING,
        "status": {"code": "OK", "message": ""},
        "jobProgress": {"totalInputRequests": total},
        "createTime": now,
        "updateTime": now,
        "createdBy": by,
        "precision": precision,
    }


def start_new_job(
    request: Request,
    account: str,
    job_id: str,
    job: dict[str, Any],
    datasets: dict[str, tuple[dict[str, Any], dict[str, Path]]],
) -> dict:
    """Save a new job (under the request's key: its lines' usage rows) with the new datasets it
    reads and writes (as BatchStore.insert_job takes them), at once, and wake the runner. A 409
    when the job exists, a 400 naming outputDatasetId when a dataset does."""
    store = store_of(request)
    principal = getattr(request.state, "principal", None)
    key_id = principal.key_id if principal else None
    if not store.insert_job(account, job_id, key_id, job, datasets):
        if store.get_job(account, job_id) is not None:
            raise job_exists(account, job_id)
        taken = ", ".join(dataset_name(account, d) for d in datasets)
        raise bad_request(
            f"outputDatasetId: {taken} already exists; name a new one", "outputDatasetId"
        )
    runner_of(request).notify()
    return store.get_job(account, job_id) or job


@router.get("/accounts/{account}/batchInferenceJobs", summary="List batch inference jobs")
async def list_jobs(
    request: Request,
    account: str = Account,
    query: ListParams = ListQuery,
) -> dict:
    store = store_of(request)
    if (query.filter or "").strip() or (query.order_by or "").replace(",", " ").split():
        # a filter or order on any field (of any job: the fields a query may name): the whole
        # history, paged by offset (a key token's offset too)
        jobs = await asyncio.to_thread(store.list_jobs, account)
        # oldest first; a query may name any field some job has; readMask leaves out a field
        # a job lacks (a job's fields vary with its state)
        fields = {"name", "createTime", "state", "displayName"} | {f for job in jobs for f in job}
        return list_page(jobs, "batchInferenceJobs", query, fields, strict=False)
    return await asyncio.to_thread(job_page, store, account, query)


def job_page(store: BatchStore, account: str, query: ListParams) -> dict[str, Any]:
    """A page of the account's jobs, oldest first, as `listing` cuts it from them all, read
    alone: past the token's key (an old token's offset), one more job telling whether a next
    page exists, and the count of all from the index."""
    try:
        size = page_size_of(query.page_size)
        offset, key = decode_key_token(query.page_token)
    except QueryError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    rows = store.page_jobs(account, size + 1, above=key, offset=0 if key else offset)
    items = rows[:size]
    next_token = encode_key_token(offset + size, items[-1][0]) if len(rows) > size else ""
    return {
        "batchInferenceJobs": [read_masked(job, query.read_mask, None) for _, job in items],
        "nextPageToken": next_token,
        "totalSize": store.count_jobs(account),
    }


@router.get("/accounts/{account}/batchInferenceJobs/{job_id}", summary="Get a batch job")
async def get_job(
    job_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    return read_masked(get_or_404(request, account, job_id), read_mask, None)


@router.delete("/accounts/{account}/batchInferenceJobs/{job_id}", summary="Delete a batch job")
async def delete_job(job_id: str, request: Request, account: str = Account) -> dict:
    end_before_delete(request, account, get_or_404(request, account, job_id))
    store_of(request).delete_job(account, job_id)
    return {}


def end_before_delete(request: Request, account: str, body: dict[str, Any]) -> None:
    """A job about to be deleted leaves its output dataset READY with what it wrote, as a
    cancelled job's is (Fireworks keeps it so): deleted with the job, it would take the done
    lines' results with it, and left as it was it would stay UPLOADING for ever. A job that has
    not ended stops as a cancel stops it: no line's result is committed after its state is."""
    job_id = body["name"].rsplit("/", 1)[-1]
    store, runner = store_of(request), runner_of(request)
    if body["state"] not in FINAL:
        body["state"] = CANCELLED
        body["status"] = {"code": "CANCELLED", "message": "deleted by the user"}
        store.save_job(account, job_id, body)
        runner.stop_job(account, job_id, "deleted")  # the runner writes nothing then
    output = store.get_dataset(account, body["outputDatasetId"].rsplit("/", 1)[-1])
    if output is not None and output.get("state") != "READY":  # a cancel not yet written too
        runner.write_output(account, job_id)


def install_batch(app: FastAPI, state: Any, prefixes: tuple[str, ...]) -> BatchRunner:
    """The datasets and batch jobs routes under each of `prefixes`, and the runner (the app's
    lifespan starts and stops it)."""
    from girandole.api.batch.runtime import build_runner
    from girandole.api.datasets.route import router as datasets_router

    runner = build_runner(app, state)
    for prefix in prefixes:  # the OpenAPI document shows the /v1 copy
        shown = prefix.startswith("/v1")
        app.include_router(datasets_router, prefix=prefix, include_in_schema=shown)
        app.include_router(router, prefix=prefix, include_in_schema=shown)
    return runner


def job_exists(account: str, job_id: str) -> APIError:
    """The 409 of a job id taken (checked before the input is read, and again as it is saved)."""
    return APIError(
        409,
        f"Batch inference job {job_name(account, job_id)} already exists",
        type="error",
        code="ALREADY_EXISTS",
    )
