"""An evaluator's source uploaded as an archive (.tar.gz, .tgz, .tar or .zip, as Fireworks'
upload flow sends it): its text files read out, checked as fileContents are."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from girandole.evaluators.runner import check_file_name

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_SOURCE_BYTES = 10 * 1024 * 1024  # the files an archive holds, in all
_SKIPPED_PARTS = {"__pycache__", ".git", ".venv", "node_modules"}


class ArchiveError(ValueError):
    """An archive that cannot be read, or holds no usable file; the message says why."""


def _keep(name: str) -> bool:
    parts = name.split("/")
    return not any(p in _SKIPPED_PARTS for p in parts) and not name.endswith(".pyc")


def _members(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every regular file; links and devices are left out."""
    found: list[tuple[str, bytes]] = []
    total = 0

    def add(name: str, size: int, read) -> None:
        nonlocal total
        name = name.removeprefix("./")
        if not _keep(name):
            return
        total += size
        if total > MAX_SOURCE_BYTES:
            raise ArchiveError(f"the archive's files hold more than {MAX_SOURCE_BYTES} bytes")
        found.append((name, read()))

    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir():
                        add(info.filename, info.file_size, lambda i=info: archive.read(i))
        else:
            with tarfile.open(path, "r:*") as archive:
                for member in archive:
                    if member.isfile():
                        extracted = archive.extractfile(member)
                        add(member.name, member.size, lambda f=extracted: f.read())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ArchiveError(f"{path.name} is not a readable archive: {exc}") from None
    return found


def read_sources(paths: list[Path]) -> tuple[dict[str, str], list[str]]:
    """The text files of the archives (name -> source) and the names left out (not UTF-8 text).
    ArchiveError for an unreadable archive, a name outside the folder, or no file at all."""
    files: dict[str, str] = {}
    skipped: list[str] = []
    for path in paths:
        for name, data in _members(path):
            if error := check_file_name(name):
                raise ArchiveError(f"{path.name}: {error}")
            try:
                files[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(name)
    if not files:
        raise ArchiveError("the upload holds no text file")
    return files, skipped


def parse_entry_point(entry_point: str) -> tuple[str, str]:
    """Fireworks' entryPoint, `path/file.py::function` (or the file alone: `evaluate`), as
    (entry file, entry function); ValueError when it is neither."""
    file, _, func = entry_point.partition("::")
    func = func or "evaluate"
    if not file.endswith(".py") or not func.isidentifier():
        raise ValueError(f"entryPoint {entry_point!r} is not `file.py::function`")
    return file, func
