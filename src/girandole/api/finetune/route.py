"""Fireworks' supervised fine-tuning jobs, as the fireworks-ai SDK's
`client.supervised_fine_tuning_jobs` calls them: POST
/v1/accounts/{a}/supervisedFineTuningJobs?supervisedFineTuningJobId= creates one; get, list,
delete, :cancel and :resume are every kind's (jobs.py). Also under /inference/v1. Creating checks
the fields, the dataset's rows (a 400 names the first bad line) and the models; the job then
waits (JOB_STATE_PENDING) for the runner (girandole.finetune.job_runner), which trains a LoRA
adapter in a child process. Fields of Fireworks' cloud this server has no counterpart for are a
400 naming them. The checks of the training fields here serve DPO and reinforcement fine-tuning
jobs too (dpo_route.py, rft_route.py).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict

from girandole.api.datasets.route import own_id
from girandole.api.deployments.route import Account, manager_of, read_json
from girandole.api.finetune.jobs import (
    insert_job,
    job_exists,
    job_routes,
    new_job_id,
    output_model,
    stores_of,
)  # fmt: skip
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.openapi import body_doc
from girandole.batch.store import dataset_name
from girandole.finetune.data import RowError, read_rows
from girandole.finetune.job_runner import JobRunner
from girandole.finetune.store import DPO, RFT, RLOR, SFT, JobStore
from girandole.model.lora import MAX_RANK, check_adapter_config
from girandole.registry.models import READY

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


class TrainingConfigBody(BaseModel):
    """Fireworks' TrainingConfig: an SFT job's training fields, a DPO job's trainingConfig."""

    model_config = STRICT

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
    # Fireworks' cloud (UNSUPPORTED)
    region: str | None = None
    samplerCheckpointSaveIntervalSteps: int | None = None
    jinjaTemplate: str | None = None


class SftJobBody(TrainingConfigBody):
    dataset: str | None = None
    displayName: str | None = None
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
    useReservation: bool | None = None
    reservationTarget: str | None = None
    usePurpose: str | None = None
    metricsFileSignedUrl: str | None = None
    rendererHuggingFaceRepoId: str | None = None


router = APIRouter(tags=["fine-tuning"])


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


def ready_dataset(
    request: Request,
    account: str,
    text: str,
    field: str,
    reader: Callable[[bytes, str], Any] = read_rows,
) -> str:
    """The full name of one of the account's READY datasets, its rows checked by `reader` (a 400
    names the first bad line)."""
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
        reader(store.dataset_bytes(account, dataset_id), f"{field} {name}")
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


async def training_job_fields(
    request: Request,
    account: str,
    store: JobStore,
    body: SftJobBody,
    job_id: str | None,
    reader: Callable[[bytes, str], Any] = read_rows,
) -> tuple[str, dict[str, Any]]:
    """(the job's id, its checked training fields with their defaults, and its dataset): what
    every kind of job's create checks. `body`: the training fields (a DPO job's trainingConfig
    and dataset, read as an SFT body's)."""
    check_unsupported(body)
    job_id = new_job_id(store.kind, job_id)
    if not body.dataset:
        raise bad_request("dataset is required: the dataset of training rows", "dataset")
    fields = hyperparameters(body)
    fields.update(resolve_models(request, account, body, body.loraRank))
    if store.get(account, job_id) is not None:
        raise job_exists(store, account, job_id)
    fields["outputModel"] = output_model(request, account, body.outputModel or job_id)
    fields["dataset"] = await asyncio.to_thread(ready_dataset, request, account, body.dataset, "dataset", reader)  # fmt: skip
    return job_id, fields


async def config_job_fields(
    request: Request,
    account: str,
    store: JobStore,
    dataset: str | None,
    training: TrainingConfigBody | None,
    cloud: dict[str, Any],
    job_id: str | None,
    reader: Callable[[bytes, str], Any],
) -> tuple[str, dict[str, Any]]:
    """training_job_fields of a job whose training fields are in its trainingConfig (DPO,
    reinforcement fine-tuning): a 400 names them `trainingConfig.X`. `cloud`: its fields of
    UNSUPPORTED that are at its top level."""
    training = training or TrainingConfigBody()
    flat = SftJobBody.model_construct(
        dataset=dataset, **training.model_dump(exclude_none=True), **cloud
    )
    try:
        return await training_job_fields(request, account, store, flat, job_id, reader)
    except APIError as exc:
        if exc.param in TrainingConfigBody.model_fields:
            exc.param = f"trainingConfig.{exc.param}"
        raise


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
    store = stores_of(request)[SFT.collection]
    job_id, fields = await training_job_fields(request, account, store, body, job_id)
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
    return insert_job(request, store, account, job_id, {"displayName": body.displayName or job_id, **fields})  # fmt: skip


job_routes(router, SFT, set(SftJobBody.model_fields))


def install_finetune(app: FastAPI, state: Any, prefixes: tuple[str, ...]) -> JobRunner:
    """The fine-tuning job routes (supervised, DPO, reinforcement, RLOR trainer) under each of `prefixes`,
    and their one runner (the app's lifespan starts and stops it). After install_batch (the
    datasets) and install_deployments (the catalog and the model files)."""
    import tempfile

    from girandole.api.finetune.dpo_route import router as dpo_router
    from girandole.api.finetune.rft_route import router as rft_router
    from girandole.api.finetune.rlor_route import router as rlor_router

    settings = state.settings
    if settings.data_dir:
        folder = Path(settings.data_dir)
    else:
        scratch = tempfile.TemporaryDirectory(prefix="girandole-sft-")
        app.state.sft_scratch = scratch
        folder = Path(scratch.name)
    stores = {kind.collection: JobStore(state.ops.db, kind) for kind in (SFT, DPO, RFT, RLOR)}

    def template_of(base: str) -> str | None:
        # --chat-template is the server's own model's (as the chat route applies it)
        return state.chat_template if base == state.served.name else None

    def evaluator_of(account: str, name: str) -> dict[str, Any]:
        """A reinforcement fine-tuning job's evaluator when it starts (install_evaluators sets
        the store, after this)."""
        from girandole.evaluators.build import ACTIVE
        from girandole.evaluators.criteria import criteria_of, to_json
        from girandole.evaluators.secrets import secrets_env
        from girandole.evaluators.store import EVALUATORS

        if not settings.evaluator_code:  # a job created before a restart with the switch
            raise ValueError("this server runs no evaluator code (--no-evaluator-code)")
        store = app.state.evaluator_stores[EVALUATORS.collection]
        found = store.get(account, name.rsplit("/", 1)[-1])
        if found is None or found.get("state") != ACTIVE:
            why = "was deleted" if found is None else f"is {found.get('state')}, not ACTIVE"
            raise ValueError(f"evaluator {name} {why}: the job cannot score its rollouts")
        from girandole.api.evaluators import evaluator_limits

        limits = evaluator_limits(settings).to_json()  # the worker's child, as the server's
        return {"criteria": to_json(criteria_of(found)), "env": secrets_env(state, account), "limits": limits}  # fmt: skip

    runner = JobRunner(
        list(stores.values()), app.state.deployments.catalog, app.state.model_files,
        app.state.batch_store, folder, template_of, evaluator_of, settings.max_rlor_trainers,
    )  # fmt: skip
    app.state.finetune_stores, app.state.sft = stores, runner
    for prefix in prefixes:
        for routes in (router, dpo_router, rft_router, rlor_router):
            app.include_router(routes, prefix=prefix, include_in_schema=prefix.startswith("/v1"))
    return runner
