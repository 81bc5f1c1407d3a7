"""What a reinforcement fine-tuning job's stored body gives its training process, besides the
training fields every kind has (job_runner.JobRunner.spec): the loss (GRPO or DAPO, klBeta), the rollouts'
sampling (inferenceParameters, as rollout.SamplingConfig) and the evaluator's code, which the
worker runs (girandole.evaluators.runner) to score each rollout.

The evaluator's code is read when the job starts: an evaluator changed or deleted after
that does not change a running job. Its environment (the account's secrets) reaches the worker
as an environment variable of its process (`worker_env`), never in the spec file, which stays
in the job's folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

ENV_VAR = "GIRANDOLE_EVALUATOR_ENV"  # the worker's: the evaluator's environment, as JSON

# the evaluator's code, environment and child limits: {"criteria": [{"name", "files",
# "entryFile", "entryFunc"}, ...] (evaluators.criteria.to_json), "env", "limits"}
# (runner.ChildLimits.to_json); raises
# ValueError when the job's evaluator can no longer run (deleted, not ACTIVE)
EvaluatorOf = Callable[[str, str], dict[str, Any]]


def rft_fields(
    account: str, job: dict[str, Any], evaluator_of: EvaluatorOf | None
) -> dict[str, Any]:
    """The worker spec's fields of an RFT job (its body checked by the route)."""
    if evaluator_of is None:
        raise ValueError("this server runs no evaluators: a reinforcement job cannot train")
    loss = job["lossConfig"]
    params = job["inferenceParameters"]
    return {
        "method": loss["method"].lower(),
        "kl_beta": loss["klBeta"],
        "sampling": {
            "candidates": params["responseCandidatesCount"],
            "max_tokens": params["maxOutputTokens"],
            "temperature": params["temperature"],
            "top_p": params["topP"],
            "top_k": params["topK"],
        },
        "evaluator": evaluator_of(account, job["evaluator"]),
    }


def worker_env(spec: dict[str, Any]) -> dict[str, str]:
    """The evaluator's environment taken out of the worker's spec, as environment variables of
    the worker's process ({} for a job of another kind)."""
    evaluator = spec.get("evaluator")
    if evaluator is None:
        return {}
    return {ENV_VAR: json.dumps(evaluator.pop("env", {}))}


def evaluator_reward(spec: dict[str, Any]):
    """(the runner, a reward function scoring rows with it) from the spec's evaluator and the
    environment `worker_env` gave this process; the runner is started (EvaluatorLoadError when
    its code does not load) and must be closed."""
    from girandole.evaluators.criteria import CriteriaRunner, Criterion, from_json
    from girandole.evaluators.runner import ChildLimits, EvaluatorCode

    if "criteria" in spec:
        criteria = from_json(spec["criteria"])
    else:  # a spec written before criteria: one criterion's code
        code = EvaluatorCode(spec["files"], spec["entryFile"], spec["entryFunc"])
        criteria = [Criterion("criteria[0]", code)]
    env = json.loads(os.environ.pop(ENV_VAR, "{}"))
    # the server's --evaluator-timeout and --evaluator-memory (a spec written before: defaults)
    limits = ChildLimits.from_json(spec["limits"]) if "limits" in spec else ChildLimits()
    runner = CriteriaRunner(criteria, env, limits)
    try:
        runner.start()
    except BaseException:
        runner.close()
        raise

    def reward(rows: list[dict[str, Any]]) -> list[Any]:
        return runner.score(rows)  # Scores: a failed row's error names why

    return runner, reward
