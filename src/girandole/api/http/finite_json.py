"""JSON bodies that are always JSON: a non-finite float (NaN or infinity: a logprob or score of a
model or adapter with broken weights) is written as null. Python's json writes `NaN`, which no
JSON parser reads (a JavaScript client fails on the chunk), and Starlette's JSONResponse refuses
it (a 500). A numpy array is written as a list."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse


def finite(value: Any) -> Any:
    """`value` with every non-finite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _array(value: Any) -> Any:
    """A numpy array as a JSON list, made as the encoder reaches it: a body may hold many
    large ones (listed sampling masks, a whole vocabulary each) that would take several times
    their size as Python lists all at once."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biu":  # integers (mask ids): nothing to check, item by item
            return value.tolist()  # in Python (262,144 of them a token: most of its cost)
        return finite(value.tolist())
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps(value: Any, **kw: Any) -> str:
    """json.dumps, with non-finite floats as null (the common case pays one strict attempt) and
    numpy arrays as lists."""
    try:
        return json.dumps(value, allow_nan=False, default=_array, **kw)
    except ValueError:
        return json.dumps(finite(value), allow_nan=False, default=_array, **kw)


def compact(value: Any) -> str:
    """`value` as the API writes JSON: no spaces, text unescaped, non-finite floats null."""
    return dumps(value, ensure_ascii=False, separators=(",", ":"))


def render_in_pieces(body: dict[str, Any]) -> bytes:
    """FiniteJSONResponse's bytes for `body`, written one item of each top-level list at a time.
    Run in a thread, this lets the event loop in between items: one json.dumps of 2,048
    embedding vectors holds the GIL for its whole half second (C code never yields it), which
    stalled every other request's stream for as long."""
    fields = []
    for key, value in body.items():
        if isinstance(value, list):
            value_json = "[" + ",".join(compact(item) for item in value) + "]"
        else:
            value_json = compact(value)
        fields.append(f"{compact(key)}:{value_json}")
    return ("{" + ",".join(fields) + "}").encode("utf-8")


class FiniteJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return compact(content).encode("utf-8")
