"""Fireworks' RLOR trainer jobs, as the fireworks-ai SDK's `client.reinforcement_fine_tuning_steps`
calls them: the trainer half of reinforcement fine-tuning, driven by the user's own loop (they
sample rollouts through this server's inference API and score them themselves).

    POST /v1/accounts/{a}/rlorTrainerJobs?rlorTrainerJobId=       create
    POST /v1/accounts/{a}/rlorTrainerJobs/{j}:executeTrainStep    {dataset, outputModel}: one step
    get, list, delete, :cancel, :resume, :getMetricsFileEndpoint  every kind's (jobs.py)

Also under /inference/v1. The body: {displayName, trainingConfig: {baseModel | warmStartFrom,
learningRate, loraRank, maxContextLength, epochs, ...} (checked as an SFT job's: route.py),
lossConfig: {method GRPO | DAPO, klBeta}, keepAlive, forwardOnly, dataset, hotLoadDeploymentId,
rolloutDeploymentName}.

- keepAlive true: no dataset; the job loads its policy (CREATING), then is RUNNING until cancelled
  or deleted (finetune/keep_alive.py). Each :executeTrainStep reads a dataset of scored rollouts
  (finetune/rlor.py: its rows checked first, a 400 naming the line and field), runs one optimizer
  step over all of it, and writes the policy as `outputModel` (a READY LoRA addon of the base
  model, served at once by its name); with a hot-load deployment, the new adapter is loaded onto
  it and the job's previous step's adapter unloaded from it. The call answers when all that is
  done, with the job (its jobProgress: the step's loss, meanReward, kl, rollouts, groups,
  skippedGroups; latestOutputModel: the step's model; hotLoadStatus: {code, message}, where a
  hot load that failed, the deployment deleted meanwhile say, is a code other than OK: the step
  stands, its model written, to load onto a deployment as any model). One step at a time a job: another while one
  runs is a 409 ABORTED. At most --max-rlor-trainers keep-alive jobs run at once (a 429 past
  that). :resume of a job that wrote a step goes on from its last step (its adapter, AdamW state
  and step count), not from the base.
- keepAlive false: `dataset` (scored rollouts) is required; the job runs on the fine-tuning
  runner as other jobs do, one step over the whole dataset per epoch (or batchSizeSamples groups
  a step), and COMPLETES with trainingConfig.outputModel.
- forwardOnly: the steps compute the loss and KL only: no update, and no model is written (a
  step's outputModel is not created; a job's COMPLETES without one).
- serviceMode (Fireworks' tinker-style trainer endpoint, full-parameter) is a 400, as are the
  fields of Fireworks' cloud (route.UNSUPPORTED, evaluation sets, rewardWeights).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from girandole.api.deployments.route import Account, manager_of, read_json
from girandole.api.finetune.jobs import (
    get_or_404,
    insert_job,
    job_exists,
    job_routes,
    new_job_id,
    output_model,
    runner_of,
    stores_of,
)  # fmt: skip
from girandole.api.finetune.rft_route import RftLossConfigBody, loss_config
from girandole.api.finetune.route import (
    STRICT,
    SftJobBody,
    TrainingConfigBody,
    check_unsupported,
    hyperparameters,
    ready_dataset,
    resolve_models,
)  # fmt: skip
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.openapi import body_doc
from girandole.batch.store import CREATING
from girandole.finetune.keep_alive import StepError, Trainer, TrainerGone
from girandole.finetune.rlor import read_rollouts
from girandole.finetune.store import FAILED, RLOR, RUNNING, JobStore, training_fields
from girandole.registry.deployments import DeploymentError
from girandole.registry.naming import deployment_name, is_valid_id, parse_deployment_header

# Fields of Fireworks' cloud an RLOR job has here no counterpart for: a set value is a 400
CLOUD = {
    "evaluationDataset": "evaluating the policy on held-out rollouts",
    "evalAutoCarveout": "evaluating the policy on held-out rollouts",
    "rewardWeights": "weighing several reward metrics: each rollout row carries its one reward",
}


class RlorJobBody(BaseModel):
    model_config = STRICT

    displayName: str | None = None
    dataset: str | None = None
    trainingConfig: TrainingConfigBody | None = None
    lossConfig: RftLossConfigBody | None = None
    keepAlive: bool | None = None
    forwardOnly: bool | None = None
    hotLoadDeploymentId: str | None = None
    rolloutDeploymentName: str | None = None
    serviceMode: bool | None = None
    nodeCount: int | None = None
    # Fireworks' cloud (CLOUD, route.UNSUPPORTED)
    evaluationDataset: str | None = None
    evalAutoCarveout: bool | None = None
    rewardWeights: list[str] | None = None
    awsS3Config: dict | None = None
    azureBlobStorageConfig: dict | None = None
    wandbConfig: dict | None = None
    usePurpose: str | None = None


class ExecuteStepBody(BaseModel):
    model_config = STRICT

    dataset: str | None = None
    outputModel: str | None = None


log = logging.getLogger(__name__)
router = APIRouter(tags=["fine-tuning"])


def check_modes(body: RlorJobBody) -> None:
    """400s for what this server's trainers do not do."""
    if body.serviceMode:
        rank = (body.trainingConfig or TrainingConfigBody()).loraRank
        why = (
            f"service-mode trainers train every parameter (trainingConfig.loraRank must be 0, got {rank})"  # fmt: skip
            if rank
            else "a service-mode trainer (Fireworks' training endpoint for full-parameter tuning) is not served here"  # fmt: skip
        )
        raise bad_request(
            f"serviceMode: {why}; this server trains LoRA adapters: leave serviceMode unset and"
            " drive the trainer with keepAlive and :executeTrainStep",
            "serviceMode",
        )
    for field, what in CLOUD.items():
        if getattr(body, field) not in (None, False, []):
            raise bad_request(f"{field} is not supported by this server ({what}); leave it unset", field)  # fmt: skip
    if body.nodeCount not in (None, 0, 1):
        raise bad_request("nodeCount: this server trains on one machine; leave nodeCount unset", "nodeCount")  # fmt: skip


