"""Datasets and batch jobs in the server's database (girandole.db), dataset files under
`<data_dir>/datasets/<account>/<dataset_id>/`.

A job's result rows (`batch_results`) are keyed by (account, job, input line): a line's result
is committed before it counts, and a line with a row is never run again, so a job killed
halfway and resumed gives every custom_id exactly once. The output dataset's files
(`results.jsonl`, `errors.jsonl`) are written from these rows when the job ends.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from girandole.registry.deployments import format_time
from girandole.registry.keystore import Database

RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"

# JOB_STATE_* values a job passes through here (Fireworks' enum has more)
CREATING = "JOB_STATE_CREATING"
PENDING = "JOB_STATE_PENDING"
RUNNING = "JOB_STATE_RUNNING"
WRITING_RESULTS = "JOB_STATE_WRITING_RESULTS"
COMPLETED = "JOB_STATE_COMPLETED"
FAILED = "JOB_STATE_FAILED"
CANCELLED = "JOB_STATE_CANCELLED"
RUNNABLE = (PENDING, RUNNING, WRITING_RESULTS)  # picked up again after a restart
FINAL = (COMPLETED, FAILED, CANCELLED)
# a job made through another API's batches keeps that API's fields under its name
OTHER_APIS = ("openai", "anthropic")

# the jobs made through another API's batches; a query names the same text as its partial
# index's WHERE, which SQLite needs to use the index
_MADE_BY = {api: f"json_type(body, '$.{api}') IS NOT NULL" for api in OTHER_APIS}

# a statement run inside a transaction (Database.transaction's `run`)
Run = Callable[[str, tuple], list[tuple]]
# statements a caller adds to a store's transaction
Write = Callable[[Run], None]

# a job's place in the lists: (created, job_id), the id breaking ties of the same instant
JobKey = tuple[float, str]

_FILENAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS datasets (
        account TEXT NOT NULL,
        dataset_id TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (account, dataset_id)
    )""",
    """CREATE TABLE IF NOT EXISTS batch_jobs (
        account TEXT NOT NULL,
        job_id TEXT NOT NULL,
        key_id TEXT,
        created REAL NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (account, job_id)
    )""",
    """CREATE TABLE IF NOT EXISTS batch_results (
        account TEXT NOT NULL,
        job_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        custom_id TEXT NOT NULL,
        ok INTEGER NOT NULL,
        body TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, job_id, line)
    )""",
    # the runner's look for work every 5 s (runnable_jobs): the few jobs not ended, among
    # every job ever made, without reading them all
    "CREATE INDEX IF NOT EXISTS batch_jobs_state ON batch_jobs (json_extract(body, '$.state'))",
    # a list page reads its own rows: the account's jobs in (created, job_id) order, all of
    # them (Fireworks' list) or those made through one API (OpenAI's, Anthropic's batches)
    "CREATE INDEX IF NOT EXISTS batch_jobs_created ON batch_jobs (account, created, job_id)",
    *(
        f"CREATE INDEX IF NOT EXISTS batch_jobs_{api} ON batch_jobs (account, created, job_id)"
        f" WHERE {_MADE_BY[api]}"
        for api in OTHER_APIS
    ),
    # job_reading, under the lock every dataset upload takes: the jobs of one input dataset
    "CREATE INDEX IF NOT EXISTS batch_jobs_input"
    " ON batch_jobs (account, json_extract(body, '$.inputDatasetId'))",
)


def dataset_name(account: str, dataset_id: str) -> str:
    return f"accounts/{account}/datasets/{dataset_id}"


def job_name(account: str, job_id: str) -> str:
    return f"accounts/{account}/batchInferenceJobs/{job_id}"


def is_valid_filename(name: str) -> bool:
    return bool(_FILENAME.match(name)) and name not in (".", "..")


def now_text() -> str:
    return format_time(time.time()) or ""


