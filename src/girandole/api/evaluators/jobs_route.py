"""Routes of Fireworks' evaluation jobs API, as the fireworks-ai SDK's `client.evaluation_jobs`
calls them:

    POST   /v1/accounts/{a}/evaluationJobs        create {evaluationJobId, evaluationJob{evaluator,
                                                  inputDataset, outputDataset, displayName}}
    GET    /v1/accounts/{a}/evaluationJobs        list (pageSize, pageToken, filter, orderBy,
                                                  readMask)
    GET    /v1/accounts/{a}/evaluationJobs/{j}    get
    DELETE /v1/accounts/{a}/evaluationJobs/{j}    cancel it if it runs, delete it (its output
                                                  dataset stays)
    GET    /v1/accounts/{a}/evaluationJobs/{j}:getExecutionLogEndpoint  {executionLogSignedUri}

also under /inference/v1. A job scores every line of its input dataset with an ACTIVE evaluator
and writes them, each with its `evaluation_result` ({score, reason, metrics} or {error}), to the
output dataset, which it creates (READY when the job completes); its `metrics` are meanScore,
scoredRows and failedRows.
"""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from girandole.api.datasets.route import STRICT, created_by, new_dataset, own_id
from girandole.api.deployments.route import Account, read_json
from girandole.api.evaluators.route import code_allowed
from girandole.api.evaluators.runtime import JOB_LOG, EvaluatorRuntime
from girandole.api.finetune.jobs import get_or_404, job_exists, new_job_id
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.openapi import body_doc
from girandole.api.http.opened_file import opened_file_response
from girandole.api.http.signed_upload import URL_LIFETIME_S, check_signature, signed_url
from girandole.batch.store import BatchStore, dataset_name, now_text
from girandole.evaluators.build import ACTIVE
from girandole.evaluators.store import (
    CANCELLED,
    CREATING,
    EVALUATION_JOBS,
    EVALUATORS,
    JOB_FINAL,
    JobStore,
)  # fmt: skip


class EvaluationJobFields(BaseModel):
    model_config = STRICT

    evaluator: str
    inputDataset: str
    outputDataset: str
    displayName: str | None = None
    awsS3Config: dict[str, Any] | None = None
    outputStats: str | None = None


class CreateEvaluationJobBody(BaseModel):
    model_config = STRICT

    evaluationJob: EvaluationJobFields
    evaluationJobId: str | None = None
    leaderboardIds: list[str] | None = None


JOB_FIELDS = set(EvaluationJobFields.model_fields) | {
    "name", "state", "status", "createTime", "updateTime", "completedTime", "createdBy", "metrics",
}  # fmt: skip

router = APIRouter(tags=["evaluation jobs"])


def jobs_of(request: Request) -> JobStore:
    return request.app.state.evaluator_stores[EVALUATION_JOBS.collection]


def runtime_of(request: Request) -> EvaluatorRuntime:
    return request.app.state.evaluators


def datasets_of(request: Request) -> BatchStore:
    return request.app.state.batch_store


