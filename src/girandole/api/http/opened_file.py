"""A stored file's bytes as a response, read from the file opened while the request is answered.

Starlette's FileResponse opens the path only once it has sent the status line (its length from
an earlier stat): a file deleted (DELETE /v1/files/{id}) or replaced (a dataset file PUT again)
in between was a 500, or a 200 whose body was cut. An open file stays readable on POSIX
whatever happens to its path, so the bytes sent are the whole file as it was when opened."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fastapi.responses import StreamingResponse

CHUNK = 64 * 1024


def _chunks(file: BinaryIO, size: int) -> Iterator[bytes]:
    """The file's first `size` bytes (the length the headers said), then it is closed."""
    with file:
        left = size
        while left > 0:
            chunk = file.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def opened_file_response(path: Path, media_type: str) -> StreamingResponse | None:
    """The regular file at `path` as a response, or None when there is none (gone already)."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed by _chunks once sent
    except OSError:  # deleted, or never a file
        return None
    info = os.fstat(file.fileno())
    if not stat.S_ISREG(info.st_mode):
        file.close()
        return None
    # a sync iterator: Starlette reads it in a thread, off the event loop
    return StreamingResponse(
        _chunks(file, info.st_size),
        media_type=media_type,
        headers={"content-length": str(info.st_size)},
    )
