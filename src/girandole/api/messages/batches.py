"""Anthropic's Message Batches API, as the anthropic SDK's `client.messages.batches` calls it
(also under /inference/v1):

    POST   /v1/messages/batches                 create: requests [{custom_id, params}]
    GET    /v1/messages/batches                 list, newest first (limit, after_id, before_id)
    GET    /v1/messages/batches/{id}            the batch
    POST   /v1/messages/batches/{id}/cancel     stop it; what is done stays done
    GET    /v1/messages/batches/{id}/results    its results (JSONL) once it has ended
    DELETE /v1/messages/batches/{id}            an ended batch, its requests and results

A message batch is a batch inference job (girandole.batch.runner) whose lines are Messages
requests (`/v1/messages`), each naming its own model, run in the capacity interactive requests
leave, with usage rows of the key that made it; its requests are kept as the job's input
dataset. As at Anthropic, creating one checks only the requests' shape (a unique `custom_id` of
1-64 of `[A-Za-z0-9_-]`, a `params` object): what the Messages endpoint refuses becomes that
request's `errored` result, in Anthropic's error shape. Results come in request order.

Unlike Anthropic's, `request_counts` move while the batch runs (Anthropic's stay `processing`
until it ends); their sum is always the number of requests. A batch never expires here.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from girandole.api.batch.route import new_job, start_new_job, stop_job, store_of
from girandole.api.datasets.route import created_by, new_dataset
from girandole.api.deployments.route import read_json
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.openapi import body_doc
from girandole.api.http.pages import no_item, page_json
from girandole.api.messages.route import anthropic_errors
from girandole.api.openai_batch.files import KeyAccount
from girandole.batch.lines import MESSAGES, InputError, read_input
from girandole.batch.runner import MAX_INPUT_LINES
from girandole.batch.store import CANCELLED, FAILED, FINAL, BatchStore, JobKey, job_name
from girandole.registry.deployments import format_time, parse_time

BATCH_ID = re.compile(r"msgbatch_[0-9a-f]{32}")
CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
REQUESTS_FILE = "requests.jsonl"
EXPIRES_S = 24 * 3600  # Anthropic's expires_at: a day after creation (never enforced here)
MAX_LIST = 1000


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    custom_id: str
    params: dict[str, Any]


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests: Annotated[list[BatchItem], Field(min_length=1, max_length=MAX_INPUT_LINES)]


# Anthropic's error shape on every route here, 401s included
router = APIRouter(tags=["message batches"], dependencies=[Depends(anthropic_errors)])


def job_id_of(batch_id: str) -> str | None:
    """The job of a message batch id (`msgbatch_<hex>` -> `msgbatch-<hex>`)."""
    return f"msgbatch-{batch_id[9:]}" if BATCH_ID.fullmatch(batch_id) else None


def get_batch_job(request: Request, account: str, batch_id: str) -> dict[str, Any]:
    job_id = job_id_of(batch_id)
    job = store_of(request).get_job(account, job_id) if job_id else None
    if job is None or "anthropic" not in job:
        raise APIError(
            404, f"No message batch with id {batch_id!r}", param="message_batch_id",
            code="NOT_FOUND",
        )  # fmt: skip
    return job


def ended_job(request: Request, account: str, batch_id: str, then: str) -> dict[str, Any]:
    """The batch's job once it has ended; a 400 saying what to do (`then`) before."""
    job = get_batch_job(request, account, batch_id)
    if not has_ended(store_of(request), account, job):
        raise bad_request(
            f"Message batch {batch_id} is still being processed: {then} once its"
            " processing_status is 'ended'",
            "message_batch_id",
        )
    return job


def id_in(job: dict[str, Any], key: str) -> str:
    """The id at the end of one of the job's resource names (its own, its datasets')."""
    return job[key].rsplit("/", 1)[-1]


def has_ended(store: BatchStore, account: str, job: dict[str, Any]) -> bool:
    """Final, with its results written (a cancelled job first stops its lines in flight)."""
    output = store.get_dataset(account, id_in(job, "outputDatasetId"))
    return job["state"] in FINAL and output is not None and output.get("state") == "READY"


