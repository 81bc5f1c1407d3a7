"""Evaluators and evaluation jobs in the server's database (girandole.db): the fine-tuning jobs'
store (one row a resource, its Fireworks body as JSON), one table each."""

from __future__ import annotations

from typing import Any

from girandole.evaluators.runner import EvaluatorCode
from girandole.finetune.store import JobKind, JobStore

EVALUATORS = JobKind("evaluators", "evaluators", "Evaluator", "evaluatorId", "evaluator-", "evaluators")  # fmt: skip
EVALUATION_JOBS = JobKind("evaluation_jobs", "evaluationJobs", "Evaluation job", "evaluationJobId", "evaljob-", "evaluation-jobs")  # fmt: skip

# An evaluation job's states (Fireworks' JobState)
CREATING, RUNNING = "JOB_STATE_CREATING", "JOB_STATE_RUNNING"
COMPLETED, FAILED, CANCELLED = "JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"
JOB_FINAL = (COMPLETED, FAILED, CANCELLED)


def code_of(evaluator: dict[str, Any]) -> EvaluatorCode:
    """The code a stored evaluator's criterion holds (an ACTIVE evaluator has one; one waiting
    for its upload has none: KeyError)."""
    snippets = evaluator["criteria"][0]["codeSnippets"]
    return EvaluatorCode(snippets["fileContents"], snippets["entryFile"], snippets["entryFunc"])


__all__ = [
    "CANCELLED", "COMPLETED", "CREATING", "EVALUATION_JOBS", "EVALUATORS", "FAILED", "JOB_FINAL",
    "RUNNING", "JobStore", "code_of",
]  # fmt: skip
