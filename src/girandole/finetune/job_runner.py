"""Runs fine-tuning jobs (supervised, DPO and reinforcement) one at a time, fair across accounts
(the oldest waiting job of the account that started one least recently: finetune/fair_queue.py),
each in a child process (girandole.finetune.worker); the others wait in JOB_STATE_PENDING. The
child's progress lines become the job's jobProgress (and lines of its metrics.jsonl); its
adapter folder, when it succeeds, moves into the uploaded models' storage
(registry/model_files.py) and joins the catalog as a READY HF_PEFT_ADDON of the job's base
model: it deploys and serves as an uploaded adapter does. Cancel terminates the child. On start,
a job left RUNNING by a stopped server FAILS (store.fail_interrupted). A DPO job's training
fields are in its trainingConfig (store.training_fields), its loss in lossConfig; so are a
reinforcement fine-tuning job's, whose evaluator and rollouts are read by finetune/rft.py, and an
RLOR trainer job's (rollouts scored by the user: finetune/rlor.py). A keep-alive RLOR job is
picked as any job, then handed to a long-lived trainer of its own (finetune/keep_alive.py): the
runner goes on with the queue."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from girandole.batch.store import now_text
from girandole.finetune.fair_queue import FairQueue
from girandole.finetune.keep_alive import KeepAliveTrainers
from girandole.finetune.rft import EvaluatorOf, rft_fields, worker_env
from girandole.finetune.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    METRICS_FILE,
    PENDING,
    RLOR,
    RUNNING,
    JobKind,
    JobStore,
    training_fields,
)  # fmt: skip

log = logging.getLogger(__name__)

# torch threads of the training child: the server's engine keeps the cores it has
THREADS_ENV = "GIRANDOLE_SFT_THREADS"


def training_threads() -> int:
    """The training child's torch threads: GIRANDOLE_SFT_THREADS, 1 unless set."""
    text = os.environ.get(THREADS_ENV, "").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{THREADS_ENV} must be a whole number of at least 1, not {text!r}")
    return int(text)


def adapter_base(folder: Path) -> str:
    """The base model a trainer's adapter folder was made on (its PEFT config's
    base_model_name_or_path: the catalog's name): a warm-started job's, where the warm start
    itself may be gone."""
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


