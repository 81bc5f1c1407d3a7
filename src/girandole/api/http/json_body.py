"""A request body parsed from JSON without holding the event loop for all of its parse: a large
one in a worker thread, parsed so that the loop runs between its values.

`json.loads` holds the GIL for the whole of its work (its C scanner runs no Python code), so in a
plain worker thread a 16 MB body of token ids still stopped every stream on the server for its
parse (0.5 s on an idle core; 1-3 s under load). Given Python hooks for its numbers and objects,
the scanner runs Python code at each one, and there the interpreter hands the GIL to a thread
that asked for it (after `sys.getswitchinterval()`, 5 ms): the event loop gets a turn between
values. The cyclic garbage collector is paused meanwhile: the millions of containers one body can
hold set off full collections, each a walk over all of them with the GIL held (16 MB of `[]`:
6.5 s with it, 1.1 s without). Strings and empty containers run no hook: a body of nothing else
still holds the loop while its C scanner runs (16 MB of short strings: about 0.4 s).
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from typing import Any

from girandole.api.http.validation import parse_json_object, reject_constant

# Bodies below this are parsed on the event loop (1 MiB: a few ms); larger ones in a thread.
OFF_LOOP_BYTES = 1 << 20


async def parse_json_body(raw: bytes) -> dict[str, Any]:
    """`parse_json_object(raw)`, a large body in a worker thread that lets the loop run."""
    if len(raw) < OFF_LOOP_BYTES:
        return parse_json_object(raw)
    return await asyncio.to_thread(_parse_yielding, raw)


def _parse_yielding(raw: bytes) -> dict[str, Any]:
    with _gc_paused():
        return parse_json_object(raw, _loads_yielding)


def _loads_yielding(text: str) -> Any:
    return json.loads(
        text,
        parse_constant=reject_constant,
        parse_int=_int,
        parse_float=_float,
        object_hook=_object,
    )


# Python functions, not the builtins: calling one is where the GIL can change hands.
def _int(digits: str) -> int:
    return int(digits)


def _float(text: str) -> float:
    return float(text)


def _object(value: dict[str, Any]) -> dict[str, Any]:
    return value


_gc_lock = threading.Lock()
_gc_pausers = 0  # parses under way that paused the collector


class _gc_paused:
    """The cyclic collector off while any large body is parsed (parses may overlap: the last
    to end turns it back on, if it was on before the first began)."""

    _was_enabled = False

    def __enter__(self) -> None:
        global _gc_pausers
        with _gc_lock:
            if _gc_pausers == 0:
                _gc_paused._was_enabled = gc.isenabled()
                gc.disable()
            _gc_pausers += 1

    def __exit__(self, *exc: object) -> None:
        global _gc_pausers
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_paused._was_enabled:
                gc.enable()
