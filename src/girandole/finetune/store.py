"""Fine-tuning jobs in the server's database (girandole.db), one table per kind (supervised
fine-tuning, DPO, reinforcement fine-tuning, RLOR trainer): one row a job, its Fireworks body as
JSON. States: JOB_STATE_PENDING (waiting for the runner: finetune/fair_queue.py) ->
JOB_STATE_RUNNING -> JOB_STATE_COMPLETED | JOB_STATE_FAILED | JOB_STATE_CANCELLED; a keep-alive
RLOR trainer job is JOB_STATE_CREATING while its policy loads, then RUNNING until it is
cancelled (finetune/keep_alive.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from girandole.batch.store import CANCELLED, COMPLETED, CREATING, FAILED, PENDING, RUNNING, now_text

FINAL = (COMPLETED, FAILED, CANCELLED)
# a job's metrics file in its work folder (job_runner.py): one line per optimizer step
METRICS_FILE = "metrics.jsonl"
__all__ = [
    "CANCELLED", "COMPLETED", "DPO", "FAILED", "FINAL", "METRICS_FILE", "PENDING", "RFT", "RLOR", "RUNNING", "SFT",
    "JobKind", "JobStore",
]  # fmt: skip


@dataclass(frozen=True)
class JobKind:
    table: str
    collection: str  # the REST collection: accounts/{a}/{collection}/{job id}
    noun: str  # in messages: "{noun} accounts/.../x not found"
    id_param: str  # create's query parameter naming the new job's id
    id_prefix: str  # of the ids made up when it is not given
    folder: str  # the runner's work folders: <data_dir>/<folder>/<account>/<job id>

    @property
    def noun_inside(self) -> str:
        """The noun inside a sentence: "DPO job" as it is, "supervised fine-tuning job"."""
        return self.noun if self.noun[:2].isupper() else self.noun[0].lower() + self.noun[1:]


SFT = JobKind("sft_jobs", "supervisedFineTuningJobs", "Supervised fine-tuning job", "supervisedFineTuningJobId", "sftj-", "sft-jobs")  # fmt: skip
DPO = JobKind("dpo_jobs", "dpoJobs", "DPO job", "dpoJobId", "dpoj-", "dpo-jobs")
RFT = JobKind("rft_jobs", "reinforcementFineTuningJobs", "Reinforcement fine-tuning job", "reinforcementFineTuningJobId", "rftj-", "rft-jobs")  # fmt: skip
RLOR = JobKind("rlor_jobs", "rlorTrainerJobs", "RLOR trainer job", "rlorTrainerJobId", "rlorj-", "rlor-jobs")  # fmt: skip


def training_fields(body: dict[str, Any]) -> dict[str, Any]:
    """A job's training fields in one object: an SFT job has them at its top level, a DPO or
    reinforcement fine-tuning job in its trainingConfig."""
    return {**body, **body.get("trainingConfig", {})}


_SCHEMA = """CREATE TABLE IF NOT EXISTS {table} (
    account TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created REAL NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (account, job_id)
)"""


class JobStore:
    def __init__(self, db: Any, kind: JobKind = SFT) -> None:
        self.db, self.kind = db, kind
        db.execute(_SCHEMA.format(table=kind.table))

    def name(self, account: str, job_id: str) -> str:
        return f"accounts/{account}/{self.kind.collection}/{job_id}"

    def insert(self, account: str, job_id: str, body: dict[str, Any]) -> bool:
        rows = self.db.execute(
            f"INSERT INTO {self.kind.table} (account, job_id, created, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account, job_id) DO NOTHING RETURNING job_id",
            (account, job_id, time.time(), json.dumps(body)),
        )
        return bool(rows)

    def get(self, account: str, job_id: str) -> dict[str, Any] | None:
        rows = self.db.execute(
            f"SELECT body FROM {self.kind.table} WHERE account = ? AND job_id = ?",
            (account, job_id),
        )
        return json.loads(rows[0][0]) if rows else None

    def save(
        self, account: str, job_id: str, body: dict[str, Any], when: str | None = None
    ) -> bool:
        """Write the job's body (its updateTime set now); False when it was deleted, or with
        `when`, when its stored state is another (the runner's writes: a cancel that came
        between its read and its write stands)."""
        body["updateTime"] = now_text()
        query = f"UPDATE {self.kind.table} SET body = ? WHERE account = ? AND job_id = ?"
        args: tuple = (json.dumps(body), account, job_id)
        if when is not None:
            query += " AND json_extract(body, '$.state') = ?"
            args += (when,)
        return bool(self.db.execute(query + " RETURNING job_id", args))

    def delete(self, account: str, job_id: str) -> None:
        self.db.execute(
            f"DELETE FROM {self.kind.table} WHERE account = ? AND job_id = ?", (account, job_id)
        )

    def list(self, account: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            f"SELECT body FROM {self.kind.table} WHERE account = ? ORDER BY created, job_id",
            (account,),
        )
        return [json.loads(r[0]) for r in rows]

    def naming(
        self,
        account: str,
        value: str,
        fields: tuple[str, ...] = ("dataset", "evaluationDataset"),
        states: tuple[str, ...] = (PENDING, RUNNING),
    ) -> dict[str, Any] | None:
        """The oldest job of `account` in one of `states` whose top-level `fields` hold `value`:
        by default one that trains on, or evaluates with, the dataset named `value` (it reads
        the file when it starts; every kind keeps `dataset` at the top level, and an SFT job its
        `evaluationDataset`); ("evaluator",): a reinforcement job that scores with it."""
        holds = " OR ".join("json_extract(body, ?) = ?" for _ in fields)
        marks = ", ".join("?" for _ in states)
        rows = self.db.execute(
            f"SELECT body FROM {self.kind.table} WHERE account = ?"
            f" AND json_extract(body, '$.state') IN ({marks}) AND ({holds})"
            " ORDER BY created, job_id LIMIT 1",
            (account, *states, *(x for f in fields for x in (f"$.{f}", value))),
        )
        return json.loads(rows[0][0]) if rows else None

    def pending_heads(self) -> list[tuple[float, str, str, dict[str, Any]]]:
        """The oldest job waiting to run of each account: (its creation time, account, job id,
        body) each (the runner picks among them: finetune/fair_queue.py)."""
        rows = self.db.execute(
            "SELECT created, account, job_id, body FROM (SELECT created, account, job_id, body,"
            " ROW_NUMBER() OVER (PARTITION BY account ORDER BY created, job_id) AS k"
            f" FROM {self.kind.table} WHERE json_extract(body, '$.state') = ?) WHERE k = 1",
            (PENDING,),
        )
        return [(*row[:3], json.loads(row[3])) for row in rows]

    def count_pending(self, account: str) -> int:
        """How many jobs of `account` wait to run."""
        rows = self.db.execute(
            f"SELECT COUNT(*) FROM {self.kind.table}"
            " WHERE account = ? AND json_extract(body, '$.state') = ?",
            (account, PENDING),
        )
        return rows[0][0]

    def fail_interrupted(self) -> None:
        """At start: a job RUNNING (or CREATING: a keep-alive trainer loading) when the server
        stopped did not finish; it FAILS (resume runs it again from the start)."""
        rows = self.db.execute(
            f"SELECT account, job_id, body FROM {self.kind.table}"
            " WHERE json_extract(body, '$.state') IN (?, ?)",
            (RUNNING, CREATING),
        )
        for account, job_id, text in rows:
            body = json.loads(text)
            body["state"] = FAILED
            body["status"] = {
                "code": "ABORTED",
                "message": "the server stopped while the job ran; resume it to train again",
            }
            self.save(account, job_id, body)
