"""BatchRunner: runs batch jobs one at a time, oldest first, in the capacity that interactive
requests leave.

A job's lines run through the serving pipeline like HTTP requests (`execute`), at most
`max_in_flight` at once, and fewer while interactive requests hold admission slots (together
they stay within that number). A new line is submitted only while no interactive request waits:
none queued for admission and none waiting in the engine (its `num_waiting`, which counts the
batch's own waiting lines too, so batch work never piles up in front of a newcomer).

A line's result is committed (`BatchStore.record_result`) before it counts; lines with a result
are skipped when a job resumes after a restart, and lines in flight when the server stopped run
again. A line refused for capacity (429, or a 503 with Retry-After: the model still loading,
the server draining, a deployment scaling up) is retried later, not written as failed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from girandole.batch.lines import (
    InputError,
    InputLine,
    parse_parameters,
    read_input,
    request_body,
)
from girandole.batch.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    FINAL,
    RUNNING,
    WRITING_RESULTS,
    BatchStore,
    LineResult,
)

logger = logging.getLogger("girandole.batch")

# (url, account, key id, request body, label) -> (HTTP status, response body, request id: the
# usage row's, whether it was refused for capacity and is to be retried later): the pipeline
Execute = Callable[
    [str, str, str | None, dict[str, Any], str],
    Awaitable[tuple[int, dict[str, Any], str, bool]],
]

POLL_S = 0.005  # how often a runner with no room looks again
RETRY_S = 1.0  # after a line was refused for capacity
MAX_INPUT_LINES = 50_000


@dataclass
class Capacity:
    """What the runner reads to leave room for interactive requests."""

    admission: Any  # girandole.api.ops.admission.Admission
    engine_stats: Callable[[], dict[str, float] | None]  # the serving engine's, None if none
    paused: Callable[[], bool]  # no new lines now (the server drains, the model loads)


@dataclass
class _Job:
    account: str
    job_id: str
    key_id: str | None
    model: str
    parameters: dict[str, Any]


class BatchRunner:
    def __init__(
        self, store: BatchStore, execute: Execute, capacity: Capacity, max_in_flight: int
    ) -> None:
        self.store = store
        self.execute = execute
        self.capacity = capacity
        self.max_in_flight = max(1, max_in_flight)
        self.num_in_flight = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping: dict[tuple[str, str], str] = {}  # job -> why it must stop
        self._current: tuple[str, str] | None = None  # the job running now
        # told when a job ends (account, job id, the job): OpenAI's batch webhooks
        self.on_end: Callable[[str, str, dict[str, Any]], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="girandole-batch")

    async def shutdown(self) -> None:
        """Stop at once: lines in flight are cancelled and run again after a restart."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def notify(self) -> None:
        """A job was created: look for work now."""
        self._wake.set()

    def stop_job(self, account: str, job_id: str, why: str) -> None:
        """Stop a job that may be running (cancelled or deleted); its lines in flight are
        cancelled, and what is done stays done."""
        if (account, job_id) != self._current:
            if why == CANCELLED:  # never started, or between two runs: its outputs now
                self._finish(account, job_id, CANCELLED, "CANCELLED", "cancelled by the user")
            return
        self._stopping[(account, job_id)] = why
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        # cancelled before the server last stopped, their files not written yet: write them
        # (else an OpenAI batch stays `cancelling` and a message batch `canceling` for ever);
        # failed by an older server, which left their output datasets UPLOADING: write them
        for account, job_id, state in self.store.unwritten_outputs():
            if state == CANCELLED:
                self._finish(account, job_id, CANCELLED, "CANCELLED", "cancelled by the user")
            else:  # its state and status (why it failed) stay as they are
                self.write_output(account, job_id)
        while True:
            jobs = self.store.runnable_jobs()
            if not jobs:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 5.0)
                except TimeoutError:
                    pass
                continue
            account, job_id = jobs[0]
            self._current = (account, job_id)
            try:
                await self._run_job(account, job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug fails the job, not the server
                logger.exception("batch job %s/%s failed", account, job_id)
                self._fail(account, job_id, "INTERNAL", f"{type(exc).__name__}")
            finally:
                self._current = None
                self._stopping.pop((account, job_id), None)

    def _set_state(
        self, account: str, job_id: str, state: str, code: str = "OK", message: str = ""
    ) -> dict[str, Any] | None:
        body = self.store.get_job(account, job_id)
        if body is None:
            return None
        body["state"] = state
        body["status"] = {"code": code, "message": message}
        self.store.save_job(account, job_id, body)
        if state in FINAL and self.on_end is not None:
            try:
                self.on_end(account, job_id, body)
            except Exception:  # noqa: BLE001 - a listener must not fail the job
                logger.exception("batch job %s/%s: on_end failed", account, job_id)
        return body

    async def _prepare(self, account: str, job_id: str) -> tuple[_Job, list[InputLine]] | None:
        """The job and its input lines (None: it failed, its state says why)."""
        body = self.store.get_job(account, job_id)
        if body is None:
            return None
        input_id = body["inputDatasetId"].rsplit("/", 1)[-1]
        files = self.store.dataset_files(account, input_id)

        def read() -> list[InputLine]:  # seconds for hundreds of MB: off the event loop
            return read_input(self.store.dataset_bytes(account, input_id), MAX_INPUT_LINES)

        try:
            if not files:
                raise InputError(f"the input dataset {body['inputDatasetId']} has no file")
            lines = await asyncio.to_thread(read)
            parameters = parse_parameters(body.get("inferenceParameters"))
        except InputError as exc:
            if (account, job_id) not in self._stopping:  # not cancelled while it was read
                self._fail(account, job_id, "INVALID_ARGUMENT", str(exc))
            return None
        job = _Job(account, job_id, self.store.job_key(account, job_id), body["model"], parameters)
        return job, lines

    async def _run_job(self, account: str, job_id: str) -> None:
        body = self.store.get_job(account, job_id)
        if body is None:
            return
        if body["state"] != WRITING_RESULTS:
            prepared = await self._prepare(account, job_id)
            stopped = self._stopping.get((account, job_id))
            if stopped is not None:  # cancelled or deleted while its input was read
                if stopped == CANCELLED:
                    self._finish(account, job_id, CANCELLED, "CANCELLED", "cancelled by the user")
                return
            if prepared is None:
                return
            job, lines = prepared
            done = self.store.done_lines(account, job_id)
            pending = collections.deque(line for line in lines if line.line not in done)
            self._set_state(account, job_id, RUNNING)
            logger.info(
                "batch job %s/%s: %d of %d lines to run", account, job_id, len(pending), len(lines)
            )
            stopped = await self._run_lines(job, pending)
            if stopped is not None:
                if stopped == CANCELLED:
                    self._finish(account, job_id, CANCELLED, "CANCELLED", "cancelled by the user")
                return
            self._set_state(account, job_id, WRITING_RESULTS)
        self._finish(account, job_id, COMPLETED)

    def _finish(
        self, account: str, job_id: str, state: str, code: str = "OK", message: str = ""
    ) -> None:
        """Write the output dataset from the result rows, then the job's final state."""
        if self.write_output(account, job_id) is None:
            return
        self._set_state(account, job_id, state, code, message)
        logger.info("batch job %s/%s: %s", account, job_id, state)

    def _fail(self, account: str, job_id: str, code: str, message: str) -> None:
        """End a job FAILED, its output dataset READY with what was done (a dataset has no
        failed state: Fireworks' are UPLOADING or READY, and one left UPLOADING was polled for
        ever); the job's state and status say that it failed, and why."""
        try:
            self._finish(account, job_id, FAILED, code, message)
        except Exception:  # noqa: BLE001 - the output could not be written: the job still ends
            logger.exception("batch job %s/%s: its output was not written", account, job_id)
            self._set_state(account, job_id, FAILED, code, message)

    def write_output(self, account: str, job_id: str) -> dict[str, Any] | None:
        """Write the job's output dataset from its result rows, READY (left alone when it was
        deleted); the job, None when it no longer exists."""
        body = self.store.get_job(account, job_id)
        if body is None:
            return None
        output_id = body["outputDatasetId"].rsplit("/", 1)[-1]
        rows = self.store.write_outputs(account, job_id, output_id)
        dataset = self.store.get_dataset(account, output_id)
        if dataset is not None:
            dataset["state"] = "READY"
            dataset["exampleCount"] = str(rows)
            self.store.save_dataset(account, output_id, dataset)
        return body

    async def _run_lines(self, job: _Job, pending: collections.deque[InputLine]) -> str | None:
        """Run the pending lines; the reason it stopped early (CANCELLED, "deleted"), or None."""
        key = (job.account, job.job_id)
        tasks: dict[asyncio.Task, InputLine] = {}
        try:
            while pending or tasks:
                if key in self._stopping:
                    return self._stopping[key]
                if pending and self._has_room():
                    line = pending.popleft()
                    task = asyncio.create_task(self._run_line(job, line))
                    tasks[task] = line
                    self.num_in_flight += 1
                    await asyncio.sleep(0)  # let it reach the engine before looking again
                    continue
                if tasks:
                    finished, _ = await asyncio.wait(
                        tasks, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    finished = set()
                    await asyncio.sleep(POLL_S)
                for task in finished:
                    line = tasks.pop(task)
                    self.num_in_flight -= 1
                    if not task.result():
                        pending.append(line)  # refused for capacity: later
            return None
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.num_in_flight -= len(tasks)

    def _has_room(self) -> bool:
        admission = self.capacity.admission
        if admission.num_queued or self.capacity.paused():
            return False
        stats = self.capacity.engine_stats()
        if stats is not None and stats.get("num_waiting", 0) > 0:
            return False
        interactive = max(0, admission.num_active - self.num_in_flight)
        limit = min(self.max_in_flight, admission.max_active)
        return self.num_in_flight + interactive < limit

    async def _run_line(self, job: _Job, line: InputLine) -> bool:
        """Run one line and commit its result; False when it was refused for capacity."""
        label = f"batch-{job.job_id}-{line.line}"
        body = request_body(line, job.model, job.parameters)
        status, response, request_id, retry = await self.execute(
            line.url, job.account, job.key_id, body, label
        )
        if retry:
            await asyncio.sleep(RETRY_S)
            return False
        result = line_result(line, status, response, request_id)
        self.store.record_result(job.account, job.job_id, result)
        return True


def line_result(
    line: InputLine, status: int, response: dict[str, Any], request_id: str
) -> LineResult:
    """A line's output (OpenAI's batch output line: custom_id, response, error); `request_id`
    is the request's (its usage row's; an embeddings body has no id of its own)."""
    ok = status == 200
    error = None
    if not ok:
        detail = response.get("error") or {}
        error = {"code": detail.get("code"), "message": detail.get("message")}
    out = {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": line.custom_id,
        "response": {
            "status_code": status,
            "request_id": request_id,
            "body": response,
        },
        "error": error,
    }
    usage = response.get("usage") or {} if ok else {}
    # chat and completions count prompt/completion tokens; Responses and Messages input/output
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    return LineResult(
        line.line,
        line.custom_id,
        ok,
        out,
        int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0),
        int(usage.get("completion_tokens") or usage.get("output_tokens") or 0),
        int(details.get("cached_tokens") or usage.get("cache_read_input_tokens") or 0),
    )
