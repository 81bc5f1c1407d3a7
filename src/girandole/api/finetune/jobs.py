"""The routes every kind of fine-tuning job (girandole.finetune.store.JobKind) shares: get,
list, delete, :cancel and :resume of `/accounts/{a}/{collection}`, and what creating one needs
past its own fields (the output model's name, the stored job). Each kind's module adds its
create route (route.py: supervised fine-tuning, dpo_route.py: DPO).

    GET    /accounts/{a}/{collection}              list (pageSize, pageToken, filter, orderBy,
                                                   readMask)
    GET    /accounts/{a}/{collection}/{j}          get
    DELETE /accounts/{a}/{collection}/{j}          cancel it if it runs, delete it (its output
                                                   model stays)
    POST   /accounts/{a}/{collection}/{j}:cancel   stop it
    POST   /accounts/{a}/{collection}/{j}:resume   run a CANCELLED or FAILED job again, from the
                                                   start (a keep-alive RLOR job: from its last
                                                   written step, finetune/keep_alive.py)
    GET    /accounts/{a}/{collection}/{j}:getMetricsFileEndpoint  {signedUrl}: a signed GET URL
                                                   (api/http/signed_upload.py) of the job's
                                                   metrics.jsonl, one line per optimizer step
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from girandole.api.datasets.route import created_by, own_id
from girandole.api.deployments.route import Account, manager_of
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.opened_file import opened_file_response
from girandole.api.http.signed_upload import check_signature, signed_url
from girandole.batch.store import now_text
from girandole.finetune.job_runner import METRICS_FILE, JobRunner
from girandole.finetune.store import (
    CANCELLED,
    FAILED,
    FINAL,
    PENDING,
    JobKind,
    JobStore,
    training_fields,
)  # fmt: skip

# A job's fields besides its create body's
STATE_FIELDS = {
    "name", "state", "status", "jobProgress", "createTime", "updateTime", "completedTime",
    "createdBy",
}  # fmt: skip


def stores_of(request: Request) -> dict[str, JobStore]:
    """Every kind's store, by its collection."""
    return request.app.state.finetune_stores


def runner_of(request: Request) -> JobRunner:
    return request.app.state.sft


def get_or_404(store: JobStore, account: str, job_id: str) -> dict[str, Any]:
    found = store.get(account, job_id)
    if found is None:
        raise APIError(
            404,
            f"{store.kind.noun} {store.name(account, job_id)} not found",
            type="error",
            code="NOT_FOUND",
        )
    return found


def job_exists(store: JobStore, account: str, job_id: str) -> APIError:
    return APIError(
        409,
        f"{store.kind.noun} {store.name(account, job_id)} already exists",
        type="error",
        code="ALREADY_EXISTS",
    )


def new_job_id(kind: JobKind, job_id: str | None) -> str:
    import uuid

    from girandole.registry.naming import is_valid_id

    if job_id is None:
        return kind.id_prefix + uuid.uuid4().hex[:12]
    if not is_valid_id(job_id):
        raise bad_request(
            f"{kind.id_param} {job_id!r} is not a valid id: 1-63 characters of a-z, 0-9 and '-',"
            " starting with a letter",
            kind.id_param,
        )
    return job_id


def output_model(request: Request, account: str, text: str, param: str = "outputModel") -> str:
    """The output model's full name; 409 when it exists, or when a job of any kind that has
    not ended will write it."""
    model_id = own_id(account, text, "models", param)
    name = f"accounts/{account}/models/{model_id}"
    claimed = any(
        training_fields(job).get("outputModel") == name and job["state"] not in FINAL
        for store in stores_of(request).values()
        for job in store.list(account)
    )
    if manager_of(request).catalog.get(name) is not None or claimed:
        raise APIError(
            409,
            f"outputModel {name} already exists (or a job not ended will create it): name another",
            param=param,
            code="ALREADY_EXISTS",
        )
    return name


def check_pending_cap(request: Request, account: str) -> None:
    """429 RESOURCE_EXHAUSTED when `account` already has --max-pending-finetune-jobs jobs of
    any kind waiting: one more may not join the queue (the runner is fair across accounts, and
    the cap keeps one account's queue from growing without bound). No await comes between this
    check and the caller's write: two creates cannot both pass at the cap."""
    cap = request.app.state.girandole.settings.max_pending_finetune_jobs
    if not cap:
        return
    waiting = sum(store.count_pending(account) for store in stores_of(request).values())
    if waiting >= cap:
        raise APIError(
            429,
            f"Account {account} already has {waiting} fine-tuning jobs waiting (PENDING), the"
            f" most an account may have on this server (--max-pending-finetune-jobs {cap}):"
            " wait for one to start, or cancel one",
            type="error",
            code="RESOURCE_EXHAUSTED",
        )


def insert_job(
    request: Request, store: JobStore, account: str, job_id: str, fields: dict[str, Any]
) -> dict[str, Any]:
    """Store the new job (PENDING) and wake the runner; the job's body. 429 at the cap on an
    account's waiting jobs."""
    check_pending_cap(request, account)
    now = now_text()
    job = {
        "name": store.name(account, job_id),
        **fields,
        "state": PENDING,
        "status": {"code": "OK", "message": ""},
        "jobProgress": {"percent": 0, "epoch": 0},
        "createTime": now,
        "updateTime": now,
        "createdBy": created_by(request),
    }
    if not store.insert(account, job_id, job):
        raise job_exists(store, account, job_id)
    runner_of(request).notify()
    return job