def hot_load_deployment(request: Request, account: str, body: RlorJobBody, base: str) -> str | None:
    """The full name of the deployment a keep-alive job's steps load their adapter onto
    (hotLoadDeploymentId, else rolloutDeploymentName), serving the job's base model."""
    text = body.hotLoadDeploymentId or body.rolloutDeploymentName
    field = "hotLoadDeploymentId" if body.hotLoadDeploymentId else "rolloutDeploymentName"
    if not text:
        return None
    if not body.keepAlive:
        raise bad_request(f"{field} is only valid for a keep-alive job (keepAlive true): a job over a dataset loads nothing", field)  # fmt: skip
    name = parse_deployment_header(text) or (deployment_name(account, text) if is_valid_id(text) else None)  # fmt: skip
    if name is None or name.split("/")[1] != account:
        raise bad_request(f"{field} {text!r} is not a deployment of account {account}", field)
    lora = request.app.state.lora
    record = manager_of(request).find(name)
    if name != lora.own_deployment and record is None:
        raise APIError(404, f"{field}: deployment {name} not found", param=field, code="NOT_FOUND")
    served = lora.own_model if name == lora.own_deployment else record.base_model
    if served != base:
        raise bad_request(f"{field}: deployment {name} serves {served}, not the job's base model {base}", field)  # fmt: skip
    return name


async def rlor_fields(
    request: Request, account: str, store: JobStore, body: RlorJobBody, job_id: str | None
) -> tuple[str, dict[str, Any]]:
    """(the job's id, its stored fields besides the state): route.training_job_fields' checks,
    a 400 naming trainingConfig.X for a training field."""
    training = body.trainingConfig or TrainingConfigBody()
    flat = SftJobBody.model_construct(
        **training.model_dump(exclude_none=True),
        **body.model_dump(exclude_none=True, include={"awsS3Config", "azureBlobStorageConfig", "wandbConfig", "usePurpose"}),
    )  # fmt: skip
    try:
        check_unsupported(flat)
        job_id = new_job_id(store.kind, job_id)
        fields = hyperparameters(flat)
        fields.update(resolve_models(request, account, flat, flat.loraRank))
        if store.get(account, job_id) is not None:
            raise job_exists(store, account, job_id)
        if body.keepAlive and training.outputModel:
            raise bad_request(
                "outputModel: a keep-alive job writes each :executeTrainStep's outputModel;"
                " leave trainingConfig.outputModel unset",
                "outputModel",
            )
        if not body.keepAlive and not body.forwardOnly:
            fields["outputModel"] = output_model(request, account, training.outputModel or job_id)
    except APIError as exc:
        if exc.param in TrainingConfigBody.model_fields:
            exc.param = f"trainingConfig.{exc.param}"
        raise
    return job_id, fields