@router.get(
    "/accounts/{account}/evaluationJobs/{job_id}:getExecutionLogEndpoint",
    summary="A signed URL of an evaluation job's log",
)
async def get_log_endpoint(job_id: str, request: Request, account: str = Account) -> dict:
    jobs = jobs_of(request)
    get_or_404(jobs, account, job_id)
    if not (runtime_of(request).job_dir(account, job_id) / JOB_LOG).is_file():
        return {}  # not ended yet: no log (Fireworks' answer is empty then too)
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=URL_LIFETIME_S)
    return {
        "executionLogSignedUri": signed_url(request, "GET", jobs.name(account, job_id), JOB_LOG),
        "contentType": "text/plain",
        "expireTime": expires.isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


@router.get("/accounts/{account}/evaluationJobs/{job_id}/files/{filename}", include_in_schema=False)  # fmt: skip
async def get_log(
    account: str, job_id: str, filename: str, request: Request, expires: int, signature: str
) -> Response:
    jobs = jobs_of(request)
    check_signature("GET", jobs.name(account, job_id), filename, expires, signature)
    path = runtime_of(request).job_dir(account, job_id) / JOB_LOG
    exists = filename == JOB_LOG and jobs.get(account, job_id) is not None
    found = opened_file_response(path, "text/plain") if exists else None
    if found is None:
        raise APIError(404, f"No log of {jobs.name(account, job_id)}", type="error", code="NOT_FOUND")  # fmt: skip
    return found


@router.post(
    "/accounts/{account}/evaluationJobs",
    summary="Create an evaluation job",
    openapi_extra=body_doc(CreateEvaluationJobBody),
)
async def create_job(
    request: Request,
    account: str = Account,
    job_id_query: str | None = Query(default=None, alias="evaluationJobId"),
) -> dict:
    code_allowed(request)
    body = await read_json(request, CreateEvaluationJobBody)
    fields = body.evaluationJob
    if body.leaderboardIds:
        raise bad_request("leaderboardIds: leaderboards are not supported by this server", "leaderboardIds")  # fmt: skip
    if fields.awsS3Config:
        raise bad_request(
            "evaluationJob.awsS3Config: datasets in S3 are not supported by this server (upload"
            " the dataset)",
            "evaluationJob.awsS3Config",
        )
    jobs, datasets = jobs_of(request), datasets_of(request)
    job_id = new_job_id(EVALUATION_JOBS, body.evaluationJobId or job_id_query)
    evaluator_id = own_id(account, fields.evaluator, "evaluators", "evaluationJob.evaluator")
    evaluator_store: JobStore = request.app.state.evaluator_stores[EVALUATORS.collection]
    evaluator = evaluator_store.get(account, evaluator_id)
    if evaluator is None or evaluator.get("state") != ACTIVE:
        name = evaluator_store.name(account, evaluator_id)
        why = "does not exist" if evaluator is None else f"is {evaluator.get('state')}, not ACTIVE"
        raise bad_request(f"evaluationJob.evaluator: {name} {why}", "evaluationJob.evaluator")
    input_id = own_id(account, fields.inputDataset, "datasets", "evaluationJob.inputDataset")
    source = datasets.get_dataset(account, input_id)
    if source is None or source.get("state") != "READY":
        why = "does not exist" if source is None else f"is {source.get('state')}, not READY"
        message = f"evaluationJob.inputDataset: {dataset_name(account, input_id)} {why}"
        raise bad_request(message, "evaluationJob.inputDataset")
    output_id = own_id(account, fields.outputDataset, "datasets", "evaluationJob.outputDataset")
    if output_id == input_id:
        raise bad_request("evaluationJob.outputDataset must differ from inputDataset", "evaluationJob.outputDataset")  # fmt: skip
    now = now_text()
    job = {
        "name": jobs.name(account, job_id),
        "displayName": fields.displayName or job_id,
        "evaluator": evaluator["name"],
        "inputDataset": dataset_name(account, input_id),
        "outputDataset": dataset_name(account, output_id),
        "state": CREATING,
        "status": {"code": "OK", "message": ""},
        "createTime": now,
        "updateTime": now,
        "createdBy": created_by(request),
    }
    if jobs.get(account, job_id) is not None:
        raise job_exists(jobs, account, job_id)
    output = new_dataset(account, output_id, {"displayName": f"{job['displayName']} results"}, job["createdBy"])  # fmt: skip
    if not datasets.insert_dataset(account, output_id, output):
        raise APIError(
            409,
            f"evaluationJob.outputDataset: {dataset_name(account, output_id)} already exists (the"
            " job creates it): name another",
            param="evaluationJob.outputDataset",
            code="ALREADY_EXISTS",
        )
    if not jobs.insert(account, job_id, job):
        datasets.delete_dataset(account, output_id)
        raise job_exists(jobs, account, job_id)
    runtime_of(request).run_later(account, job_id)
    return job


@router.get("/accounts/{account}/evaluationJobs", summary="List evaluation jobs")
async def list_jobs(request: Request, account: str = Account, query: ListParams = ListQuery) -> dict:  # fmt: skip
    jobs = jobs_of(request).list(account)
    return list_page(jobs, "evaluationJobs", query, JOB_FIELDS | {f for j in jobs for f in j})


@router.get("/accounts/{account}/evaluationJobs/{job_id}", summary="Get an evaluation job")
async def get_job(
    job_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    return read_masked(get_or_404(jobs_of(request), account, job_id), read_mask, JOB_FIELDS)


@router.delete("/accounts/{account}/evaluationJobs/{job_id}", summary="Delete an evaluation job")
async def delete_job(job_id: str, request: Request, account: str = Account) -> dict:
    jobs = jobs_of(request)
    job = get_or_404(jobs, account, job_id)
    if job["state"] not in JOB_FINAL:
        job.update(state=CANCELLED, status={"code": "CANCELLED", "message": "deleted by the user"})
        jobs.save(account, job_id, job)
        runtime_of(request).cancel(account, job_id)
    jobs.delete(account, job_id)
    runtime_of(request).forget_job(account, job_id)
    return {}