def stop(request: Request, store: JobStore, account: str, job_id: str, body: dict, why: str) -> None:  # fmt: skip
    if body["state"] in FINAL:
        return
    body["state"] = CANCELLED
    body["status"] = {"code": "CANCELLED", "message": why}
    body["completedTime"] = now_text()
    store.save(account, job_id, body)
    runner_of(request).stop_job(store, account, job_id)


def job_routes(router: APIRouter, kind: JobKind, fields: set[str]) -> None:
    """Add the shared routes of `kind` to `router`; `fields`: the job's create body's fields (what
    a filter, orderBy or readMask may name, whether or not a job has them). The kind's create
    route is added before (a ':verb' route comes before the plain `{job_id}` one anyway)."""
    collection, noun = kind.collection, kind.noun.lower()
    known = fields | STATE_FIELDS

    def store_of(request: Request) -> JobStore:
        return stores_of(request)[collection]

    async def cancel_job(job_id: str, request: Request, account: str = Account) -> dict:
        store = store_of(request)
        body = get_or_404(store, account, job_id)
        stop(request, store, account, job_id, body, "cancelled by the user")
        return store.get(account, job_id) or body

    async def resume_job(job_id: str, request: Request, account: str = Account) -> dict:
        store = store_of(request)
        body = get_or_404(store, account, job_id)
        if body["state"] not in (CANCELLED, FAILED):
            raise bad_request(
                f"job {body['name']} is {body['state']}: only a CANCELLED or FAILED job resumes",
                "name",
            )
        written = training_fields(body).get("outputModel")  # none: a keep-alive or forward-only job
        if written:
            output_model(request, account, written)  # 409 once it exists
        check_pending_cap(request, account)
        body["state"] = PENDING
        body["status"] = {"code": "OK", "message": ""}
        body["jobProgress"] = {"percent": 0, "epoch": 0}
        body.pop("completedTime", None)
        store.save(account, job_id, body)
        runner_of(request).notify()
        return store.get(account, job_id) or body

    async def get_metrics_file_endpoint(job_id: str, request: Request, account: str = Account) -> dict:  # fmt: skip
        store = store_of(request)
        get_or_404(store, account, job_id)
        if not (runner_of(request).work_dir(store, account, job_id) / METRICS_FILE).is_file():
            raise APIError(
                404,
                f"{store.name(account, job_id)} has no metrics yet: it has not run a step",
                type="error",
                code="NOT_FOUND",
            )
        return {"signedUrl": signed_url(request, "GET", store.name(account, job_id), METRICS_FILE)}

    async def get_metrics_file(
        account: str, job_id: str, filename: str, request: Request, expires: int, signature: str
    ) -> Response:
        store = store_of(request)
        check_signature("GET", store.name(account, job_id), filename, expires, signature)
        path = runner_of(request).work_dir(store, account, job_id) / METRICS_FILE
        # the job deleted since: its metrics go with it
        found = opened_file_response(path, "application/jsonl") if store.get(account, job_id) else None  # fmt: skip
        if found is None:
            raise APIError(404, f"No metrics of {store.name(account, job_id)}", type="error", code="NOT_FOUND")  # fmt: skip
        return found

    async def list_jobs(request: Request, account: str = Account, query: ListParams = ListQuery) -> dict:  # fmt: skip
        jobs = await asyncio.to_thread(store_of(request).list, account)
        return list_page(jobs, collection, query, known | {f for job in jobs for f in job})

    async def get_job(
        job_id: str,
        request: Request,
        account: str = Account,
        read_mask: str | None = Query(default=None, alias="readMask"),
    ) -> dict:
        return read_masked(get_or_404(store_of(request), account, job_id), read_mask, known)

    async def delete_job(job_id: str, request: Request, account: str = Account) -> dict:
        store = store_of(request)
        body = get_or_404(store, account, job_id)
        stop(request, store, account, job_id, body, "deleted by the user")
        store.delete(account, job_id)
        return {}

    path = f"/accounts/{{account}}/{collection}"
    router.add_api_route(f"{path}/{{job_id}}:cancel", cancel_job, methods=["POST"], summary=f"Cancel a {noun}")  # fmt: skip
    router.add_api_route(f"{path}/{{job_id}}:resume", resume_job, methods=["POST"], summary=f"Run a cancelled or failed {noun} again")  # fmt: skip
    # before the plain `{job_id}` GET, which would take `x:getMetricsFileEndpoint`
    router.add_api_route(f"{path}/{{job_id}}:getMetricsFileEndpoint", get_metrics_file_endpoint, methods=["GET"], summary=f"A signed URL of a {noun}'s metrics file")  # fmt: skip
    router.add_api_route(f"{path}/{{job_id}}/files/{{filename}}", get_metrics_file, methods=["GET"], include_in_schema=False)  # fmt: skip
    router.add_api_route(path, list_jobs, methods=["GET"], summary=f"List {noun}s")
    router.add_api_route(f"{path}/{{job_id}}", get_job, methods=["GET"], summary=f"Get a {noun}")
    router.add_api_route(f"{path}/{{job_id}}", delete_job, methods=["DELETE"], summary=f"Delete a {noun}")  # fmt: skip