@router.post(
    "/accounts/{account}/rlorTrainerJobs",
    summary="Create an RLOR trainer job",
    openapi_extra=body_doc(RlorJobBody),
)
async def create_rlor_job(
    request: Request,
    account: str = Account,
    job_id: str | None = Query(default=None, alias="rlorTrainerJobId"),
) -> dict:
    body = await read_json(request, RlorJobBody)
    check_modes(body)
    loss = loss_config(body.lossConfig)
    store = stores_of(request)[RLOR.collection]
    job_id, fields = await rlor_fields(request, account, store, body, job_id)
    base = fields.get("baseModel") or manager_of(request).catalog.get(fields["warmStartFrom"]).base_model  # fmt: skip
    job: dict[str, Any] = {
        "displayName": body.displayName or job_id,
        "keepAlive": bool(body.keepAlive),
        "forwardOnly": bool(body.forwardOnly),
    }
    if body.keepAlive:
        if body.dataset:
            raise bad_request(
                "dataset: a keep-alive job trains on each :executeTrainStep's dataset; leave"
                " dataset unset (or set keepAlive false to train over this one)",
                "dataset",
            )
    elif not body.dataset:
        raise bad_request(
            "dataset is required: the scored rollouts a job that is not keep-alive trains on",
            "dataset",
        )
    else:
        job["dataset"] = await asyncio.to_thread(ready_dataset, request, account, body.dataset, "dataset", read_rollouts)  # fmt: skip
    deployment = hot_load_deployment(request, account, body, base)
    if deployment is not None:
        job["hotLoadDeploymentId"] = deployment
    if body.rolloutDeploymentName:
        job["rolloutDeploymentName"] = body.rolloutDeploymentName
    job.update({"trainingConfig": fields, "lossConfig": loss, "nodeCount": 1})
    trainers = runner_of(request).keep_alive
    if body.keepAlive and trainers.count() >= trainers.max_trainers:
        raise APIError(
            429,
            f"{trainers.count()} keep-alive trainers already run on this server, the most it"
            " holds at once (--max-rlor-trainers): cancel one first",
            type="error",
            code="RESOURCE_EXHAUSTED",
        )
    return insert_job(request, store, account, job_id, job)


