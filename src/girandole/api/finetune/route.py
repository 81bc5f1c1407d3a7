"""Routes of Fireworks' supervised fine-tuning jobs, as the fireworks-ai SDK's
`client.supervised_fine_tuning_jobs` calls them:

    POST   /v1/accounts/{a}/supervisedFineTuningJobs?supervisedFineTuningJobId=  create
    GET    /v1/accounts/{a}/supervisedFineTuningJobs            list (pageSize, pageToken, filter,
                                                                orderBy, readMask)
    GET    /v1/accounts/{a}/supervisedFineTuningJobs/{j}        get
    DELETE /v1/accounts/{a}/supervisedFineTuningJobs/{j}        cancel it if it runs, delete it
                                                                (its output model stays)
    POST   /v1/accounts/{a}/supervisedFineTuningJobs/{j}:cancel  stop it
    POST   /v1/accounts/{a}/supervisedFineTuningJobs/{j}:resume  run a CANCELLED or FAILED job
                                                                 again, from the start

also under /inference/v1. Creating checks the fields, the dataset's rows (a 400 names the first
bad line) and the models; the job then waits (JOB_STATE_PENDING) for the runner
(girandole.finetune.job_runner), which trains a LoRA adapter in a child process. Fields of
Fireworks' cloud this server has no counterpart for are a 400 naming them.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict

from girandole.api.datasets.route import created_by, own_id
from girandole.api.deployments.route import Account, manager_of, read_json
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.openapi import body_doc
from girandole.batch.store import dataset_name, now_text
from girandole.finetune.data import RowError, read_rows
from girandole.finetune.job_runner import SftRunner
from girandole.finetune.store import CANCELLED, FAILED, FINAL, PENDING, SftStore, sft_job_name
from girandole.model.lora import MAX_RANK, check_adapter_config
from girandole.registry.models import READY
from girandole.registry.naming import is_valid_id

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=True)

# Fields of Fireworks' cloud: a set value is a 400 saying what this server lacks
UNSUPPORTED = {
    "awsS3Config": "training data read from S3",
    "azureBlobStorageConfig": "training data read from Azure Blob Storage",
    "wandbConfig": "Weights & Biases logging",
    "mtpEnabled": "multi-token prediction heads",
    "mtpFreezeBaseModel": "multi-token prediction heads",
    "mtpNumDraftTokens": "multi-token prediction heads",
    "isTurbo": "turbo training",
    "region": "regions",
    "useReservation": "reserved capacity",
    "reservationTarget": "reserved capacity",
    "usePurpose": "reserved capacity",
    "metricsFileSignedUrl": "metrics written to a signed URL",
    "rendererHuggingFaceRepoId": "renderers from Hugging Face repos",
    "samplerCheckpointSaveIntervalSteps": "sampler checkpoints",
    "jinjaTemplate": "a training template other than the model's chat template (the adapter is"
    " trained on the prompts the chat route renders for it)",
}
DEFAULT_MAX_CONTEXT = 2048
MAX_INT = 2**31 - 1  # Fireworks' int32 fields


class SftJobBody(BaseModel):
    model_config = STRICT

    dataset: str | None = None
    displayName: str | None = None
    baseModel: str | None = None
    warmStartFrom: str | None = None
    outputModel: str | None = None
    epochs: int | None = None
    learningRate: float | None = None
    loraRank: int | None = None
    maxContextLength: int | None = None
    batchSize: int | None = None
    batchSizeSamples: int | None = None
    gradientAccumulationSteps: int | None = None
    learningRateWarmupSteps: int | None = None
    optimizerWeightDecay: float | None = None
    evaluationDataset: str | None = None
    evalAutoCarveout: bool | None = None
    earlyStop: bool | None = None
    nodes: int | None = None
    # Fireworks' cloud (UNSUPPORTED)
    awsS3Config: dict | None = None
    azureBlobStorageConfig: dict | None = None
    wandbConfig: dict | None = None
    mtpEnabled: bool | None = None
    mtpFreezeBaseModel: bool | None = None
    mtpNumDraftTokens: int | None = None
    isTurbo: bool | None = None
    region: str | None = None
    useReservation: bool | None = None
    reservationTarget: str | None = None
    usePurpose: str | None = None
    metricsFileSignedUrl: str | None = None
    rendererHuggingFaceRepoId: str | None = None
    samplerCheckpointSaveIntervalSteps: int | None = None
    jinjaTemplate: str | None = None


# A job's fields: what a filter, orderBy or readMask may name, whether or not a job has them
JOB_FIELDS = set(SftJobBody.model_fields) | {
    "name", "state", "status", "jobProgress", "createTime", "updateTime", "completedTime",
    "createdBy",
}  # fmt: skip

router = APIRouter(tags=["fine-tuning"])


def store_of(request: Request) -> SftStore:
    return request.app.state.sft_store


def runner_of(request: Request) -> SftRunner:
    return request.app.state.sft


def get_or_404(request: Request, account: str, job_id: str) -> dict[str, Any]:
    found = store_of(request).get(account, job_id)
    if found is None:
        raise APIError(
            404,
            f"Supervised fine-tuning job {sft_job_name(account, job_id)} not found",
            type="error",
            code="NOT_FOUND",
        )
    return found


def check_unsupported(body: SftJobBody) -> None:
    for field, what in UNSUPPORTED.items():
        value = getattr(body, field)
        if value in (None, False, 0, "", {}) or str(value).endswith("_UNSPECIFIED"):
            continue
        raise bad_request(
            f"{field} is not supported by this server ({what}); leave it unset", field
        )
    if body.nodes not in (None, 0, 1):
        raise bad_request("nodes: this server trains on one machine; leave nodes unset", "nodes")


def _positive(value: int | float | None, field: str, default: Any, low: float = 1) -> Any:
    if value is None:
        return default
    # an int is never NaN (and math.isfinite of one past float's range raises)
    if (isinstance(value, float) and not math.isfinite(value)) or value < low:
        raise bad_request(f"{field} must be a finite number of at least {low:g}, got {str(value)[:20]}", field)  # fmt: skip
    if value > MAX_INT:
        raise bad_request(f"{field} must be at most {MAX_INT}", field)
    return value


def hyperparameters(body: SftJobBody) -> dict[str, Any]:
    """The job's training fields, checked, with their defaults."""
    out = {
        "epochs": _positive(body.epochs, "epochs", 1),
        "gradientAccumulationSteps": _positive(
            body.gradientAccumulationSteps, "gradientAccumulationSteps", 1
        ),  # fmt: skip
        "learningRateWarmupSteps": _positive(
            body.learningRateWarmupSteps, "learningRateWarmupSteps", 0, 0
        ),  # fmt: skip
        "optimizerWeightDecay": _positive(
            body.optimizerWeightDecay, "optimizerWeightDecay", 0.01, 0
        ),  # fmt: skip
        "maxContextLength": _positive(
            body.maxContextLength, "maxContextLength", DEFAULT_MAX_CONTEXT, 2
        ),  # fmt: skip
    }
    rate = body.learningRate
    if rate is not None and (not math.isfinite(rate) or rate <= 0):
        raise bad_request(f"learningRate must be a positive finite number, got {rate}", "learningRate")  # fmt: skip
    out["learningRate"] = rate if rate is not None else 1e-4
    for field in ("batchSize", "batchSizeSamples"):
        value = getattr(body, field)
        if value is not None:
            out[field] = _positive(value, field, None)
    if body.epochs is not None and body.epochs > 1000:
        raise bad_request("epochs must be at most 1000", "epochs")
    return out


