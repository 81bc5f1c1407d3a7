"""The trainers of keep-alive RLOR trainer jobs: one training process each
(girandole.finetune.rlor_worker), alive from the job's start until it is cancelled, deleted or
the server stops; its steps come from the job's :executeTrainStep calls.

The job runner (job_runner.py) starts a keep-alive job when the fair queue picks it, as any
job, but does not wait for it: the job is JOB_STATE_CREATING while its process loads the policy,
then JOB_STATE_RUNNING (or FAILED, saying why). At most `max_trainers` run at once on a server
(--max-rlor-trainers; each holds a float32 copy of its base model); a job picked past that FAILS
with RESOURCE_EXHAUSTED, and resume starts it again. One step at a time a job: `claim` says
whether the trainer is free and takes it; `step` (on a thread) runs the claimed step and frees it.

Each step that writes a model also leaves the policy, its AdamW state and its step count in the
job's folder (CHECKPOINT, rlor_worker.py; a forward-only job's step count alone); a resumed job
that wrote one goes on from there, as if it had not stopped: step N+1 builds on step N's adapter,
and its step count goes on. The folder is the job's own: OWNER holds its createTime, so the
folder of a job deleted and made again under the same id is not taken for its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from girandole.batch.store import CREATING
from girandole.finetune.rlor_worker import TRAINER_STATE
from girandole.finetune.store import FAILED, METRICS_FILE, PENDING, RUNNING, JobStore

log = logging.getLogger(__name__)

# in the job's folder: the policy after its last written step (rlor_worker.save_checkpoint)
CHECKPOINT = "checkpoint"
# in the job's folder: the createTime of the job that made it
OWNER = "job-created"


class StepError(ValueError):
    """A step refused by the trainer (a bad row, a prompt too long); the policy is unchanged."""


class TrainerGone(RuntimeError):
    """The trainer's process ended (cancelled, deleted, killed) before it answered."""


