"""The background work of evaluators: builds (an evaluator BUILDING -> ACTIVE | BUILD_FAILED) and
evaluation jobs (CREATING -> RUNNING -> COMPLETED | FAILED | CANCELLED), as asyncio tasks of the
server's loop whose blocking parts (the child process) run in threads."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from girandole.batch.store import BatchStore, now_text
from girandole.evaluators.build import ACTIVE, BUILD_FAILED, BUILDING, BuildResult, build
from girandole.evaluators.criteria import CriteriaRunner, criteria_of
from girandole.evaluators.runner import ChildLimits, EvaluatorLoadError, RunnerSet, Score
from girandole.evaluators.store import COMPLETED, CREATING, FAILED, RUNNING, JobStore
from girandole.registry.naming import own_resource_id
from girandole.registry.secret_box import SecretsUnreadable

log = logging.getLogger(__name__)
BUILD_LOG, SOURCE_ARCHIVE, JOB_LOG = "build.log", "source.tar.gz", "execution.log"
RESULTS_FILE = "results.jsonl"


def result_of(score: Score) -> dict[str, Any]:
    """A row's `evaluation_result` in the output dataset."""
    if score.score is None:
        return {"error": score.error}
    result = {"score": score.score, "reason": score.reason, "metrics": score.metrics}
    if score.criteria:  # several criteria: each one's score (the score is their mean)
        result["criteria"] = score.criteria
    return result