def check_rank(rank: int | None) -> int:
    if rank is None:
        return 8
    if rank < 1 or rank > MAX_RANK or rank & (rank - 1):
        raise bad_request(
            f"loraRank must be a power of two from 1 to {MAX_RANK}, got {rank}", "loraRank"
        )
    return rank


def ready_dataset(request: Request, account: str, text: str, field: str) -> str:
    """The full name of one of the account's READY datasets, its rows checked (a 400 names the
    first bad line)."""
    dataset_id = own_id(account, text, "datasets", field)
    store = request.app.state.batch_store
    name = dataset_name(account, dataset_id)
    dataset = store.get_dataset(account, dataset_id)
    if dataset is None:
        raise APIError(404, f"{field}: dataset {name} not found", param=field, code="NOT_FOUND")
    if dataset.get("state") != "READY" or not store.dataset_files(account, dataset_id):
        raise bad_request(
            f"{field}: dataset {name} is not READY (state {dataset.get('state')}): upload its"
            " file first",
            field,
        )
    try:
        read_rows(store.dataset_bytes(account, dataset_id), f"{field} {name}")
    except RowError as exc:
        raise bad_request(str(exc), field) from None
    return name


def resolve_models(request: Request, account: str, body: SftJobBody, rank: int | None) -> dict:
    """baseModel or warmStartFrom (exactly one), as full names; the rank the job trains at."""
    if (body.baseModel is None) == (body.warmStartFrom is None):
        raise bad_request(
            "set exactly one of baseModel (train a new adapter) and warmStartFrom (continue"
            " training an adapter)",
            "baseModel",
        )
    manager = manager_of(request)
    if body.baseModel is not None:
        base = manager.registry_model(account, body.baseModel)
        if base is None:
            raise bad_request(
                f"baseModel {body.baseModel!r} is not a model this account can use (see GET"
                f" /v1/accounts/{account}/models)",
                "baseModel",
            )
        if base.is_adapter:
            raise bad_request(
                f"baseModel {base.name} is a LoRA adapter: continue its training with"
                " warmStartFrom instead",
                "baseModel",
            )
        if base.state != READY:
            raise bad_request(f"baseModel {base.name} is {base.state}: validate it first", "baseModel")  # fmt: skip
        return {"baseModel": base.name, "loraRank": check_rank(rank)}
    adapter = manager.registry_model(account, body.warmStartFrom)
    if adapter is None or not adapter.is_adapter or adapter.account != account:
        raise bad_request(
            f"warmStartFrom {body.warmStartFrom!r} is not a LoRA adapter (HF_PEFT_ADDON) of"
            f" account {account}",
            "warmStartFrom",
        )
    if adapter.state != READY:
        raise bad_request(f"warmStartFrom {adapter.name} is {adapter.state}", "warmStartFrom")
    if manager.catalog.get(adapter.base_model) is None:
        raise bad_request(
            f"warmStartFrom {adapter.name}: its base model {adapter.base_model} is not here",
            "warmStartFrom",
        )
    try:
        config = json.loads((Path(adapter.source) / "adapter_config.json").read_text())
        adapter_rank = check_adapter_config(config)[0]
    except (OSError, ValueError) as exc:  # AdapterError is a ValueError
        raise bad_request(f"warmStartFrom {adapter.name}: {exc}", "warmStartFrom") from None
    if rank is not None and rank != adapter_rank:
        raise bad_request(
            f"loraRank {rank}: warmStartFrom {adapter.name} has rank {adapter_rank}; leave"
            " loraRank unset or the same",
            "loraRank",
        )
    return {"warmStartFrom": adapter.name, "loraRank": adapter_rank}