@dataclass(frozen=True)
class LineResult:
    """What one input line gave: the output (or error) file's line and its token counts."""

    line: int
    custom_id: str
    ok: bool
    body: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class BatchStore:
    """The datasets, batch_jobs and batch_results tables, and the dataset files."""

    def __init__(self, db: Database, folder: str | Path) -> None:
        self.db = db
        self.folder = Path(folder)
        # a dataset's row and files change together under it (a file placed, the dataset
        # deleted, its body updated): held briefly, never while bytes are written
        self.lock = threading.Lock()
        # (account, dataset id) of the inputs a job being created counts now (under the lock)
        self._counting: collections.Counter[tuple[str, str]] = collections.Counter()
        for statement in _SCHEMA:
            db.execute(statement)
        # bytes a stopped server was writing (partial_path): nothing will place them now
        for leftover in (self.folder / ".partial").glob("*"):
            leftover.unlink(missing_ok=True)
        self._remove_orphan_folders()

    def _remove_orphan_folders(self) -> None:
        """Remove the dataset folders no dataset row names: a server killed between placing a
        new dataset's files and committing its row (add_dataset), or between deleting a row and
        its files, left them, read and deleted by no request."""
        if not self.folder.is_dir():
            return
        rows = set(self.db.execute("SELECT account, dataset_id FROM datasets"))
        for account in self.folder.iterdir():
            if account.name.startswith(".") or not account.is_dir():
                continue
            for folder in account.iterdir():
                if folder.is_dir() and (account.name, folder.name) not in rows:
                    shutil.rmtree(folder, ignore_errors=True)

    # -- datasets ----------------------------------------------------------------------------

    def dataset_dir(self, account: str, dataset_id: str) -> Path:
        return self.folder / account / dataset_id

    def insert_dataset(self, account: str, dataset_id: str, body: dict[str, Any]) -> bool:
        """False when a dataset of that id exists. A new dataset starts with no files (any
        left in its folder by an earlier dataset of that id are removed)."""
        return self.add_dataset(account, dataset_id, body, {})

    def add_dataset(
        self,
        account: str,
        dataset_id: str,
        body: dict[str, Any],
        files: dict[str, Path],
        also: Write | None = None,
    ) -> bool:
        """Create a dataset with its files at once (add_datasets, of one)."""
        return self.add_datasets(account, {dataset_id: (body, files)}, also)

    def add_datasets(
        self,
        account: str,
        datasets: dict[str, tuple[dict[str, Any], dict[str, Path]]],
        also: Callable[[Run], bool | None] | None = None,
    ) -> bool:
        """Create datasets with their files at once (id -> (body, files): the written
        temporary files, name -> partial_path): the files are moved into their folders, then
        the rows committed, with what `also` writes in the same transaction. A kill in between
        leaves folders no row names, which the next start removes: the datasets are there
        whole or not at all. False (nothing written) when one of them exists, or `also`
        returns False. The temporary files are gone either way."""
        try:
            with self.lock:  # datasets are made under it: none appears between check and insert
                if any(self.get_dataset(account, d) is not None for d in datasets):
                    return False
                try:
                    for dataset_id, (_, files) in datasets.items():
                        self._remove_files(account, dataset_id)  # an earlier dataset's of that id
                        folder = self.dataset_dir(account, dataset_id)
                        if files:
                            folder.mkdir(parents=True, exist_ok=True)
                        for name, partial in files.items():
                            os.replace(partial, folder / name)
                    with self.db.transaction() as run:
                        for dataset_id, (body, _) in datasets.items():
                            run(
                                "INSERT INTO datasets (account, dataset_id, body) VALUES (?, ?, ?)",
                                (account, dataset_id, json.dumps(body)),
                            )
                        if also is not None and also(run) is False:
                            raise _Refused
                except BaseException as exc:
                    for dataset_id in datasets:
                        self._remove_files(account, dataset_id)
                    if isinstance(exc, _Refused):
                        return False
                    raise
                return True
        finally:
            for _, files in datasets.values():
                for partial in files.values():
                    partial.unlink(missing_ok=True)

    def save_dataset(self, account: str, dataset_id: str, body: dict[str, Any]) -> None:
        body["updateTime"] = now_text()
        self.db.execute(
            "UPDATE datasets SET body = ? WHERE account = ? AND dataset_id = ?",
            (json.dumps(body), account, dataset_id),
        )

    def update_dataset(
        self, account: str, dataset_id: str, fields: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Set some fields of the dataset's body, the others as stored now (a writer that read
        the body before a wait must not undo what another wrote meanwhile); None: it is gone."""
        with self.lock:
            body = self.get_dataset(account, dataset_id)
            if body is None:
                return None
            body.update(fields)
            self.save_dataset(account, dataset_id, body)
            return body

    def get_dataset(self, account: str, dataset_id: str) -> dict[str, Any] | None:
        rows = self.db.execute(
            "SELECT body FROM datasets WHERE account = ? AND dataset_id = ?", (account, dataset_id)
        )
        return json.loads(rows[0][0]) if rows else None

    def list_datasets(self, account: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT body FROM datasets WHERE account = ? ORDER BY dataset_id", (account,)
        )
        return [json.loads(body) for (body,) in rows]

    def delete_dataset(self, account: str, dataset_id: str, also: Write | None = None) -> None:
        """Delete the dataset's row, with what `also` writes in the same transaction (the file
        naming it), then its files: a kill after the commit leaves a folder no row names, which
        the next start removes."""
        with self.lock:
            with self.db.transaction() as run:
                run(
                    "DELETE FROM datasets WHERE account = ? AND dataset_id = ?",
                    (account, dataset_id),
                )
                if also is not None:
                    also(run)
            self._remove_files(account, dataset_id)

    def _remove_files(self, account: str, dataset_id: str) -> None:
        folder = self.dataset_dir(account, dataset_id)
        if folder.is_dir():
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()

    def dataset_files(self, account: str, dataset_id: str) -> list[Path]:
        folder = self.dataset_dir(account, dataset_id)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def dataset_bytes(self, account: str, dataset_id: str) -> bytes:
        """The dataset's files one after another, as a batch job reads them: each ends at a
        newline (the last line of a file without one would run into the next file's first)."""
        parts = []
        for path in self.dataset_files(account, dataset_id):
            data = path.read_bytes()
            parts.append(data if data.endswith(b"\n") or not data else data + b"\n")
        return b"".join(parts)

    @contextlib.contextmanager
    def counting_input(self, account: str, dataset_id: str) -> Iterator[None]:
        """While a job being created counts its input's lines, until it is saved: a file that
        would join the dataset meanwhile (`input_counted`) is refused, as it is once the job
        exists; a file that joined after the count made the job's totalInputRequests stale."""
        key = (account, dataset_id)
        with self.lock:
            self._counting[key] += 1
        try:
            yield
        finally:
            with self.lock:
                self._counting[key] -= 1
                if not self._counting[key]:
                    del self._counting[key]

    def input_counted(self, account: str, dataset_id: str) -> bool:
        """Whether a job being created counts the dataset's lines now (asked under the lock)."""
        return (account, dataset_id) in self._counting

    def partial_path(self) -> Path:
        """A new temporary file for bytes on their way into a dataset: outside the datasets'
        folders, which a delete removes whole (a half-written file in one made its rmdir fail,
        and the writer's rename then)."""
        folder = self.folder / ".partial"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / uuid.uuid4().hex

    def place_file(
        self,
        account: str,
        dataset_id: str,
        filename: str,
        partial: Path,
        check: Callable[[], None] | None = None,
    ) -> Path:
        """Move a written temporary file into the dataset as `filename`, under the lock a
        delete takes; `check` runs first, under it, and may refuse by raising (the dataset
        deleted while the bytes arrived). The temporary file is gone afterwards either way."""
        try:
            with self.lock:
                if check is not None:
                    check()
                folder = self.dataset_dir(account, dataset_id)
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / filename
                os.replace(partial, path)
                return path
        finally:
            partial.unlink(missing_ok=True)

    def write_file(
        self,
        account: str,
        dataset_id: str,
        filename: str,
        data: bytes,
        check: Callable[[], None] | None = None,
    ) -> Path:
        """Write a dataset file whole (through a temporary file: a reader never sees half);
        `check`: as place_file's."""
        return self.place_file(account, dataset_id, filename, self.written(data), check)

    def written(self, data: bytes) -> Path:
        """A new temporary file (partial_path) holding `data`, synced."""
        partial = self.partial_path()
        try:
            with open(partial, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return partial

    # -- jobs --------------------------------------------------------------------------------

    def insert_job(
        self,
        account: str,
        job_id: str,
        key_id: str | None,
        body: dict,
        datasets: dict[str, tuple[dict[str, Any], dict[str, Path]]] | None = None,
    ) -> bool:
        """Save a new job with the new datasets it reads and writes (as add_datasets takes
        them: a message batch's requests, a job's output) in one transaction: a kill between
        them left datasets of no job (a retried create found the output's id taken). False
        (nothing written) when the job or one of the datasets exists."""

        def save_job(run: Run) -> bool:
            return _insert_job_row(run, account, job_id, key_id, body)

        return self.add_datasets(account, datasets or {}, save_job)

    def save_job(self, account: str, job_id: str, body: dict[str, Any]) -> None:
        body["updateTime"] = now_text()
        for api in OTHER_APIS:  # a job made by OpenAI's or Anthropic's batch API: when it
            if api in body:  # entered each state
                body[api].setdefault("times", {}).setdefault(body["state"], time.time())
        self.db.execute(
            "UPDATE batch_jobs SET body = ? WHERE account = ? AND job_id = ?",
            (json.dumps(body), account, job_id),
        )

    def get_job(self, account: str, job_id: str) -> dict[str, Any] | None:
        rows = self.db.execute(
            "SELECT body FROM batch_jobs WHERE account = ? AND job_id = ?", (account, job_id)
        )
        return self.with_progress(account, job_id, json.loads(rows[0][0])) if rows else None

    def job_key(self, account: str, job_id: str) -> str | None:
        rows = self.db.execute(
            "SELECT key_id FROM batch_jobs WHERE account = ? AND job_id = ?", (account, job_id)
        )
        return rows[0][0] if rows else None

    def list_jobs(self, account: str) -> list[dict[str, Any]]:
        """The account's jobs, oldest first, each with its progress (one query for all of
        them: a query per job made a list of 5,000 jobs take 0.42 s). A list route with a
        filter or orderBy reads this; a plain page reads only its own jobs (page_jobs)."""
        rows = self.db.execute(
            "SELECT job_id, body FROM batch_jobs WHERE account = ? ORDER BY created, job_id",
            (account,),
        )
        sums = {
            job_id: tuple(values)
            for job_id, *values in self.db.execute(
                f"SELECT job_id, {_PROGRESS_SUMS} FROM batch_results WHERE account = ?"
                " GROUP BY job_id",
                (account,),
            )
        }
        return [
            _with_progress(json.loads(body), sums.get(job_id, _NO_RESULTS)) for job_id, body in rows
        ]

    def page_jobs(
        self,
        account: str,
        limit: int,
        *,
        api: str | None = None,
        above: JobKey | None = None,
        below: JobKey | None = None,
        descending: bool = False,
        offset: int = 0,
    ) -> list[tuple[JobKey, dict[str, Any]]]:
        """Up to `limit` of the account's jobs, each with its key and progress, in key order
        (`descending`: newest first): those whose key is past `above` and before `below`,
        skipping `offset` (an old offset page token); `api`: only the jobs made through that
        API's batches. Reads those rows and their results only, by the (account, created,
        job_id) indexes, however long the account's history (list_jobs read all of it)."""
        where = "account = ?"
        params: list[Any] = [account]
        if api is not None:
            where += f" AND {_MADE_BY[api]}"
        if above is not None:
            where += " AND (created, job_id) > (?, ?)"
            params += above
        if below is not None:
            where += " AND (created, job_id) < (?, ?)"
            params += below
        way = "DESC" if descending else "ASC"
        rows = self.db.execute(
            f"SELECT created, job_id, body FROM batch_jobs WHERE {where}"
            f" ORDER BY created {way}, job_id {way} LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        sums = self._progress_sums(account, [job_id for _, job_id, _ in rows])
        return [
            ((created, job_id), _with_progress(json.loads(body), sums.get(job_id, _NO_RESULTS)))
            for created, job_id, body in rows
        ]

    def _progress_sums(self, account: str, job_ids: list[str]) -> dict[str, tuple[int, ...]]:
        """The `_PROGRESS_SUMS` of these jobs' result rows, by the results' primary key."""
        sums: dict[str, tuple[int, ...]] = {}
        for start in range(0, len(job_ids), 500):  # under any SQLite's limit of variables
            chunk = job_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for job_id, *values in self.db.execute(
                f"SELECT job_id, {_PROGRESS_SUMS} FROM batch_results"
                f" WHERE account = ? AND job_id IN ({marks}) GROUP BY job_id",
                (account, *chunk),
            ):
                sums[job_id] = tuple(values)
        return sums

    def count_jobs(self, account: str) -> int:
        """How many jobs the account has (Fireworks' totalSize), from the index alone."""
        return self.db.execute("SELECT COUNT(*) FROM batch_jobs WHERE account = ?", (account,))[0][
            0
        ]

    def key_of(self, account: str, job_id: str, api: str, api_id: str) -> JobKey | None:
        """The key of the job made through `api` whose id there is `api_id` (a list's cursor);
        None when there is none."""
        rows = self.db.execute(
            "SELECT created FROM batch_jobs WHERE account = ? AND job_id = ?"
            f" AND json_extract(body, '$.{api}.id') = ?",
            (account, job_id, api_id),
        )
        return (rows[0][0], job_id) if rows else None

    def job_reading(self, account: str, dataset_id: str) -> dict[str, Any] | None:
        """A job that still needs the dataset as its input: one that has not ended (it reads
        the file again when it resumes after a restart), or a message batch (its results are
        read against its requests until the batch is deleted)."""
        # by the input index: every upload asks this under the store's lock
        marks = ", ".join("?" * len(FINAL))
        rows = self.db.execute(
            "SELECT job_id, body FROM batch_jobs"
            " WHERE account = ? AND json_extract(body, '$.inputDatasetId') = ?"
            f" AND (json_extract(body, '$.state') IS NULL"
            f" OR json_extract(body, '$.state') NOT IN ({marks}) OR {_MADE_BY['anthropic']})"
            # `+`: sort the few found (by the index of created, SQLite scanned every job)
            " ORDER BY +created, +job_id LIMIT 1",
            (account, dataset_name(account, dataset_id), *FINAL),
        )
        if not rows:
            return None
        job_id, body = rows[0]
        return self.with_progress(account, job_id, json.loads(body))

    def unwritten_outputs(self) -> list[tuple[str, str, str]]:
        """(account, job id, state) of the cancelled and failed jobs whose output dataset was
        never written: the server stopped between a cancel and the runner writing what was done,
        or an older server failed the job without writing it (it stayed UPLOADING)."""
        # asked once at start-up: those jobs by the state index and their output datasets by
        # primary key, not every job ever made parsed in Python
        rows = self.db.execute(
            "SELECT j.account, j.job_id, json_extract(j.body, '$.state') FROM batch_jobs j"
            " JOIN datasets d ON d.account = j.account AND d.dataset_id = substr("
            "json_extract(j.body, '$.outputDatasetId'),"
            " length('accounts/' || j.account || '/datasets/') + 1)"
            " WHERE json_extract(j.body, '$.state') IN (?, ?)"
            " AND json_extract(d.body, '$.state') IS NOT 'READY'"
            " ORDER BY j.created",
            (CANCELLED, FAILED),
        )
        return [(account, job_id, state) for account, job_id, state in rows]

    def runnable_jobs(self) -> list[tuple[str, str]]:
        """(account, job id) of the jobs to run, oldest first."""
        # by the state index, not by parsing every job ever made: ended jobs stay (OpenAI's
        # batches cannot be deleted), and the runner asks every 5 s, on the event loop
        marks = ", ".join("?" * len(RUNNABLE))
        rows = self.db.execute(
            "SELECT account, job_id FROM batch_jobs"
            f" WHERE json_extract(body, '$.state') IN ({marks}) ORDER BY created",
            RUNNABLE,
        )
        return [(a, j) for a, j in rows]

    def delete_job(self, account: str, job_id: str, datasets: tuple[str, ...] = ()) -> None:
        """Delete a job, its results and the `datasets` (its own: a message batch's requests
        and results) in one transaction, then their files: a kill midway left a job without
        its results (its progress 0), or datasets of a job that no longer exists."""
        with self.lock:
            with self.db.transaction() as run:
                run("DELETE FROM batch_results WHERE account = ? AND job_id = ?", (account, job_id))
                run("DELETE FROM batch_jobs WHERE account = ? AND job_id = ?", (account, job_id))
                for dataset_id in datasets:
                    run(
                        "DELETE FROM datasets WHERE account = ? AND dataset_id = ?",
                        (account, dataset_id),
                    )
            for dataset_id in datasets:
                self._remove_files(account, dataset_id)

    # -- results -----------------------------------------------------------------------------

    def record_result(self, account: str, job_id: str, result: LineResult) -> bool:
        """Commit one line's result; False when the line already has one (it never runs twice)
        or the job no longer runs (cancelled or deleted while the line ran)."""
        rows = self.db.execute(
            "INSERT INTO batch_results (account, job_id, line, custom_id, ok, body, prompt_tokens,"
            " completion_tokens, cached_tokens) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?"
            " WHERE EXISTS (SELECT 1 FROM batch_jobs WHERE account = ? AND job_id = ?"
            " AND json_extract(body, '$.state') = ?)"
            " ON CONFLICT DO NOTHING RETURNING line",
            (
                account,
                job_id,
                result.line,
                result.custom_id,
                int(result.ok),
                json.dumps(result.body, separators=(",", ":")),
                result.prompt_tokens,
                result.completion_tokens,
                result.cached_tokens,
                account,
                job_id,
                RUNNING,
            ),
        )
        return bool(rows)

    def done_lines(self, account: str, job_id: str) -> set[int]:
        rows = self.db.execute(
            "SELECT line FROM batch_results WHERE account = ? AND job_id = ?", (account, job_id)
        )
        return {line for (line,) in rows}

    def result_lines(self, account: str, job_id: str, ok: bool) -> list[str]:
        rows = self.db.execute(
            "SELECT body FROM batch_results WHERE account = ? AND job_id = ? AND ok = ?"
            " ORDER BY line",
            (account, job_id, int(ok)),
        )
        return [body for (body,) in rows]

    def results_by_line(self, account: str, job_id: str) -> dict[int, tuple[bool, str]]:
        """Each line's result so far: (ok, its output line as JSON text)."""
        rows = self.db.execute(
            "SELECT line, ok, body FROM batch_results WHERE account = ? AND job_id = ?",
            (account, job_id),
        )
        return {line: (bool(ok), body) for line, ok, body in rows}

    def with_progress(self, account: str, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """The job with its `jobProgress` counted from its result rows."""
        sums = self.db.execute(
            f"SELECT {_PROGRESS_SUMS} FROM batch_results WHERE account = ? AND job_id = ?",
            (account, job_id),
        )[0]
        return _with_progress(body, sums)

    def write_outputs(self, account: str, job_id: str, output_dataset_id: str) -> int:
        """The output dataset's results.jsonl and errors.jsonl from the result rows; the number
        of result lines. None is written to a dataset deleted meanwhile (a cancelled job's, which
        may be deleted at once): its folder came back, files no request could read or delete."""

        def exists() -> None:
            if self.get_dataset(account, output_dataset_id) is None:
                raise _Gone

        count = 0
        for ok, filename in ((True, RESULTS_FILE), (False, ERRORS_FILE)):
            lines = self.result_lines(account, job_id, ok)
            data = "".join(line + "\n" for line in lines).encode()
            try:
                self.write_file(account, output_dataset_id, filename, data, exists)
            except _Gone:
                pass
            if ok:
                count = len(lines)
        return count


class _Gone(Exception):
    """A dataset deleted while a file was on its way into it."""


class _Refused(Exception):
    """What add_datasets' `also` refused (its transaction rolled back)."""


def _insert_job_row(
    run: Run,
    account: str,
    job_id: str,
    key_id: str | None,
    body: dict[str, Any],
) -> bool:
    """Insert a new job's row inside the caller's transaction; False when the job exists."""
    rows = run(
        "INSERT INTO batch_jobs (account, job_id, key_id, created, body) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING RETURNING job_id",
        (account, job_id, key_id, time.time(), json.dumps(body)),
    )
    return bool(rows)


# a job's result rows summed: processed, succeeded, prompt, completion and cached tokens
_PROGRESS_SUMS = (
    "COUNT(*), COALESCE(SUM(ok), 0), COALESCE(SUM(prompt_tokens), 0),"
    " COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cached_tokens), 0)"
)
_NO_RESULTS = (0, 0, 0, 0, 0)


def _with_progress(body: dict[str, Any], sums: tuple[int, ...]) -> dict[str, Any]:
    """`body` with its `jobProgress` from its result rows' `_PROGRESS_SUMS`."""
    processed, succeeded, prompt, completion, cached = sums
    total = int(body.get("jobProgress", {}).get("totalInputRequests") or 0)
    body["jobProgress"] = {
        "percent": int(100 * processed / total) if total else 0,
        "epoch": 0,
        "totalInputRequests": total,
        "totalProcessedRequests": processed,
        "successfullyProcessedRequests": succeeded,
        "failedRequests": processed - succeeded,
        "outputRows": succeeded,
        "inputTokens": prompt,
        "outputTokens": completion,
        "cachedInputTokenCount": cached,
    }
    return body