class EvaluatorRuntime:
    def __init__(
        self,
        evaluators: JobStore,
        jobs: JobStore,
        datasets: BatchStore,
        folder: Path,
        env_of: Callable[[str], dict[str, str]],
        limits: ChildLimits,
        max_children: int,
    ) -> None:
        self.evaluators, self.jobs, self.datasets = evaluators, jobs, datasets
        self.folder, self.env_of, self.limits = folder, env_of, limits
        self._tasks: set[asyncio.Task] = set()
        # child processes at once (--max-evaluator-processes): each build and job has one; more
        # wait (BUILDING, CREATING)
        self._children = asyncio.Semaphore(max_children)
        self._builds: dict[tuple[str, str], int] = {}  # the latest build of each evaluator
        # the builds' runners: a build's thread outlives its cancelled task, its child must not
        self._build_runners = RunnerSet()
        self._jobs: dict[tuple[str, str], tuple[asyncio.Task, CriteriaRunner | None]] = {}

    # -- files -------------------------------------------------------------------------------

    def evaluator_dir(self, account: str, evaluator_id: str) -> Path:
        return self.folder / "evaluators" / account / evaluator_id

    def job_dir(self, account: str, job_id: str) -> Path:
        return self.folder / "evaluation-jobs" / account / job_id

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """At start-up: builds a stopped server left BUILDING run again; jobs it left running
        FAIL (their rows would be scored again from the start by a new job)."""
        for account, evaluator_id, body in self._all(self.evaluators):
            if body.get("state") == BUILDING and body.get("criteria"):  # not an upload to come
                self.build_later(account, evaluator_id)
        for account, job_id, body in self._all(self.jobs):
            if body.get("state") in (CREATING, RUNNING):
                body["state"] = FAILED
                body["status"] = {"code": "ABORTED", "message": "the server stopped while it ran"}
                self.jobs.save(account, job_id, body)

    @staticmethod
    def _all(store: JobStore) -> list[tuple[str, str, dict[str, Any]]]:
        rows = store.db.execute(f"SELECT account, job_id, body FROM {store.kind.table}")
        return [(a, i, json.loads(b)) for a, i, b in rows]

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def shutdown(self) -> None:
        for _, runner in list(self._jobs.values()):
            if runner is not None:
                runner.close()  # a row in flight ends now
        self._build_runners.close_all()  # a build loading its code (a hang at import) ends now
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- builds ------------------------------------------------------------------------------

    def build_later(self, account: str, evaluator_id: str) -> None:
        """Build the evaluator as it is stored now; a later build_later supersedes it."""
        key = (account, evaluator_id)
        self._builds[key] = self._builds.get(key, 0) + 1
        self._spawn(self._build(account, evaluator_id, self._builds[key]))

    async def _build(self, account: str, evaluator_id: str, generation: int) -> None:
        async with self._children:
            await self._build_now(account, evaluator_id, generation)

    async def _build_now(self, account: str, evaluator_id: str, generation: int) -> None:
        if self._builds.get((account, evaluator_id)) != generation:
            return  # superseded while it waited
        body = self.evaluators.get(account, evaluator_id)
        if body is None:
            return
        try:
            result = await asyncio.to_thread(
                build, criteria_of(body), body.get("requirements") or "", self.env_of(account),
                self.limits, self._build_runners,
            )  # fmt: skip
        except Exception as exc:  # the evaluator fails to build, not the server
            log.exception("building evaluator %s failed", body["name"])
            result = BuildResult(BUILD_FAILED, f"the build failed: {exc}", f"{exc}\n")
        if self._builds.get((account, evaluator_id)) != generation:
            return  # changed while it built: the newer build decides
        folder = self.evaluator_dir(account, evaluator_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / BUILD_LOG).write_text(result.log, encoding="utf-8")
        body = self.evaluators.get(account, evaluator_id)
        if body is None:  # deleted while it built
            return
        body["state"] = result.state
        code = "OK" if result.state == ACTIVE else "FAILED_PRECONDITION"
        body["status"] = {"code": code, "message": result.message}
        self.evaluators.save(account, evaluator_id, body, when=BUILDING)

    def supersede(self, account: str, evaluator_id: str) -> None:
        """A build in flight is dropped (new code is on its way)."""
        self._builds[(account, evaluator_id)] = self._builds.get((account, evaluator_id), 0) + 1

    def forget(self, account: str, evaluator_id: str) -> None:
        """The evaluator deleted: a build in flight is dropped, its build log removed."""
        self._builds[(account, evaluator_id)] = self._builds.get((account, evaluator_id), 0) + 1
        shutil.rmtree(self.evaluator_dir(account, evaluator_id), ignore_errors=True)

    # -- evaluation jobs ---------------------------------------------------------------------

    def run_later(self, account: str, job_id: str) -> None:
        task = self._spawn(self._run(account, job_id))
        self._jobs[(account, job_id)] = (task, None)
        task.add_done_callback(lambda _: self._jobs.pop((account, job_id), None))

    def cancel(self, account: str, job_id: str) -> None:
        """Stop the job's task and its child (the caller set its state)."""
        task, runner = self._jobs.pop((account, job_id), (None, None))
        if runner is not None:
            runner.close()
        if task is not None:
            task.cancel()

    def forget_job(self, account: str, job_id: str) -> None:
        """The job deleted: its log goes with it."""
        shutil.rmtree(self.job_dir(account, job_id), ignore_errors=True)

    async def _run(self, account: str, job_id: str) -> None:
        body = self.jobs.get(account, job_id)
        if body is None:
            return
        try:
            async with self._children:
                await self._evaluate(account, job_id, body)
        except asyncio.CancelledError:
            raise
        except SecretsUnreadable as exc:  # the account's secrets, under another key
            self._end(account, job_id, FAILED, {"code": "FAILED_PRECONDITION", "message": str(exc)})
        except Exception as exc:  # a job's failure is its state, not the server's
            log.exception("evaluation job %s failed", body["name"])
            self._end(account, job_id, FAILED, {"code": "INTERNAL", "message": str(exc)})

    def _end(self, account: str, job_id: str, state: str, status: dict[str, str],
             fields: dict[str, Any] | None = None) -> None:  # fmt: skip
        body = self.jobs.get(account, job_id)
        if body is None or body["state"] not in (CREATING, RUNNING):
            return  # cancelled or deleted meanwhile
        was = body["state"]
        body.update(fields or {}, state=state, status=status, completedTime=now_text())
        self.jobs.save(account, job_id, body, when=was)

    @staticmethod
    async def _score_lines(
        runner: CriteriaRunner, lines: list[str]
    ) -> tuple[list[str], list[float], list[str]]:
        """The output lines (each row with its evaluation_result), the scores, and the errors
        (`line N: ...`). A row a time, in a thread: a cancel stops between rows."""
        out: list[str] = []
        scores: list[float] = []
        errors: list[str] = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row, score = {"line": line}, Score(None, error=f"not JSON: {exc}")
            else:
                if isinstance(row, dict):
                    (score,) = await asyncio.to_thread(runner.score, [row])
                else:
                    row, score = {"line": row}, Score(None, error="not a JSON object")
            if score.score is None:
                errors.append(f"line {number}: {score.error}")
            else:
                scores.append(score.score)
            out.append(json.dumps({**row, "evaluation_result": result_of(score)}))
        return out, scores, errors

    async def _evaluate(self, account: str, job_id: str, body: dict[str, Any]) -> None:
        evaluator_id = own_resource_id(body["evaluator"], account, "evaluators")
        evaluator = self.evaluators.get(account, evaluator_id)
        if evaluator is None or evaluator.get("state") != ACTIVE:
            why = "was deleted" if evaluator is None else f"is {evaluator.get('state')}"
            message = f"evaluator {body['evaluator']} {why}"
            self._end(account, job_id, FAILED, {"code": "FAILED_PRECONDITION", "message": message})
            return
        body["state"] = RUNNING
        if not self.jobs.save(account, job_id, body, when=CREATING):
            return
        input_id = own_resource_id(body["inputDataset"], account, "datasets")
        output_id = own_resource_id(body["outputDataset"], account, "datasets")
        data = await asyncio.to_thread(self.datasets.dataset_bytes, account, input_id)
        lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
        runner = CriteriaRunner(criteria_of(evaluator), self.env_of(account), self.limits)
        task = self._jobs.get((account, job_id), (None, None))[0]
        if task is not None:
            self._jobs[(account, job_id)] = (task, runner)
        try:
            try:
                await asyncio.to_thread(runner.start)
            except EvaluatorLoadError as exc:
                message = f"loading the evaluator failed: {exc}"
                self._end(account, job_id, FAILED, {"code": "FAILED_PRECONDITION", "message": message})  # fmt: skip
                return
            out, scores, errors = await self._score_lines(runner, lines)
            child_log = runner.log()
        finally:
            runner.close()
        folder = self.job_dir(account, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        text = "\n".join([*errors, child_log]) if child_log else "\n".join(errors)
        (folder / JOB_LOG).write_text(text + "\n", encoding="utf-8")
        results = "".join(line + "\n" for line in out).encode()

        def write_output() -> None:
            def exists() -> None:
                if self.datasets.get_dataset(account, output_id) is None:
                    raise LookupError(f"the output dataset {body['outputDataset']} was deleted")

            self.datasets.write_file(account, output_id, RESULTS_FILE, results, exists)
            ready = {"state": "READY", "exampleCount": str(len(out))}
            self.datasets.update_dataset(account, output_id, ready)

        try:
            await asyncio.to_thread(write_output)
        except LookupError as exc:
            self._end(account, job_id, FAILED, {"code": "NOT_FOUND", "message": str(exc)})
            return
        mean = math.fsum(scores) / len(scores) if scores else 0.0
        metrics = {"meanScore": mean, "scoredRows": float(len(scores)), "failedRows": float(len(errors))}  # fmt: skip
        stats = {"rowCount": len(out), **metrics}
        fields = {"metrics": metrics, "outputStats": json.dumps(stats)}
        self._end(account, job_id, COMPLETED, {"code": "OK", "message": ""}, fields)