class Trainer:
    """One job's training process."""

    def __init__(self, process: subprocess.Popen, work: Path) -> None:
        self.process, self.work = process, work
        self.busy = threading.Lock()  # held for a step's whole length
        self.hot_loaded: str | None = None  # the DeployedModel id of the last step's adapter

    def claim(self) -> bool:
        return self.busy.acquire(blocking=False)

    def step(self, dataset: bytes, output: Path | None) -> dict[str, Any]:
        """Run the claimed step over `dataset` (rollout rows), writing the policy to `output`;
        the step's numbers. Frees the trainer."""
        try:
            path = self.work / "step.jsonl"
            path.write_bytes(dataset)
            command = {"step": {"dataset": str(path), "output": str(output) if output else None}}
            try:
                self.process.stdin.write((json.dumps(command) + "\n").encode())
                self.process.stdin.flush()
            except (OSError, ValueError):
                raise TrainerGone("the trainer stopped") from None
            line = _read_line(self.process)
            if line is None:
                raise TrainerGone("the trainer stopped")
            if "error" in line:
                raise StepError(line["error"])
            return line["done"]
        finally:
            self.busy.release()

    def stop(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        self.process.terminate()


def _read_line(process: subprocess.Popen) -> dict[str, Any] | None:
    """The process's next JSON line (lines that are not JSON skipped); None at its end."""
    for raw in process.stdout:
        try:
            return json.loads(raw)
        except ValueError:
            continue
    return None


def has_checkpoint(work: Path, created: str) -> bool:
    """Whether the job made at `created` left a checkpoint in its folder `work`."""
    owner = work / OWNER
    mine = owner.is_file() and owner.read_text() == created
    return mine and (work / CHECKPOINT / TRAINER_STATE).is_file()


def fresh_folder(work: Path, resumed: bool, created: str) -> None:
    """The job's folder, emptied for its trainer's start: a resumed job keeps its checkpoint and
    its metrics file (its steps go on), a new one starts from its base."""
    if not resumed:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / OWNER).write_text(created)
        return
    for entry in work.iterdir():
        if entry.name in (CHECKPOINT, METRICS_FILE, OWNER):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class KeepAliveTrainers:
    def __init__(self, runner: Any, max_trainers: int = 2) -> None:
        self.runner = runner  # job_runner.JobRunner: its spec, folders and output models
        self.max_trainers = max_trainers  # --max-rlor-trainers
        self.live: dict[tuple[str, str, str], Trainer] = {}  # (table, account, job id)
        self.lock = threading.Lock()

    def get(self, store: JobStore, account: str, job_id: str) -> Trainer | None:
        return self.live.get((store.kind.table, account, job_id))

    def start(self, store: JobStore, account: str, job_id: str, body: dict[str, Any]) -> None:
        """Start the picked PENDING job's trainer; its state follows from the process's first
        line (on a thread of its own: the runner goes on with the queue)."""
        key = (store.kind.table, account, job_id)
        work = self.runner.work_dir(store, account, job_id)
        resumed = has_checkpoint(work, body["createTime"])
        fresh_folder(work, resumed, body["createTime"])
        body["state"] = CREATING
        body["status"] = {"code": "OK", "message": "loading the policy"}
        if not store.save(account, job_id, body, when=PENDING):
            return  # cancelled or deleted since it was picked
        with self.lock:
            if len(self.live) >= self.max_trainers:
                why = f"{len(self.live)} keep-alive trainers already run on this server, the most it holds at once (--max-rlor-trainers): cancel one, then resume this job"  # fmt: skip
                self._fail(store, account, job_id, "RESOURCE_EXHAUSTED", why)
                return
            try:
                # a resumed job's policy is its checkpoint's: its warm start may be gone
                spec = self.runner.spec(account, body, work, store.kind, resumed_from=work / CHECKPOINT if resumed else None)  # fmt: skip
            except ValueError as exc:  # its base model or warm start is gone
                self._fail(store, account, job_id, "FAILED_PRECONDITION", str(exc))
                return
            spec.update(checkpoint_dir=str(work / CHECKPOINT), resume=resumed)
            (work / "spec.json").write_text(json.dumps(spec))
            with open(work / "train.log", "wb") as stderr:
                process = subprocess.Popen(
                    [sys.executable, "-m", "girandole.finetune.rlor_worker", str(work / "spec.json")],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=dict(os.environ),
                )  # fmt: skip
            self.live[key] = trainer = Trainer(process, work)
            # a resumed job's last hot-loaded adapter: its next step's replaces it
            trainer.hot_loaded = (body.get("hotLoadedDeployedModel") or "").rsplit("/", 1)[-1] or None  # fmt: skip
        threading.Thread(
            target=self._await_ready, args=(store, account, job_id), daemon=True,
            name=f"girandole-rlor-{job_id}",
        ).start()  # fmt: skip

    def _await_ready(self, store: JobStore, account: str, job_id: str) -> None:
        trainer = self.get(store, account, job_id)
        if trainer is None:
            return
        line = _read_line(trainer.process)
        body = store.get(account, job_id)
        if line is not None and "ready" in line and body is not None:
            body["state"] = RUNNING
            body["status"] = {"code": "OK", "message": "waiting for :executeTrainStep"}
            if store.save(account, job_id, body, when=CREATING):
                return
        self.stop(store, account, job_id)  # cancelled or deleted meanwhile, or it failed
        if line is None:
            tail = (trainer.work / "train.log").read_text(errors="replace")[-500:]
            self._fail(store, account, job_id, "INTERNAL", f"the trainer exited: {tail}")
        elif "error" in line:
            self._fail(store, account, job_id, "INVALID_ARGUMENT", line["error"])

    def _fail(self, store: JobStore, account: str, job_id: str, code: str, message: str) -> None:
        self.runner.finish(store, account, job_id, FAILED, {"code": code, "message": message}, when=(CREATING, RUNNING))  # fmt: skip

    def stop(self, store: JobStore, account: str, job_id: str) -> None:
        """End the job's trainer, if it has one (its state is already set)."""
        with self.lock:
            trainer = self.live.pop((store.kind.table, account, job_id), None)
        if trainer is not None:
            trainer.stop()

    def count(self) -> int:
        return len(self.live)

    def shutdown(self) -> None:
        with self.lock:
            trainers, self.live = list(self.live.values()), {}
        for trainer in trainers:
            trainer.stop()
        for trainer in trainers:
            try:
                trainer.process.wait(10)
            except subprocess.TimeoutExpired:
                trainer.process.kill()
