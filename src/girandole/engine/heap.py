"""Give the C heap's free pages back to the system after a load.

A tokenizer's load parses its JSON in the tokenizers library (the default model's file is 31 MiB:
about 290 MiB allocated on the way, 85 MiB kept), and the copy that encodes special-token strings
as text (`Tokenizer._plain`) costs as much again. glibc keeps what was freed in its arenas, and
the arena of a thread other than the main one (a server loads its model on a thread) is not
trimmed on its own: the default model's server held about 460 MiB it no longer used.
`malloc_trim(0)` hands every arena's free pages back. Elsewhere (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> None:
    """Return the C heap's free memory to the system (a few ms; ctypes drops the GIL meanwhile)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