def output_model(request: Request, account: str, text: str) -> str:
    model_id = own_id(account, text, "models", "outputModel")
    name = f"accounts/{account}/models/{model_id}"
    claimed = any(
        job.get("outputModel") == name and job["state"] not in FINAL
        for job in store_of(request).list(account)
    )
    if manager_of(request).catalog.get(name) is not None or claimed:
        raise APIError(
            409,
            f"outputModel {name} already exists (or a job not ended will create it): name another",
            param="outputModel",
            code="ALREADY_EXISTS",
        )
    return name


@router.post(
    "/accounts/{account}/supervisedFineTuningJobs/{job_id}:cancel",
    summary="Cancel a supervised fine-tuning job",
)
async def cancel_job(job_id: str, request: Request, account: str = Account) -> dict:
    body = get_or_404(request, account, job_id)
    stop(request, account, job_id, body, "cancelled by the user")
    return store_of(request).get(account, job_id) or body


def stop(request: Request, account: str, job_id: str, body: dict, why: str) -> None:
    if body["state"] in FINAL:
        return
    body["state"] = CANCELLED
    body["status"] = {"code": "CANCELLED", "message": why}
    body["completedTime"] = now_text()
    store_of(request).save(account, job_id, body)
    runner_of(request).stop_job(account, job_id)


@router.post(
    "/accounts/{account}/supervisedFineTuningJobs/{job_id}:resume",
    summary="Run a cancelled or failed supervised fine-tuning job again",
)
async def resume_job(job_id: str, request: Request, account: str = Account) -> dict:
    body = get_or_404(request, account, job_id)
    if body["state"] not in (CANCELLED, FAILED):
        raise bad_request(
            f"job {body['name']} is {body['state']}: only a CANCELLED or FAILED job resumes",
            "name",
        )
    output_model(request, account, body["outputModel"])  # 409 once it exists
    body["state"] = PENDING
    body["status"] = {"code": "OK", "message": ""}
    body["jobProgress"] = {"percent": 0, "epoch": 0}
    body.pop("completedTime", None)
    store_of(request).save(account, job_id, body)
    runner_of(request).notify()
    return store_of(request).get(account, job_id) or body


