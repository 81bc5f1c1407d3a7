"""Fireworks' DPO jobs, as the fireworks-ai SDK's `client.dpo_jobs` calls them: POST
/v1/accounts/{a}/dpoJobs?dpoJobId= creates one; get, list, delete, :cancel and :resume are every
kind's (jobs.py). Also under /inference/v1.

The body is {dataset, displayName, trainingConfig: {baseModel | warmStartFrom, epochs, ...},
lossConfig: {method, dpo: {beta}, klBeta}}: trainingConfig is checked as an SFT job's fields are
(route.py, whose table of Fireworks' cloud fields answers here too), the dataset's rows as
preference rows (girandole.finetune.preference). The loss is DPO (finetune/dpo.py) or ORPO
(finetune/orpo.py); the rollout methods (GRPO, DAPO, GSPO_TOKEN) are a 400 pointing to
reinforcement fine-tuning jobs (rft_route.py). The job runs on the SFT jobs' runner.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from girandole.api.deployments.route import Account, read_json
from girandole.api.finetune.jobs import insert_job, job_routes, stores_of
from girandole.api.finetune.route import STRICT, TrainingConfigBody, config_job_fields
from girandole.api.http.errors import bad_request
from girandole.api.http.openapi import body_doc
from girandole.finetune.preference import read_pairs
from girandole.finetune.store import DPO

DEFAULT_BETA = 0.1
METHODS_REFUSED = {
    method: f"{method} needs rollouts and rewards, not preference pairs: create a reinforcement"
    " fine-tuning job (reinforcementFineTuningJobs) with an evaluator"
    for method in ("GRPO", "DAPO", "GSPO_TOKEN")
}


class DpoConfigBody(BaseModel):
    model_config = STRICT

    beta: float | None = None
    # how Fireworks' trainer batches its reference forwards: this one runs each once
    refCacheConcurrency: int | None = None
    refCacheBatchSize: int | None = None


class LossConfigBody(BaseModel):
    model_config = STRICT

    method: str | None = None
    dpo: DpoConfigBody | None = None
    klBeta: float | None = None


class DpoJobBody(BaseModel):
    model_config = STRICT

    dataset: str | None = None
    displayName: str | None = None
    trainingConfig: TrainingConfigBody | None = None
    lossConfig: LossConfigBody | None = None
    # Fireworks' cloud (route.UNSUPPORTED)
    awsS3Config: dict | None = None
    azureBlobStorageConfig: dict | None = None
    wandbConfig: dict | None = None
    rendererHuggingFaceRepoId: str | None = None
    reservationTarget: str | None = None
    useReservation: bool | None = None


router = APIRouter(tags=["fine-tuning"])


def loss_config(loss: LossConfigBody | None) -> dict[str, Any]:
    """The stored lossConfig: the method (DPO when unset) and the beta it trains with (ORPO's
    weight of its odds ratio term)."""
    loss = loss or LossConfigBody()
    method = loss.method or "METHOD_UNSPECIFIED"
    if method in METHODS_REFUSED:
        raise bad_request(f"lossConfig.method {method}: {METHODS_REFUSED[method]}", "lossConfig.method")  # fmt: skip
    if method not in ("DPO", "ORPO", "METHOD_UNSPECIFIED"):
        raise bad_request(f"lossConfig.method must be DPO or ORPO, got {method!r}", "lossConfig.method")  # fmt: skip
    dpo = loss.dpo or DpoConfigBody()
    for field in ("refCacheConcurrency", "refCacheBatchSize"):
        value = getattr(dpo, field)
        if value is not None and value < 0:
            raise bad_request(f"lossConfig.dpo.{field} must not be negative", f"lossConfig.dpo.{field}")  # fmt: skip
    # DPO's beta is its KL coefficient: klBeta says the same when dpo.beta is unset
    beta, param = dpo.beta, "lossConfig.dpo.beta"
    if beta is None and loss.klBeta is not None:
        beta, param = loss.klBeta, "lossConfig.klBeta"
    elif beta is not None and loss.klBeta is not None and loss.klBeta != beta:
        raise bad_request(
            f"lossConfig.klBeta {loss.klBeta} and lossConfig.dpo.beta {beta} disagree: DPO's beta"
            " is its KL coefficient; set one",
            "lossConfig.klBeta",
        )
    if beta is None:
        beta = DEFAULT_BETA
    elif not (math.isfinite(beta) and 0 < beta < 0.5):
        raise bad_request(f"{param} must be more than 0 and less than 0.5 (as Fireworks'), got {beta}", param)  # fmt: skip
    method = "DPO" if method == "METHOD_UNSPECIFIED" else method
    return {"method": method, "dpo": {**dpo.model_dump(exclude_none=True), "beta": beta}}


@router.post(
    "/accounts/{account}/dpoJobs", summary="Create a DPO job", openapi_extra=body_doc(DpoJobBody)
)
async def create_dpo_job(
    request: Request,
    account: str = Account,
    job_id: str | None = Query(default=None, alias="dpoJobId"),
) -> dict:
    body = await read_json(request, DpoJobBody)
    loss = loss_config(body.lossConfig)
    store = stores_of(request)[DPO.collection]
    # the training fields are checked as an SFT job's: a 400 names them under trainingConfig
    cloud = body.model_dump(exclude_none=True, exclude={"dataset", "displayName", "trainingConfig", "lossConfig"})  # fmt: skip
    job_id, fields = await config_job_fields(request, account, store, body.dataset, body.trainingConfig, cloud, job_id, read_pairs)  # fmt: skip
    dataset = fields.pop("dataset")
    job = {"displayName": body.displayName or job_id, "dataset": dataset, "trainingConfig": fields, "lossConfig": loss}  # fmt: skip
    return insert_job(request, store, account, job_id, job)


job_routes(router, DPO, set(DpoJobBody.model_fields))
