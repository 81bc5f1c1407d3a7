"""JSON bodies that are always JSON: a non-finite float (NaN or infinity: a logprob or score of a
model or adapter with broken weights) is written as null. Python's json writes `NaN`, which no
JSON parser reads (a JavaScript client fails on the chunk), and Starlette's JSONResponse refuses
it (a 500). A numpy array is written as a list.

The API's bodies and stream events are written by orjson (`compact`, `compact_bytes`): compact,
text unescaped, non-finite floats null, an integer numpy array (a listed sampling mask, 262,144
ids a token on the default model) written in C. Python's json took ~30 ms of the event loop for
one such mask; every other stream waited meanwhile. What orjson refuses (a non-str dict key, an
int beyond 64 bits, a lone surrogate, a type it does not know) is written by Python's json as
before, so no body that was written before fails now."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
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
            return value.tolist()
        return finite(value.tolist())
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps(value: Any, **kw: Any) -> str:
    """json.dumps, with non-finite floats as null (the common case pays one strict attempt) and
    numpy arrays as lists: what orjson refuses is written by this, and `indent` or `sort_keys`
    need it."""
    try:
        return json.dumps(value, allow_nan=False, default=_array, **kw)
    except ValueError:
        return json.dumps(finite(value), allow_nan=False, default=_array, **kw)


def _orjson_default(value: Any) -> Any:
    """What orjson does not write itself, as json wrote it (anything else: TypeError, and
    the body goes to json)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biu":  # integers and bools: exact in C, no Python list made
            try:
                return orjson.Fragment(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))
            except orjson.JSONEncodeError:  # not C-contiguous, not native byte order, 0-d
                return value.tolist()
        # floats as Python floats, as before: orjson's own would write a float32 as its
        # shortest float32 text (0.1, where the value is 0.10000000149011612)
        return value.tolist()
    if isinstance(value, float):  # a float subclass (numpy.float64): json wrote it as a float
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def compact_bytes(value: Any) -> bytes:
    """`value` as the API writes JSON, UTF-8: no spaces, text unescaped, non-finite floats
    null."""
    try:
        return orjson.dumps(value, default=_orjson_default)
    except orjson.JSONEncodeError:  # a TypeError: what orjson refuses, json may write
        return _compact_json(value).encode("utf-8")


def compact(value: Any) -> str:
    """`compact_bytes` as text."""
    try:
        return orjson.dumps(value, default=_orjson_default).decode("utf-8")
    except orjson.JSONEncodeError:
        return _compact_json(value)


def _compact_json(value: Any) -> str:
    return dumps(value, ensure_ascii=False, separators=(",", ":"))


def render_in_pieces(body: dict[str, Any]) -> bytes:
    """FiniteJSONResponse's bytes for `body`, written one item of each top-level list at a time.
    Run in a thread, this lets the event loop in between items: one json.dumps of 2,048
    embedding vectors held the GIL for its whole half second (C code never yields it, orjson's
    neither), which stalled every other request's stream for as long."""
    fields = []
    for key, value in body.items():
        if isinstance(value, list):
            value_json = b"[" + b",".join(compact_bytes(item) for item in value) + b"]"
        else:
            value_json = compact_bytes(value)
        fields.append(compact_bytes(key) + b":" + value_json)
    return b"{" + b",".join(fields) + b"}"


class FiniteJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return compact_bytes(content)
