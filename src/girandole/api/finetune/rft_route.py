"""Fireworks' reinforcement fine-tuning jobs, as the fireworks-ai SDK's
`client.reinforcement_fine_tuning_jobs` calls them: POST
/v1/accounts/{a}/reinforcementFineTuningJobs?reinforcementFineTuningJobId= creates one; get,
list, delete, :cancel and :resume are every kind's (jobs.py). Also under /inference/v1.

The body is {dataset, evaluator, displayName, trainingConfig: {baseModel | warmStartFrom, ...},
inferenceParameters: {maxOutputTokens, temperature, topP, topK, responseCandidatesCount},
lossConfig: {method, klBeta}}: trainingConfig is checked as an SFT job's fields are (route.py,
whose table of Fireworks' cloud fields answers here too), the dataset's rows as prompt rows
(girandole.finetune.prompts), the evaluator is one of the account's ACTIVE evaluators
(girandole.api.evaluators; --no-evaluator-code refuses the jobs too: 403). The loss is GRPO or
DAPO (finetune/grpo.py); DPO and ORPO are a 400 pointing to dpoJobs. The job runs on the SFT
jobs' runner, its rollouts and the evaluator in its training process.

chunkSize, maxConcurrentRollouts and maxConcurrentEvaluations are accepted and kept: here they
change nothing (the dataset is read whole; a prompt's candidates are decoded together in one
batch, then scored one after another by one evaluator process).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from girandole.api.datasets.route import own_id
from girandole.api.deployments.route import Account, read_json
from girandole.api.finetune.jobs import insert_job, job_routes, stores_of
from girandole.api.finetune.route import (
    MAX_INT,
    STRICT,
    TrainingConfigBody,
    config_job_fields,
    ready_dataset,
)
from girandole.api.http.errors import bad_request
from girandole.api.http.openapi import body_doc
from girandole.finetune.prompts import read_prompts
from girandole.finetune.rollout import SamplingConfig
from girandole.finetune.store import RFT

MAX_CANDIDATES = 64
METHODS = ("GRPO", "DAPO")
# Fireworks' fields of an RFT job that have no counterpart here: a set value is a 400
CLOUD = {
    "mcpServer": "rollouts through an MCP server (multi-turn agent environments); rollouts here"
    " are one completion of the prompt",
    "maxInferenceReplicaCount": "inference replicas for rollouts; rollouts here run in the"
    " training process",
}


class InferenceParametersBody(BaseModel):
    model_config = STRICT

    maxOutputTokens: int | None = None
    temperature: float | None = None
    topP: float | None = None
    topK: int | None = None
    responseCandidatesCount: int | None = None
    extraBody: str | None = None


class RftLossConfigBody(BaseModel):
    model_config = STRICT

    method: str | None = None
    klBeta: float | None = None
    dpo: dict | None = None


class RftJobBody(BaseModel):
    model_config = STRICT

    dataset: str | None = None
    evaluator: str | None = None
    displayName: str | None = None
    trainingConfig: TrainingConfigBody | None = None
    inferenceParameters: InferenceParametersBody | None = None
    lossConfig: RftLossConfigBody | None = None
    chunkSize: int | None = None
    maxConcurrentRollouts: int | None = None
    maxConcurrentEvaluations: int | None = None
    # held-out prompts, rolled out at each epoch's end (grpo.GrpoObjective.evaluate)
    evaluationDataset: str | None = None
    evalAutoCarveout: bool | None = None
    # Fireworks' cloud (CLOUD, and route.UNSUPPORTED)
    mcpServer: str | None = None
    maxInferenceReplicaCount: int | None = None
    nodeCount: int | None = None
    awsS3Config: dict | None = None
    azureBlobStorageConfig: dict | None = None
    wandbConfig: dict | None = None
    reservationTarget: str | None = None


router = APIRouter(tags=["fine-tuning"])


def check_cloud(body: RftJobBody) -> dict[str, Any]:
    """A 400 naming the first of Fireworks' cloud fields set that has no counterpart here; the
    fields that route.UNSUPPORTED answers (checked with the training fields)."""
    for field, what in CLOUD.items():
        if getattr(body, field) not in (None, False, 0, ""):
            raise bad_request(f"{field} is not supported by this server ({what}); leave it unset", field)  # fmt: skip
    if body.nodeCount not in (None, 0, 1):
        raise bad_request("nodeCount: this server trains on one machine; leave nodeCount unset", "nodeCount")  # fmt: skip
    return body.model_dump(
        exclude_none=True,
        include={"awsS3Config", "azureBlobStorageConfig", "wandbConfig", "reservationTarget"},
    )


def counts(body: RftJobBody) -> dict[str, int]:
    """chunkSize (1 to 10,000, as Fireworks'), maxConcurrentRollouts and
    maxConcurrentEvaluations (at least 1), as given: kept, with no effect here."""
    out = {}
    for field, high in (("chunkSize", 10_000), ("maxConcurrentRollouts", MAX_INT), ("maxConcurrentEvaluations", MAX_INT)):  # fmt: skip
        value = getattr(body, field)
        if value is None:
            continue
        if not 1 <= value <= high:
            raise bad_request(f"{field} must be from 1 to {high}, got {value}", field)
        out[field] = value
    return out


def inference_parameters(params: InferenceParametersBody | None) -> dict[str, Any]:
    """The rollouts' sampling, checked, with this server's defaults (rollout.SamplingConfig)."""
    params = params or InferenceParametersBody()
    default = SamplingConfig()

    def field(name: str, value: Any, ok: bool, rule: str) -> None:
        if not ok:
            raise bad_request(f"inferenceParameters.{name} must be {rule}, got {value}", f"inferenceParameters.{name}")  # fmt: skip

    if params.extraBody not in (None, "", "{}"):
        raise bad_request(
            "inferenceParameters.extraBody: extra request parameters are not supported in"
            " rollouts; leave it unset",
            "inferenceParameters.extraBody",
        )
    n = params.responseCandidatesCount
    n = default.candidates if n is None else n
    field("responseCandidatesCount", n, 2 <= n <= MAX_CANDIDATES, f"from 2 (a group to compare) to {MAX_CANDIDATES}")  # fmt: skip
    tokens = params.maxOutputTokens or default.max_tokens
    field("maxOutputTokens", tokens, 1 <= tokens <= MAX_INT, "at least 1")
    t = default.temperature if params.temperature is None else params.temperature
    field("temperature", t, math.isfinite(t) and 0 <= t <= 2, "from 0 to 2")
    top_p = default.top_p if params.topP is None else params.topP
    field("topP", top_p, math.isfinite(top_p) and 0 < top_p <= 1, "more than 0 and at most 1")
    top_k = default.top_k if params.topK is None else params.topK
    field("topK", top_k, 0 <= top_k <= MAX_INT, "at least 0 (0: off)")
    return {
        "maxOutputTokens": tokens, "temperature": t, "topP": top_p, "topK": top_k,
        "responseCandidatesCount": n,
    }  # fmt: skip


def loss_config(loss: RftLossConfigBody | None) -> dict[str, Any]:
    """The stored lossConfig: the method (GRPO when unset) and klBeta (0 when unset)."""
    loss = loss or RftLossConfigBody()
    method = loss.method or "METHOD_UNSPECIFIED"
    method = "GRPO" if method == "METHOD_UNSPECIFIED" else method
    if method in ("DPO", "ORPO") or loss.dpo is not None:
        param = "lossConfig.dpo" if loss.dpo is not None else "lossConfig.method"
        raise bad_request(
            f"{param}: {'DPO' if loss.dpo is not None else method} trains on preference pairs,"
            " not rewards: create a DPO job (dpoJobs)",
            param,
        )
    if method not in METHODS:
        raise bad_request(f"lossConfig.method must be GRPO or DAPO, got {method!r}", "lossConfig.method")  # fmt: skip
    beta = 0.0 if loss.klBeta is None else loss.klBeta
    if not (math.isfinite(beta) and beta >= 0):
        raise bad_request(f"lossConfig.klBeta must be a finite number of at least 0, got {beta}", "lossConfig.klBeta")  # fmt: skip
    return {"method": method, "klBeta": beta}


def evaluator_name(request: Request, account: str, text: str | None) -> str:
    """The full name of one of the account's ACTIVE evaluators."""
    from girandole.evaluators.build import ACTIVE
    from girandole.evaluators.store import EVALUATORS

    if not text:
        raise bad_request("evaluator is required: the evaluator that scores the rollouts", "evaluator")  # fmt: skip
    evaluator_id = own_id(account, text, "evaluators", "evaluator")
    name = f"accounts/{account}/evaluators/{evaluator_id}"
    stores = getattr(request.app.state, "evaluator_stores", {})
    found = stores[EVALUATORS.collection].get(account, evaluator_id) if stores else None
    if found is None or found.get("state") != ACTIVE:
        why = "does not exist" if found is None else f"is {found.get('state')}, not ACTIVE"
        raise bad_request(f"evaluator {name} {why}", "evaluator")
    return name


@router.post(
    "/accounts/{account}/reinforcementFineTuningJobs",
    summary="Create a reinforcement fine-tuning job",
    openapi_extra=body_doc(RftJobBody),
)
async def create_rft_job(
    request: Request,
    account: str = Account,
    job_id: str | None = Query(default=None, alias="reinforcementFineTuningJobId"),
) -> dict:
    from girandole.api.evaluators.route import code_allowed

    code_allowed(request)  # its evaluator's Python code runs in the training process
    body = await read_json(request, RftJobBody)
    cloud = check_cloud(body)
    kept = counts(body)
    loss = loss_config(body.lossConfig)
    params = inference_parameters(body.inferenceParameters)
    evaluator = evaluator_name(request, account, body.evaluator)
    store = stores_of(request)[RFT.collection]
    job_id, fields = await config_job_fields(request, account, store, body.dataset, body.trainingConfig, cloud, job_id, read_prompts)  # fmt: skip
    if params["maxOutputTokens"] >= fields["maxContextLength"]:
        raise bad_request(
            f"inferenceParameters.maxOutputTokens {params['maxOutputTokens']} leaves no room for"
            f" a prompt within trainingConfig.maxContextLength {fields['maxContextLength']}",
            "inferenceParameters.maxOutputTokens",
        )
    dataset = fields.pop("dataset")
    job = {
        "displayName": body.displayName or job_id, "dataset": dataset, "evaluator": evaluator,
        "trainingConfig": fields, "inferenceParameters": params, "lossConfig": loss,
        **kept,
    }  # fmt: skip
    if body.evaluationDataset:  # at the top level, as an SFT job's (the runner reads it there)
        job["evaluationDataset"] = await asyncio.to_thread(
            ready_dataset, request, account, body.evaluationDataset, "evaluationDataset", read_prompts
        )  # fmt: skip
    elif body.evalAutoCarveout:
        job["evalAutoCarveout"] = True
    return insert_job(request, store, account, job_id, job)


job_routes(router, RFT, set(RftJobBody.model_fields))