@router.post(
    "/accounts/{account}/rlorTrainerJobs/{job_id}:executeTrainStep",
    summary="Run one training step of a keep-alive RLOR trainer job",
    openapi_extra=body_doc(ExecuteStepBody),
)
async def execute_train_step(job_id: str, request: Request, account: str = Account) -> dict:
    store = stores_of(request)[RLOR.collection]
    job = get_or_404(store, account, job_id)
    if not job.get("keepAlive"):
        raise APIError(
            400,
            f"{job['name']} is not keep-alive: it trains over its dataset on its own; steps are"
            " for a job created with keepAlive true",
            code="FAILED_PRECONDITION",
        )
    runner = runner_of(request)
    trainer = runner.keep_alive.get(store, account, job_id)
    if job["state"] != RUNNING or trainer is None:
        loading = job["state"] == CREATING
        raise APIError(
            400,
            f"{job['name']} is {job['state']}: a step runs on a RUNNING job"
            + (" (its policy is loading: wait for RUNNING)" if loading else ""),
            code="FAILED_PRECONDITION",
        )
    body = await read_json(request, ExecuteStepBody)
    if not body.dataset:
        raise bad_request("dataset is required: the scored rollouts of this step", "dataset")
    if not body.outputModel:
        raise bad_request("outputModel is required: the model this step writes", "outputModel")
    forward_only = job.get("forwardOnly", False)
    output = None if forward_only else output_model(request, account, body.outputModel)
    name = await asyncio.to_thread(ready_dataset, request, account, body.dataset, "dataset", read_rollouts)  # fmt: skip
    if not trainer.claim():
        raise APIError(
            409,
            f"{job['name']} is running a step: steps of a job run one at a time, send the next"
            " when this one answers",
            type="error",
            code="ABORTED",
        )
    folder = trainer.work / "step-adapter"
    try:
        data = await asyncio.to_thread(request.app.state.batch_store.dataset_bytes, account, name.rsplit("/", 1)[-1])  # fmt: skip
    except BaseException:
        trainer.busy.release()
        raise
    try:
        done = await asyncio.to_thread(trainer.step, data, None if output is None else folder)
    except StepError as exc:
        raise bad_request(f"dataset {name}: {exc}", "dataset") from None
    except TrainerGone:
        now = store.get(account, job_id)
        if now is None or now["state"] != RUNNING:
            raise APIError(
                409,
                f"{job['name']} ended while the step ran (cancelled or deleted)",
                type="error",
                code="ABORTED",
            ) from None
        # its process died (killed for memory, a crash): the job cannot go on
        tail = (trainer.work / "train.log").read_text(errors="replace")[-500:]
        runner.keep_alive.stop(store, account, job_id)
        failed = {"code": "INTERNAL", "message": f"the trainer exited during a step: {tail}"}
        runner.finish(store, account, job_id, FAILED, failed)
        raise APIError(500, f"{job['name']} failed: {failed['message']}", type="error", code="INTERNAL") from None  # fmt: skip
    runner.progress(store, account, job_id, done)  # jobProgress, and a line of the metrics file
    message, fields = f"step {done['step']} ran", {}
    if output is not None:
        fields = await materialize(request, account, job, trainer, output, folder)
        message += f"; outputModel {output} written"
        hot_load = fields.get("hotLoadStatus")
        if hot_load is not None:
            message += "; " + hot_load["message"]
    now = store.get(account, job_id) or job
    if now["state"] == RUNNING:
        now.update(fields)
        now["status"] = {"code": "OK", "message": message}
        store.save(account, job_id, now, when=RUNNING)
    return now


async def materialize(
    request: Request, account: str, job: dict[str, Any], trainer: Trainer, output: str, folder: Path
) -> dict[str, Any]:
    """The step's adapter `folder` as model `output`, loaded onto the job's hot-load
    deployment in place of its previous step's; the job's fields that say so: latestOutputModel
    (where a resume goes on from), and with a hot-load deployment hotLoadStatus ({code,
    message}) and hotLoadedDeployedModel (the DeployedModel serving the adapter loaded last,
    which a resumed job's next step replaces). A failed hot load fails not the step: its model is written (READY, loadable
    as any model), the deployment keeps the adapter it had, and hotLoadStatus says why (a code
    other than OK)."""
    runner = runner_of(request)
    fields = {**training_fields(job), "outputModel": output}
    try:
        await asyncio.to_thread(runner.register, account, fields, folder)
    except ValueError as exc:  # another job wrote it meanwhile
        raise APIError(409, str(exc), param="outputModel", code="ALREADY_EXISTS") from None
    written: dict[str, Any] = {"latestOutputModel": output}
    deployment = job.get("hotLoadDeploymentId")
    if deployment is None:
        return written
    lora = request.app.state.lora
    try:
        loaded = await lora.load(account, {"model": output, "deployment": deployment, "default": True})  # fmt: skip
    except (APIError, DeploymentError) as exc:  # the deployment deleted meanwhile, ...
        why = {"code": exc.code or "FAILED_PRECONDITION", "message": f"not loaded onto {deployment}: {exc.message}"}  # fmt: skip
        return {**written, "hotLoadStatus": why}
    except Exception as exc:  # noqa: BLE001 - the step's model is written: the step stands
        log.exception("hot-loading %s onto %s failed", output, deployment)
        why = {"code": "INTERNAL", "message": f"not loaded onto {deployment}: {exc}"}
        return {**written, "hotLoadStatus": why}
    previous, trainer.hot_loaded = trainer.hot_loaded, loaded["name"].rsplit("/", 1)[-1]
    if previous is not None:
        try:
            lora.unload(account, previous)
        except DeploymentError:  # the user unloaded it already
            pass
    ok = {"code": "OK", "message": f"loaded onto {deployment}"}
    return {**written, "hotLoadStatus": ok, "hotLoadedDeployedModel": loaded["name"]}


job_routes(router, RLOR, set(RlorJobBody.model_fields))
