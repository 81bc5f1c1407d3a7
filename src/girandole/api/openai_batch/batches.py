"""OpenAI's Batch API, as the openai SDK's `client.batches` calls it (also under /inference/v1):

    POST /v1/batches               create: input_file_id, endpoint (chat, completions,
                                   embeddings, responses), completion_window, metadata,
                                   output_expires_after (checked as OpenAI checks it, kept,
                                   never applied: files here are kept until deleted)
    GET  /v1/batches               list, newest first (limit, after)
    GET  /v1/batches/{id}          the batch object
    POST /v1/batches/{id}/cancel   stop it; what is done stays in its output file

A batch is a Fireworks batch inference job (girandole.batch.runner) whose lines come from an
uploaded file (`files.py`), run in the capacity interactive requests leave, with usage rows of
the key that made it. The job's state reads as OpenAI's status: in_progress (waiting or
running), finalizing (writing its files), completed, failed, cancelling (stopped, files not
written yet), cancelled. Its results and errors (OpenAI's output lines: custom_id, response,
error) are files (`output_file_id`, `error_file_id`) once written.

The input is checked whole when the batch is created, so a bad file is a 400 naming the line
(OpenAI checks it after answering, in a `validating` status); every line must POST to the
batch's `endpoint` and name the same model (OpenAI's rules), which the key must reach (404).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from girandole.api.batch.route import new_job, start_new_job, stop_job, store_of
from girandole.api.datasets.route import created_by, new_dataset
from girandole.api.deployments.route import read_json
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.openapi import body_doc
from girandole.api.http.pages import no_item, page_json
from girandole.api.openai_batch.files import KeyAccount, files_of, get_file, no_such_file
from girandole.api.serving.target import resolve_target
from girandole.batch.files import BATCH_OUTPUT, FileStore
from girandole.batch.lines import MESSAGES, URL_FORMS, URLS, InputError, read_input
from girandole.batch.runner import MAX_INPUT_LINES
from girandole.batch.store import (
    CANCELLED,
    COMPLETED,
    ERRORS_FILE,
    FAILED,
    FINAL,
    PENDING,
    RESULTS_FILE,
    RUNNING,
    WRITING_RESULTS,
    BatchStore,
    job_name,
)

WINDOW = "24h"  # the only completion window OpenAI offers
ENDPOINTS = tuple(url for url in URLS if url != MESSAGES)  # OpenAI's: Anthropic's have their own
STATUS = {PENDING: "in_progress", RUNNING: "in_progress", WRITING_RESULTS: "finalizing",
          COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}  # fmt: skip
MAX_LIST = 100
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]
EXPIRY_ANCHOR = "created_at"  # the only anchor OpenAI offers: the output file's creation
EXPIRY_SECONDS = (3600, 30 * 24 * 3600)  # OpenAI's range: an hour to 30 days


class OutputExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    anchor: str
    seconds: int


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    output_expires_after: OutputExpiresAfter | None = None


router = APIRouter(tags=["batches"])


def job_id_of(batch_id: str) -> str | None:
    """The job of an OpenAI batch id (`batch_<hex>` -> `batch-<hex>`)."""
    return f"batch-{batch_id[6:]}" if BATCH_ID.fullmatch(batch_id) else None


def no_such_batch(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", param="batch_id", code="NOT_FOUND")


def get_job(request: Request, account: str, batch_id: str) -> dict[str, Any]:
    job_id = job_id_of(batch_id)
    job = store_of(request).get_job(account, job_id) if job_id else None
    if job is None or "openai" not in job:
        raise no_such_batch(batch_id)
    return job


def output_files(
    store: BatchStore, files: FileStore, account: str, job: dict[str, Any]
) -> tuple[bool, dict[str, str | None]]:
    """Whether the batch's output dataset is written, and the ids of its output and error files
    (None while there is none of that kind), named as files once written."""
    made = job["openai"]
    output_id = job["outputDatasetId"].rsplit("/", 1)[-1]
    output = store.get_dataset(account, output_id)
    written = output is not None and output.get("state") == "READY"
    progress = job["jobProgress"]
    file_ids: dict[str, str | None] = {RESULTS_FILE: None, ERRORS_FILE: None}
    counts = {RESULTS_FILE: progress["successfullyProcessedRequests"],
              ERRORS_FILE: progress["failedRequests"]}  # fmt: skip
    for filename, suffix in ((RESULTS_FILE, "output"), (ERRORS_FILE, "errors")):
        if written and counts[filename]:
            file_id = f"file-{made['id'].removeprefix('batch_')}-{suffix}"
            name = f"{made['id']}_{suffix}.jsonl"
            if files.add(account, file_id, output_id, filename, name, BATCH_OUTPUT):
                file_ids[filename] = file_id
    return written, file_ids


def batch_json(request: Request, account: str, job: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's batch object of a job."""
    made = job["openai"]
    times = {state: int(t) for state, t in made.get("times", {}).items()}  # OpenAI's: seconds
    written, file_ids = output_files(store_of(request), files_of(request), account, job)
    status = STATUS[job["state"]]
    if job["state"] == CANCELLED and not written:
        status = "cancelling"  # the runner still stops its lines and writes the files
    progress = job["jobProgress"]
    errors = None
    if job["state"] == FAILED:
        errors = {"object": "list", "data": [{"code": job["status"]["code"],
                  "message": job["status"]["message"], "param": None, "line": None}]}  # fmt: skip
    created = made["created_at"]
    return {
        "id": made["id"],
        "object": "batch",
        "endpoint": made["endpoint"],
        "model": job["model"],
        "errors": errors,
        "input_file_id": made["input_file_id"],
        "completion_window": WINDOW,
        "status": status,
        "output_file_id": file_ids[RESULTS_FILE],
        "error_file_id": file_ids[ERRORS_FILE],
        "created_at": created,
        "in_progress_at": created,  # checked when created: in progress from then on
        "expires_at": created + 24 * 3600,
        "finalizing_at": times.get(WRITING_RESULTS),
        "completed_at": times.get(COMPLETED),
        "failed_at": times.get(FAILED),
        "expired_at": None,
        "cancelling_at": times.get(CANCELLED),
        "cancelled_at": times.get(CANCELLED) if status == "cancelled" else None,
        "request_counts": {
            "total": progress["totalInputRequests"],
            "completed": progress["successfullyProcessedRequests"],
            "failed": progress["failedRequests"],
        },
        "usage": {
            "input_tokens": progress["inputTokens"],
            "input_tokens_details": {"cached_tokens": progress["cachedInputTokenCount"]},
            "output_tokens": progress["outputTokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": progress["inputTokens"] + progress["outputTokens"],
        },
        "metadata": made.get("metadata"),
    }


def check_expiry(expiry: OutputExpiresAfter | None) -> None:
    """OpenAI's rules for `output_expires_after` (400 naming the field). The policy is then
    kept with the batch but never applied: files here are kept until deleted."""
    if expiry is None:
        return
    if expiry.anchor != EXPIRY_ANCHOR:
        raise bad_request(
            f"output_expires_after.anchor must be '{EXPIRY_ANCHOR}', got {expiry.anchor[:32]!r}",
            "output_expires_after.anchor",
        )
    low, high = EXPIRY_SECONDS
    if not low <= expiry.seconds <= high:
        raise bad_request(
            f"output_expires_after.seconds must be between {low} (1 hour) and {high} (30 days),"
            f" got {expiry.seconds}",
            "output_expires_after.seconds",
        )


def batch_model(request: Request, account: str, file_id: str, endpoint: str) -> tuple[str, int]:
    """The model every line of the file names, and the number of lines, after checking them
    all (a 400 naming `input_file_id` and the line)."""
    record = get_file(request, account, file_id)
    if record.purpose != "batch":
        raise bad_request(
            f"input_file_id {file_id} was uploaded with purpose '{record.purpose}'; a batch"
            " reads a file uploaded with purpose 'batch'",
            "input_file_id",
        )
    path = files_of(request).path_of(account, record)

    def bad(message: str) -> APIError:
        return bad_request(f"input_file_id {file_id}: {message}", "input_file_id")

    try:
        lines = read_input(path.read_bytes(), MAX_INPUT_LINES)
    except InputError as exc:
        raise bad(str(exc)) from None
    except FileNotFoundError:  # deleted since it was looked up
        raise no_such_file(file_id) from None
    models = set()
    for line in lines:
        if line.url != endpoint:
            raise bad(
                f"line {line.line + 1}: its url is {line.url}, not the batch's endpoint {endpoint}"
            )
        model = line.body.get("model")
        if not isinstance(model, str) or not model:
            raise bad(f"line {line.line + 1}: body.model is required")
        models.add(model)
    if len(models) > 1:
        raise bad(
            f"the lines name {len(models)} models ({', '.join(sorted(models)[:3])}, ...): a"
            " batch runs one model"
        )
    return models.pop(), len(lines)


@router.post("/batches", summary="Create a batch", openapi_extra=body_doc(BatchRequest))
async def create_batch(request: Request, account: str = KeyAccount) -> dict[str, Any]:
    body = await read_json(request, BatchRequest)
    endpoint = URL_FORMS.get(body.endpoint)
    if endpoint not in ENDPOINTS:
        raise bad_request(
            f"endpoint {body.endpoint[:100]!r} is not one a batch runs here:"
            f" {', '.join(ENDPOINTS)}",
            "endpoint",
        )
    if body.completion_window != WINDOW:
        raise bad_request(
            f"completion_window must be '{WINDOW}', got {body.completion_window[:32]!r}",
            "completion_window",
        )
    check_expiry(body.output_expires_after)
    # reading and checking up to 500 MB of lines takes seconds: off the event loop
    model, total = await asyncio.to_thread(
        batch_model, request, account, body.input_file_id, endpoint
    )
    resolve_target(request, request.app.state.girandole, model, None)  # 404 when out of reach
    # deleted while it was read (no job read it yet): the batch would fail at once
    get_file(request, account, body.input_file_id)
    hexid = uuid.uuid4().hex
    batch_id, job_id = f"batch_{hexid}", f"batch-{hexid}"
    by = created_by(request)
    output_id = f"{job_id}-output"
    output = new_dataset(account, output_id, {"sourceJobName": job_name(account, job_id)}, by)
    job = new_job(account, job_id, batch_id, model, body.input_file_id, output_id, {}, total, by)
    job["openai"] = {
        "id": batch_id,
        "endpoint": endpoint,
        "input_file_id": body.input_file_id,
        "created_at": int(time.time()),
        "metadata": body.metadata,
    }
    if body.output_expires_after is not None:  # kept, as OpenAI's Batch object never shows it
        job["openai"]["output_expires_after"] = body.output_expires_after.model_dump()
    return batch_json(
        request, account, start_new_job(request, account, job_id, job, {output_id: (output, {})})
    )


@router.get("/batches", summary="List batches, newest first")
async def list_batches(
    request: Request,
    account: str = KeyAccount,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    store = store_of(request)

    def read() -> list[dict[str, Any]]:
        # only the page's batches, newest first, and one more telling whether there are more
        below = None
        if after is not None:
            job_id = job_id_of(after)
            below = store.key_of(account, job_id, "openai", after) if job_id else None
            if below is None:
                raise no_item(after, "after")
        rows = store.page_jobs(account, limit + 1, api="openai", below=below, descending=True)
        return [job for _, job in rows]

    jobs = await asyncio.to_thread(read)
    return page_json([batch_json(request, account, j) for j in jobs[:limit]], len(jobs) > limit)


@router.get("/batches/{batch_id}", summary="A batch's object")
async def retrieve_batch(batch_id: str, request: Request, account: str = KeyAccount) -> Any:
    return batch_json(request, account, get_job(request, account, batch_id))


@router.post("/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel_batch(batch_id: str, request: Request, account: str = KeyAccount) -> Any:
    job = get_job(request, account, batch_id)
    if job["state"] in FINAL and job["state"] != CANCELLED:
        raise bad_request(
            f"Batch {batch_id} cannot be cancelled: it is already {STATUS[job['state']]}",
            "batch_id",
        )
    return batch_json(request, account, stop_job(request, account, job))