@router.post(
    "/accounts/{account}/supervisedFineTuningJobs",
    summary="Create a supervised fine-tuning job",
    openapi_extra=body_doc(SftJobBody),
)
async def create_job(
    request: Request,
    account: str = Account,
    job_id: str | None = Query(default=None, alias="supervisedFineTuningJobId"),
) -> dict:
    body = await read_json(request, SftJobBody)
    check_unsupported(body)
    if job_id is None:
        job_id = "sftj-" + uuid.uuid4().hex[:12]
    elif not is_valid_id(job_id):
        raise bad_request(
            f"supervisedFineTuningJobId {job_id!r} is not a valid id: 1-63 characters of a-z,"
            " 0-9 and '-', starting with a letter",
            "supervisedFineTuningJobId",
        )
    if not body.dataset:
        raise bad_request("dataset is required: the dataset of training rows", "dataset")
    fields = hyperparameters(body)
    fields.update(resolve_models(request, account, body, body.loraRank))
    if store_of(request).get(account, job_id) is not None:
        raise job_exists(account, job_id)
    fields["outputModel"] = output_model(request, account, body.outputModel or job_id)
    fields["dataset"] = await asyncio.to_thread(ready_dataset, request, account, body.dataset, "dataset")  # fmt: skip
    if body.evaluationDataset:
        fields["evaluationDataset"] = await asyncio.to_thread(
            ready_dataset, request, account, body.evaluationDataset, "evaluationDataset"
        )
    if body.earlyStop and not (body.evaluationDataset or body.evalAutoCarveout):
        raise bad_request(
            "earlyStop needs an evaluation set: set evaluationDataset or evalAutoCarveout",
            "earlyStop",
        )
    for flag in ("evalAutoCarveout", "earlyStop"):
        if getattr(body, flag):
            fields[flag] = True
    now = now_text()
    job = {
        "name": sft_job_name(account, job_id),
        "displayName": body.displayName or job_id,
        **fields,
        "state": PENDING,
        "status": {"code": "OK", "message": ""},
        "jobProgress": {"percent": 0, "epoch": 0},
        "createTime": now,
        "updateTime": now,
        "createdBy": created_by(request),
    }
    if not store_of(request).insert(account, job_id, job):
        raise job_exists(account, job_id)
    runner_of(request).notify()
    return job


def job_exists(account: str, job_id: str) -> APIError:
    return APIError(
        409,
        f"Supervised fine-tuning job {sft_job_name(account, job_id)} already exists",
        type="error",
        code="ALREADY_EXISTS",
    )


@router.get(
    "/accounts/{account}/supervisedFineTuningJobs", summary="List supervised fine-tuning jobs"
)
async def list_jobs(request: Request, account: str = Account, query: ListParams = ListQuery) -> dict:  # fmt: skip
    jobs = await asyncio.to_thread(store_of(request).list, account)
    fields = JOB_FIELDS | {f for job in jobs for f in job}  # oldest first
    return list_page(jobs, "supervisedFineTuningJobs", query, fields)


@router.get(
    "/accounts/{account}/supervisedFineTuningJobs/{job_id}",
    summary="Get a supervised fine-tuning job",
)
async def get_job(
    job_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    return read_masked(get_or_404(request, account, job_id), read_mask, JOB_FIELDS)


@router.delete(
    "/accounts/{account}/supervisedFineTuningJobs/{job_id}",
    summary="Delete a supervised fine-tuning job",
)
async def delete_job(job_id: str, request: Request, account: str = Account) -> dict:
    body = get_or_404(request, account, job_id)
    stop(request, account, job_id, body, "deleted by the user")
    store_of(request).delete(account, job_id)
    return {}


def install_sft(app: FastAPI, state: Any, prefixes: tuple[str, ...]) -> SftRunner:
    """The fine-tuning job routes under each of `prefixes`, and the runner (the app's lifespan
    starts and stops it). After install_batch (the datasets) and install_deployments (the
    catalog and the model files)."""
    import tempfile

    settings = state.settings
    if settings.data_dir:
        folder = Path(settings.data_dir) / "sft-jobs"
    else:
        scratch = tempfile.TemporaryDirectory(prefix="girandole-sft-")
        app.state.sft_scratch = scratch
        folder = Path(scratch.name)
    store = SftStore(state.ops.db)

    def template_of(base: str) -> str | None:
        # --chat-template is the server's own model's (as the chat route applies it)
        return state.chat_template if base == state.served.name else None

    runner = SftRunner(
        store, app.state.deployments.catalog, app.state.model_files, app.state.batch_store,
        folder, template_of,
    )  # fmt: skip
    app.state.sft_store, app.state.sft = store, runner
    for prefix in prefixes:
        app.include_router(router, prefix=prefix, include_in_schema=prefix.startswith("/v1"))
    return runner