class JobRunner:
    def __init__(
        self,
        stores: list[JobStore],
        catalog: Any,
        files: Any,
        datasets: Any,
        folder: Path,
        template_of: Callable[[str], str | None] = lambda _: None,
        evaluator_of: EvaluatorOf | None = None,
        max_trainers: int = 2,
    ) -> None:
        """`template_of(base model name)`: the chat template the server renders that model's
        chat requests with when it is not the model's own (`--chat-template`), else None.
        `evaluator_of(account, evaluator name)`: a reinforcement fine-tuning job's (rft.py).
        `max_trainers`: keep-alive RLOR trainers at once (--max-rlor-trainers)."""
        self.stores, self.catalog, self.files, self.datasets = stores, catalog, files, datasets
        self.template_of, self.evaluator_of = template_of, evaluator_of
        # per job, <folder>/<kind's folder>/<account>/<job id>: spec, log, the adapter written
        self.folder = folder
        self.wake = threading.Event()
        self.queue = FairQueue()  # which waiting job starts next
        self.stopping = False
        self.current: tuple[str, str, str] | None = None  # (table, account, job id)
        self.child: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.keep_alive = KeepAliveTrainers(self, max_trainers)
        for store in stores:
            store.fail_interrupted()

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="girandole-sft", daemon=True)
            self.thread.start()

    def notify(self) -> None:
        self.wake.set()

    def stop_job(self, store: JobStore, account: str, job_id: str) -> None:
        """Terminate the job's child if it is the one running (its state is already set)."""
        with self.lock:
            if self.current == (store.kind.table, account, job_id) and self.child is not None:
                self.child.terminate()
        self.keep_alive.stop(store, account, job_id)

    def shutdown(self) -> None:
        self.stopping = True
        with self.lock:
            if self.child is not None:
                self.child.terminate()
        self.keep_alive.shutdown()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _loop(self) -> None:
        while not self.stopping:
            waiting = [(row, store) for store in self.stores for row in store.pending_heads()]
            if not waiting:
                self.wake.wait(5)
                self.wake.clear()
                continue
            (_, account, job_id, body), store = self.queue.pick(waiting)  # fair across accounts
            try:
                if body.get("keepAlive"):
                    self.keep_alive.start(store, account, job_id, body)
                    continue
                self._run(store, account, job_id, body)
            except ValueError as exc:  # what it needs is gone (its dataset, its base model)
                failed = {"code": "FAILED_PRECONDITION", "message": str(exc)}
                self.finish(store, account, job_id, FAILED, failed, when=(RUNNING, PENDING))
            except Exception as exc:  # noqa: BLE001 - a job's failure must not stop the runner
                log.exception("fine-tuning job %s failed", job_id)
                failed = {"code": "INTERNAL", "message": str(exc)}
                # PENDING too: a job left PENDING would be picked (and fail) again and again
                self.finish(store, account, job_id, FAILED, failed, when=(RUNNING, PENDING))

    def spec(
        self,
        account: str,
        job: dict[str, Any],
        work: Path,
        kind: JobKind,
        resumed_from: Path | None = None,
    ) -> dict:
        """The training process's spec of the job (TrainConfig's fields); ValueError when what
        it needs is gone. `resumed_from`: a checkpoint folder whose adapter, if it holds one, is
        the policy instead of the warm start (which may have been deleted since)."""

        def dataset_path(name: str) -> str:
            dataset_id = name.rsplit("/", 1)[-1]
            if self.datasets.get_dataset(account, dataset_id) is None:
                raise ValueError(f"dataset {name} was deleted before the job ran")
            # a copy: the dataset may change meanwhile
            path = work / "datasets" / f"{dataset_id}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(self.datasets.dataset_bytes(account, dataset_id))
            return str(path)

        body = training_fields(job)
        base_name = body.get("baseModel")
        warm = None
        checkpoint = resumed_from / "adapter_config.json" if resumed_from else None
        if body.get("warmStartFrom") and checkpoint is not None and checkpoint.is_file():
            base_name = adapter_base(resumed_from)  # the trainer loads the checkpoint's adapter
        elif body.get("warmStartFrom"):
            adapter = self.catalog.get(body["warmStartFrom"])
            if adapter is None:
                raise ValueError(f"warmStartFrom {body['warmStartFrom']} no longer exists")
            warm, base_name = adapter.source, adapter.base_model
        base = self.catalog.get(base_name)
        if base is None:
            raise ValueError(f"base model {base_name} no longer exists")
        eval_name = body.get("evaluationDataset")
        return {
            "base_path": base.source,
            "base_model_name": base.name,
            # a keep-alive job's come with its steps
            "dataset_path": dataset_path(body["dataset"]) if body.get("dataset") else "",
            "eval_path": dataset_path(eval_name) if eval_name else None,
            "eval_carveout": bool(body.get("evalAutoCarveout")),
            "warm_start_path": warm,
            "output_dir": str(work / "adapter"),
            "rank": body["loraRank"],
            "epochs": body["epochs"],
            "learning_rate": body["learningRate"],
            "batch_size_tokens": body.get("batchSize"),
            "batch_size_samples": body.get("batchSizeSamples"),
            "gradient_accumulation_steps": body["gradientAccumulationSteps"],
            "warmup_steps": body["learningRateWarmupSteps"],
            "weight_decay": body["optimizerWeightDecay"],
            "max_context_length": body["maxContextLength"],
            "early_stop": bool(body.get("earlyStop")),
            "threads": training_threads(),
            "chat_template": self.template_of(base.name),
            **(
                rlor_fields(job)
                if kind is RLOR
                else rft_fields(account, job, self.evaluator_of)
                if "evaluator" in job
                else loss_fields(job.get("lossConfig"))
            ),
        }

    def work_dir(self, store: JobStore, account: str, job_id: str) -> Path:
        """The job's folder (an SFT and a DPO job may have the same id)."""
        return self.folder / store.kind.folder / account / job_id

    def _run(self, store: JobStore, account: str, job_id: str, body: dict[str, Any]) -> None:
        work = self.work_dir(store, account, job_id)
        shutil.rmtree(work, ignore_errors=True)  # a resumed job trains again from the start
        work.mkdir(parents=True)
        body["state"] = RUNNING
        body["jobProgress"] = {"percent": 0, "epoch": 0}
        if not store.save(account, job_id, body, when=PENDING):
            return  # cancelled or deleted since it was picked
        spec = self.spec(account, body, work, store.kind)
        secret = worker_env(spec)  # an RFT evaluator's environment: not in the file
        (work / "spec.json").write_text(json.dumps(spec))
        stderr = open(work / "train.log", "wb")
        with self.lock:
            if self.stopping or (store.get(account, job_id) or {}).get("state") != RUNNING:
                stderr.close()
                return  # cancelled or deleted before its child started
            self.current = (store.kind.table, account, job_id)
            self.child = subprocess.Popen(
                [sys.executable, "-m", "girandole.finetune.worker", str(work / "spec.json")],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                env={**os.environ, **secret},
            )  # fmt: skip
        last: dict[str, Any] = {}
        try:
            for raw in self.child.stdout:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                last = line
                if "progress" in line:
                    self.progress(store, account, job_id, line["progress"])
            code = self.child.wait()
        finally:
            stderr.close()
            with self.lock:
                self.current, self.child = None, None
            # the datasets' copies (train.log and metrics.jsonl stay)
            shutil.rmtree(work / "datasets", ignore_errors=True)
        now = store.get(account, job_id)
        if now is None or now["state"] != RUNNING:  # cancelled or deleted: the child was ended
            return
        if self.stopping:
            self.finish(store, account, job_id, FAILED, {"code": "ABORTED", "message": "the server stopped while the job ran; resume it to train again"})  # fmt: skip
            return
        if code != 0 or "done" not in last:
            tail = (work / "train.log").read_text(errors="replace")[-500:]
            message = last.get("error") or f"training exited with status {code}: {tail}"
            self.finish(store, account, job_id, FAILED, {"code": "INVALID_ARGUMENT" if "error" in last else "INTERNAL", "message": message})  # fmt: skip
            return
        done = last["done"]
        if spec.get("forward_only"):
            message = f"computed the loss of {done['steps']} steps over {done['epochs']} epochs (forward only: no update, no model written)"  # fmt: skip
            self.finish(store, account, job_id, COMPLETED, {"code": "OK", "message": message})
            return
        try:
            self.register(account, training_fields(body), work / "adapter")
        except ValueError as exc:
            self.finish(
                store, account, job_id, FAILED, {"code": "ALREADY_EXISTS", "message": str(exc)}
            )
            return
        message = f"trained {done['steps']} steps over {done['epochs']} epochs"
        if done.get("earlyStopped"):
            message += " (stopped early: the evaluation loss no longer improved)"
        self.finish(store, account, job_id, COMPLETED, {"code": "OK", "message": message})

    def progress(
        self, store: JobStore, account: str, job_id: str, progress: dict[str, Any]
    ) -> None:
        body = store.get(account, job_id)
        if body is None or body["state"] != RUNNING:
            return
        shown = body.setdefault("jobProgress", {})
        shown.update({k: v for k, v in progress.items() if k != "elapsedSeconds"})
        store.save(account, job_id, body, when=RUNNING)
        # every step's numbers, for :getMetricsFileEndpoint (jobProgress has the last only)
        with open(self.work_dir(store, account, job_id) / METRICS_FILE, "a") as metrics:
            metrics.write(json.dumps(progress) + "\n")

    def register(self, account: str, body: dict[str, Any], adapter: Path) -> None:
        """The adapter folder into the uploaded models' storage, and into the catalog."""
        name = body["outputModel"]
        model_id = name.rsplit("/", 1)[-1]
        # a warm-started job's: its warm start may have been deleted while the job ran
        base = body.get("baseModel") or adapter_base(adapter)
        with self.files.lock:
            if self.catalog.get(name) is not None:
                raise ValueError(f"outputModel {name} was created while the job ran")
            target = self.files.model_dir(account, model_id)
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(adapter), target)
            self.catalog.add(name, str(target), base=base)

    def finish(
        self,
        store: JobStore,
        account: str,
        job_id: str,
        state: str,
        status: dict[str, str],
        when: tuple[str, ...] = (RUNNING,),
    ) -> None:
        """The job ended, if its stored state is one of `when` (a cancel that came first
        stands)."""
        body = store.get(account, job_id)
        if body is None:
            return
        body["state"], body["status"] = state, status
        if state == COMPLETED:
            body.setdefault("jobProgress", {})["percent"] = 100
        body["completedTime"] = now_text()
        for before in when:
            if store.save(account, job_id, body, when=before):
                return


def rlor_fields(job: dict[str, Any]) -> dict[str, Any]:
    """The trainer's fields of an RLOR trainer job (its body checked by the route)."""
    loss = job["lossConfig"]
    return {
        "method": "rlor",
        "kl_beta": loss["klBeta"],
        "token_level": loss["method"] == "DAPO",
        "forward_only": bool(job.get("forwardOnly")),
    }


def loss_fields(loss: dict[str, Any] | None) -> dict[str, Any]:
    """The trainer's method (dpo, orpo) and beta from a DPO job's lossConfig (the route checked
    it); an SFT job has none."""
    if loss is None:
        return {}
    return {"method": loss["method"].lower(), "beta": loss["dpo"]["beta"]}


__all__ = ["CANCELLED", "METRICS_FILE", "PENDING", "JobRunner"]
