"""One parse of a GGUF file per process: opening one parses its whole vocabulary (about 9 s for
Gemma's 262k tokens), and both the tokenizer and the weight loader need it."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf raises bare ValueError/struct errors on damaged files
        raise ValueError(f"not a valid GGUF file: {path} ({exc})") from exc


def open_gguf(path: str | os.PathLike):
    """The parsed `gguf.GGUFReader` of `path`, shared by every caller in this process."""
    p = Path(path)
    st = p.stat()
    return _open(str(p.resolve()), st.st_mtime_ns, st.st_size)


def file_key(path: str | os.PathLike) -> str:
    """A cheap key for cached artefacts derived from a model file: name, size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p.stem}-{st.st_size}-{st.st_mtime_ns}"
