"""The files of models uploaded over REST (`:getUploadEndpoint` URLs): one folder a model,
`<data_dir>/model-uploads/<account>/<model_id>/`, its files flat in it. A file arrives in a
temporary file first (`.partial/`) and joins its folder whole, under a lock that a delete and a
validation take too: a validation never sees half of a file, and a deleted model's folder gets
no file afterwards."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path


class ModelFiles:
    def __init__(self, folder: str | Path, exists: Callable[[str, str], bool]) -> None:
        """`exists(account, model_id)`: whether the catalog has that model (folders of models
        it does not have are a stopped server's leftovers, removed here)."""
        self.folder = Path(folder).resolve()  # compared with models' (resolved) sources
        self.lock = threading.Lock()
        for leftover in (self.folder / ".partial").glob("*"):
            leftover.unlink(missing_ok=True)
        if self.folder.is_dir():
            for account in self.folder.iterdir():
                if account.name.startswith(".") or not account.is_dir():
                    continue
                for model in account.iterdir():
                    if model.is_dir() and not exists(account.name, model.name):
                        shutil.rmtree(model, ignore_errors=True)

    def model_dir(self, account: str, model_id: str) -> Path:
        return self.folder / account / model_id

    def partial_path(self) -> Path:
        """A new temporary file for bytes on their way into a model's folder."""
        folder = self.folder / ".partial"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / uuid.uuid4().hex

    def place(
        self, account: str, model_id: str, name: str, partial: Path, check: Callable[[], None]
    ) -> None:
        """Move a written temporary file into the model's folder as `name`; `check` runs first,
        under the lock, and may refuse by raising (the model deleted or validated meanwhile)."""
        try:
            with self.lock:
                check()
                folder = self.model_dir(account, model_id)
                folder.mkdir(parents=True, exist_ok=True)
                os.replace(partial, folder / name)
        finally:
            partial.unlink(missing_ok=True)

    def holds(self, source: str | None, account: str, model_id: str) -> bool:
        """Whether a model's source is its upload folder here (never a folder of the user's,
        as `girandole models add` records)."""
        if source is None:
            return False
        return Path(source).resolve().is_relative_to(self.model_dir(account, model_id))

    def remove(self, account: str, model_id: str) -> None:
        """The model's folder and files (call under the lock)."""
        shutil.rmtree(self.model_dir(account, model_id), ignore_errors=True)
