"""Evaluators and evaluation jobs in the server's database (girandole.db): the fine-tuning jobs'
store (one row a resource, its Fireworks body as JSON), one table each."""

from __future__ import annotations

from girandole.finetune.store import JobKind, JobStore

EVALUATORS = JobKind("evaluators", "evaluators", "Evaluator", "evaluatorId", "evaluator-", "evaluators")  # fmt: skip
EVALUATION_JOBS = JobKind("evaluation_jobs", "evaluationJobs", "Evaluation job", "evaluationJobId", "evaljob-", "evaluation-jobs")  # fmt: skip

# An evaluation job's states (Fireworks' JobState)
CREATING, RUNNING = "JOB_STATE_CREATING", "JOB_STATE_RUNNING"
COMPLETED, FAILED, CANCELLED = "JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"
JOB_FINAL = (COMPLETED, FAILED, CANCELLED)


__all__ = [
    "CANCELLED", "COMPLETED", "CREATING", "EVALUATION_JOBS", "EVALUATORS", "FAILED", "JOB_FINAL",
    "RUNNING", "JobStore",
]  # fmt: skip
