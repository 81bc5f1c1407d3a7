"""OpenAI's files (`/v1/files`) over the batch store's datasets: an uploaded file is a dataset of
one file (its id the file's), and a batch's results and errors are files of its output dataset,
listed once the batch has written them. The `files` table maps a file id to its dataset file and
keeps what OpenAI's file object says of it (name, purpose, size, creation time)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from girandole.batch.store import BatchStore, Run

# OpenAI's purposes of an uploaded file; a batch's own files are `batch_output`
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_OUTPUT = "batch_output"

_SCHEMA = """CREATE TABLE IF NOT EXISTS files (
    account TEXT NOT NULL,
    file_id TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    path TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (account, file_id)
)"""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    dataset_id: str
    path: str  # the file's name in its dataset's folder
    filename: str  # as uploaded
    purpose: str
    bytes: int
    created: float

    def json(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {
            "id": self.file_id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created),
            "expires_at": None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def disk_name(filename: str) -> str:
    """A name safe in a dataset's folder for an uploaded file's name."""
    name = _UNSAFE.sub("_", filename)[:200].lstrip(".")
    return name or "file.jsonl"


def is_uploaded_file(batch: BatchStore, account: str, dataset_id: str) -> bool:
    """Whether the dataset holds a file uploaded through OpenAI's Files API (its dataset has the
    file's id): a file's content is fixed, and a batch of it counts the lines of that one file."""
    if not batch.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'files'"):
        return False  # made by the first FileStore: no file was ever uploaded
    rows = batch.db.execute(
        "SELECT 1 FROM files WHERE account = ? AND file_id = ? AND dataset_id = ?",
        (account, dataset_id, dataset_id),
    )
    return bool(rows)


class FileStore:
    def __init__(self, batch: BatchStore) -> None:
        self.batch = batch
        self.db = batch.db
        self.db.execute(_SCHEMA)

    def add(
        self, account: str, file_id: str, dataset_id: str, path: str, filename: str,
        purpose: str,
    ) -> FileRecord | None:  # fmt: skip
        """Name a dataset's file (already written) as a file; once: a second add of an id
        keeps the first. None when there is no such file (a batch's output file deleted)."""
        found = self.get(account, file_id)
        if found is not None:
            return found
        on_disk = self.batch.dataset_dir(account, dataset_id) / path
        if not on_disk.is_file():
            return None
        size = on_disk.stat().st_size
        self.db.execute(
            "INSERT INTO files (account, file_id, dataset_id, path, filename, purpose, bytes,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (account, file_id, dataset_id, path, filename, purpose, size, time.time()),
        )
        return self.get(account, file_id)

    def add_upload(
        self, account: str, file_id: str, dataset: dict[str, Any], path: str, filename: str,
        purpose: str, partial: Path,
    ) -> FileRecord:  # fmt: skip
        """Store an uploaded file (written whole to `partial`) as a new dataset of that one file,
        `dataset` its body (READY, its lines counted), and name it as a file, at once: a server
        killed meanwhile leaves the upload whole or nothing (it left a dataset UPLOADING for
        good, its bytes on disk, no file naming it, when these were three steps)."""
        size = partial.stat().st_size

        def name_file(run: Run) -> None:
            run(
                "INSERT INTO files (account, file_id, dataset_id, path, filename, purpose, bytes,"
                " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (account, file_id, file_id, path, filename, purpose, size, time.time()),
            )

        if not self.batch.add_dataset(account, file_id, dataset, {path: partial}, name_file):
            raise ValueError(f"dataset {file_id} exists")  # a new uuid: never
        found = self.get(account, file_id)
        assert found is not None  # written just now
        return found

    def get(self, account: str, file_id: str) -> FileRecord | None:
        rows = self.db.execute(
            "SELECT file_id, dataset_id, path, filename, purpose, bytes, created FROM files"
            " WHERE account = ? AND file_id = ?",
            (account, file_id),
        )
        return FileRecord(*rows[0]) if rows else None

    def list(self, account: str, purpose: str | None = None) -> list[FileRecord]:
        """The account's files, newest first."""
        where, params = "account = ?", [account]
        if purpose is not None:
            where, params = where + " AND purpose = ?", [account, purpose]
        rows = self.db.execute(
            "SELECT file_id, dataset_id, path, filename, purpose, bytes, created FROM files"
            f" WHERE {where} ORDER BY created DESC, file_id DESC",
            tuple(params),
        )
        return [FileRecord(*row) for row in rows]

    def delete(self, account: str, file_id: str) -> bool:
        """Forget a file and remove its bytes (with its dataset, when it was an upload)."""
        found = self.get(account, file_id)
        if found is None:
            return False

        def forget(run: Run) -> None:
            run("DELETE FROM files WHERE account = ? AND file_id = ?", (account, file_id))

        if found.dataset_id == file_id:
            # an upload: its dataset is the file, both gone at once (a kill between the two
            # left the dataset and its bytes, with no file naming it)
            self.batch.delete_dataset(account, file_id, forget)
        else:
            with self.db.transaction() as run:
                forget(run)
            self.path_of(account, found).unlink(missing_ok=True)
        return True

    def path_of(self, account: str, record: FileRecord) -> Path:
        return self.batch.dataset_dir(account, record.dataset_id) / record.path