def results_url(request: Request, batch_id: str) -> str:
    """The absolute URL of the results (the SDK reads it from the batch), under the prefix
    this request came by (/v1 or /inference/v1)."""
    path = request.url.path
    prefix = path[: path.index("/messages/batches")]
    return f"{str(request.base_url).rstrip('/')}{prefix}/messages/batches/{batch_id}/results"


def batch_json(request: Request, account: str, job: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's MessageBatch object of a job."""
    made = job["anthropic"]
    times: dict[str, float] = made.get("times", {})
    ended = has_ended(store_of(request), account, job)
    status = "ended" if ended else "canceling" if job["state"] == CANCELLED else "in_progress"
    progress = job["jobProgress"]
    succeeded, errored = progress["successfullyProcessedRequests"], progress["failedRequests"]
    left = progress["totalInputRequests"] - succeeded - errored
    counts = {"processing": left, "succeeded": succeeded, "errored": errored, "canceled": 0,
              "expired": 0}  # fmt: skip
    if ended:  # what never ran: canceled, or errored with a job that failed
        counts["processing"] = 0
        counts["canceled" if job["state"] == CANCELLED else "errored"] += left
    created = parse_time(job["createTime"]) or 0.0
    ended_at = next((times[s] for s in FINAL if s in times), None) if ended else None
    return {
        "id": made["id"],
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "created_at": job["createTime"],
        "expires_at": format_time(created + EXPIRES_S),
        "ended_at": format_time(ended_at),
        "cancel_initiated_at": format_time(times.get(CANCELLED)),
        "archived_at": None,
        "results_url": results_url(request, made["id"]) if ended else None,
    }


@router.post(
    "/messages/batches", summary="Create a message batch (Anthropic's Message Batches API)",
    openapi_extra=body_doc(CreateBatch),
)  # fmt: skip
async def create_batch(request: Request, account: str = KeyAccount) -> dict[str, Any]:
    body = await read_json(request, CreateBatch)
    seen: dict[str, int] = {}
    for index, item in enumerate(body.requests):
        if not CUSTOM_ID.fullmatch(item.custom_id):
            raise bad_request(
                f"requests.{index}.custom_id: {item.custom_id[:80]!r} must be 1-64 characters"
                " of letters, digits, '_' and '-'",
                f"requests.{index}.custom_id",
            )
        if item.custom_id in seen:
            raise bad_request(
                f"requests.{index}.custom_id: {item.custom_id!r} is used by requests."
                f"{seen[item.custom_id]} too; each request needs its own",
                f"requests.{index}.custom_id",
            )
        seen[item.custom_id] = index
    lines = [{"custom_id": r.custom_id, "url": MESSAGES, "body": r.params} for r in body.requests]
    data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
    hexid = uuid.uuid4().hex
    batch_id, job_id = f"msgbatch_{hexid}", f"msgbatch-{hexid}"
    input_id, output_id = f"{job_id}-input", f"{job_id}-output"
    store, by = store_of(request), created_by(request)

    source = {"sourceJobName": job_name(account, job_id)}
    requests = new_dataset(account, input_id, source, by)
    requests.update(state="READY", exampleCount=str(len(lines)))
    output = new_dataset(account, output_id, source, by)
    # no model of its own: each line runs the model its params name
    job = new_job(account, job_id, batch_id, "", input_id, output_id, {}, len(lines), by)
    job["anthropic"] = {"id": batch_id}
    partial = await asyncio.to_thread(store.written, data)
    try:  # the requests, the output dataset and the job at once: all, or none (a kill)
        datasets = {input_id: (requests, {REQUESTS_FILE: partial}), output_id: (output, {})}
        return batch_json(request, account, start_new_job(request, account, job_id, job, datasets))
    finally:
        partial.unlink(missing_ok=True)


@router.get("/messages/batches", summary="List message batches, newest first")
async def list_batches(
    request: Request,
    account: str = KeyAccount,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 20,
    after_id: str | None = None,
    before_id: str | None = None,
) -> dict[str, Any]:
    store = store_of(request)

    def key(batch_id: str | None, param: str) -> JobKey | None:
        if batch_id is None:
            return None
        job_id = job_id_of(batch_id)
        found = store.key_of(account, job_id, "anthropic", batch_id) if job_id else None
        if found is None:
            raise no_item(batch_id, param)
        return found

    def read() -> tuple[list[dict[str, Any]], bool]:
        # newest first: after_id's older ones, before_id's newer ones; only the page's batches
        # and one more telling whether there are more
        below, above = key(after_id, "after_id"), key(before_id, "before_id")
        if before_id is not None and after_id is None:
            # the page just before before_id: the newer ones nearest it, read upward, turned
            rows = store.page_jobs(account, limit + 1, api="anthropic", above=above)
            return [job for _, job in rows[:limit][::-1]], len(rows) > limit
        rows = store.page_jobs(
            account, limit + 1, api="anthropic", above=above, below=below, descending=True
        )
        return [job for _, job in rows[:limit]], len(rows) > limit

    jobs, more = await asyncio.to_thread(read)
    page = page_json([batch_json(request, account, j) for j in jobs], more)
    del page["object"]  # Anthropic's page: data, has_more, first_id, last_id
    return page


@router.get("/messages/batches/{message_batch_id}", summary="A message batch")
async def retrieve_batch(
    message_batch_id: str, request: Request, account: str = KeyAccount
) -> dict[str, Any]:
    return batch_json(request, account, get_batch_job(request, account, message_batch_id))


@router.post("/messages/batches/{message_batch_id}/cancel", summary="Cancel a message batch")
async def cancel_batch(
    message_batch_id: str, request: Request, account: str = KeyAccount
) -> dict[str, Any]:
    job = get_batch_job(request, account, message_batch_id)
    if job["state"] in FINAL and job["state"] != CANCELLED:
        raise bad_request(
            f"Message batch {message_batch_id} has already ended: there is nothing to cancel",
            "message_batch_id",
        )
    return batch_json(request, account, stop_job(request, account, job))


@router.get(
    "/messages/batches/{message_batch_id}/results",
    summary="A message batch's results, a JSON line each",
)
async def batch_results(
    message_batch_id: str, request: Request, account: str = KeyAccount
) -> Response:
    job = ended_job(request, account, message_batch_id, "its results are ready")
    try:
        data = await asyncio.to_thread(result_lines, store_of(request), account, job)
    except (InputError, OSError):
        # deleted while they were read (its requests went with it): the 404 it is now
        get_batch_job(request, account, message_batch_id)
        raise
    return Response(data, media_type="application/x-jsonl")


def result_lines(store: BatchStore, account: str, job: dict[str, Any]) -> bytes:
    """Every request's result, in request order: succeeded (the message), errored (Anthropic's
    error body), canceled (never ran: the batch was cancelled)."""
    job_id = id_in(job, "name")
    data = store.dataset_bytes(account, id_in(job, "inputDatasetId"))
    requests = read_input(data, MAX_INPUT_LINES)
    done = store.results_by_line(account, job_id)
    out = []
    for line in requests:
        if line.line in done:
            ok, text = done[line.line]
            response = json.loads(text)["response"]["body"]
            result = {"type": "succeeded", "message": response} if ok else {
                "type": "errored", "error": response}  # fmt: skip
        elif job["state"] == FAILED:
            message = job["status"]["message"] or "the batch failed"
            result = {"type": "errored", "error": {
                "type": "error", "error": {"type": "api_error", "message": message}}}  # fmt: skip
        else:
            result = {"type": "canceled"}
        out.append(json.dumps({"custom_id": line.custom_id, "result": result}) + "\n")
    return "".join(out).encode()


@router.delete("/messages/batches/{message_batch_id}", summary="Delete a message batch")
async def delete_batch(
    message_batch_id: str, request: Request, account: str = KeyAccount
) -> dict[str, Any]:
    job = ended_job(request, account, message_batch_id, "cancel it, and delete it")
    store = store_of(request)
    datasets = (id_in(job, "inputDatasetId"), id_in(job, "outputDatasetId"))
    store.delete_job(account, id_in(job, "name"), datasets)  # at once: all or none
    return {"id": message_batch_id, "type": "message_batch_deleted"}
