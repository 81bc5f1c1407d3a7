"""A request body from bytes to a validated model: the size limit, JSON, then the schema, each
failure a 400 (413 for size) that says what is wrong."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from girandole.api.http.disconnect import ClientDisconnected
from girandole.api.http.errors import (
    MAX_ERRORS_LISTED,
    APIError,
    bad_request,
    first_field,
    format_errors,
    payload_too_large,
    unsupported_media_type,
)

M = TypeVar("M", bound=BaseModel)

# A surrogate escape (\ud800 to \udfff): the only way JSON text that is valid UTF-8 can hold
# an unpaired surrogate. (An escaped backslash before "ud800" matches too: a scan for nothing.)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


async def read_body(request: Request, limit: int) -> bytes:
    """The body of a JSON request: 415 for another Content-Type, charset or a Content-Encoding,
    413 above `limit`; ClientDisconnected (a 499, the client's fault) when the client leaves
    while sending it."""
    check_content_type(request.headers.get("content-type"))
    check_content_encoding(request.headers.get("content-encoding"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise payload_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return b"".join(chunks)


def check_content_type(content_type: str | None) -> None:
    """JSON, or no Content-Type at all (curl -d without -H sends form-urlencoded: that is a 415
    too, so the mistake shows)."""
    if content_type is None:
        return
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        _check_charset(params)
        return
    raise unsupported_media_type(
        f"Content-Type {content_type.split(';', 1)[0].strip()!r} is not supported: send the body"
        " as JSON with 'Content-Type: application/json'"
    )


def _check_charset(params: str) -> None:
    """JSON is UTF-8 (RFC 8259): another charset would fail as "not valid UTF-8" at some byte."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() != "charset":
            continue
        charset = value.strip().strip('"').lower()
        if charset not in ("utf-8", "utf8"):
            raise unsupported_media_type(
                f"charset {value.strip()!r} is not supported: send the JSON body as UTF-8"
                " ('Content-Type: application/json; charset=utf-8')"
            )


def check_content_encoding(encoding: str | None) -> None:
    """Bodies are read as sent: a compressed one would fail as "not valid UTF-8" at byte 1."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return
    raise unsupported_media_type(
        f"Content-Encoding {encoding.strip()!r} is not supported: send the body uncompressed"
    )


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes, loads: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it. `loads`:
    how the text is parsed (None: `json.loads`; a large body: girandole.api.http.json_body)."""
    if not raw.strip():
        raise bad_request("Request body is empty: expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"Request body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        if loads is None:
            data = json.loads(text, parse_constant=reject_constant)
        else:
            data = loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request(f"Request body must be a JSON object, got {type(data).__name__}")
    # the scan builds a path per value: seconds for a large body, so only when it can find one
    if _SURROGATE_ESCAPE.search(text):
        _check_strings(data, "")
    return data


def _check_strings(value: Any, path: str) -> None:
    """JSON may spell unpaired UTF-16 surrogates ("\\ud800"); no tokenizer can take them."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                # the path may hold the surrogate itself (an object key): escaped, or the
                # error body could not be written (a 500)
                field = (where or "body").encode("utf-8", "backslashreplace").decode("utf-8")
                raise bad_request(
                    f"Request body field '{field}' contains an unpaired UTF-16 surrogate",
                    field.split("[")[0] or None,
                ) from None
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, where))
                stack.append((child, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))


def validate_model(schema: type[M], data: dict[str, Any]) -> M:
    _check_extra_fields(schema, data)
    _check_list_lengths(schema, data)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = [
            {**e, "loc": body_location(data, e["loc"])} for e in exc.errors(include_url=False)
        ]
        raise bad_request(format_errors(errors), param=first_field(errors)) from None
    except RecursionError:
        raise bad_request("Request body is nested too deeply") from None


def body_location(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error's location as the body spells it. pydantic's puts the member of a union it
    tried among the fields: a tagged union's tag (`input.0.message.role`), a type
    (`stop.list[str].0`), a validator (`function-after[...]`). Walking the body along the
    location tells them apart: a label names no key of the object (or index of the list) it
    stands in; the last part is kept whatever it is (a missing or unknown field)."""
    out: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif i < len(loc) - 1 or isinstance(node, list | str | int | float | bool | None):
            continue  # a union member's label, not a part of the body
        out.append(part)
    return tuple(out)


def _check_extra_fields(schema: type[BaseModel], data: dict[str, Any]) -> None:
    """Refuse a body of many unknown fields before pydantic lists an error for each: a body of
    a million keys held the event loop (every other request) for seconds and was answered with
    a message larger than itself."""
    if schema.model_config.get("extra") != "forbid" or len(data) <= MAX_ERRORS_LISTED:
        return
    known = set(schema.model_fields)
    known.update(f.alias for f in schema.model_fields.values() if f.alias)
    extra = [key for key in data if key not in known]
    if len(extra) > MAX_ERRORS_LISTED:
        message = "Extra inputs are not permitted"
        listed = [
            {"type": "extra_forbidden", "loc": (key,), "msg": message, "input": data[key]}
            for key in extra[:MAX_ERRORS_LISTED]
        ]
        raise bad_request(format_errors(listed, len(extra)), param=extra[0])


def _check_list_lengths(schema: type[BaseModel], data: dict[str, Any]) -> None:
    """Refuse a list over its field's max_length before pydantic validates every item of it
    (it checks the length after): 150,000 tools held the event loop for seconds."""
    for name, (limit, any_length) in _list_limits(schema).items():
        value = data.get(name)
        if isinstance(value, list) and len(value) > limit:
            if isinstance(value[0], any_length):
                continue  # maybe a list the union takes at any length: pydantic decides
            message = f"List should have at most {limit} items after validation, not {len(value)}"
            raise bad_request(
                format_errors(
                    [{"type": "too_long", "loc": (name,), "msg": message, "input": value}]
                ),
                name,
            )


# A list field's max_length, and the item types of lists of any length its union also takes
ListLimit = tuple[int, tuple[type, ...]]


@cache
def _list_limits(schema: type[BaseModel]) -> dict[str, ListLimit]:
    """The max_length of each top-level list field (by its name in the body) of `schema`."""
    limits = {}
    for name, field in schema.model_fields.items():
        limit = _max_length(field.metadata)
        found = (limit, ()) if limit is not None else _union_list_limit(field.annotation)
        if found is not None:
            limits[field.alias or name] = found
    return limits


def _union_list_limit(annotation: Any) -> ListLimit | None:
    """The longest list a union's limited list members accept (None: it has none), and the item
    types of its members that take a list of any length. Embeddings' `input` is at most 2048
    texts or token-id lists, or one token-id list as long as the context: its 2048 refused
    one input of more tokens, though a list of more texts is refused before validating."""
    if get_origin(annotation) not in (Union, UnionType):
        return None
    limits: list[int] = []
    any_length: list[type] = []
    for arg in get_args(annotation):
        metadata: list[Any] = []
        if get_origin(arg) is Annotated:
            metadata = [m for a in arg.__metadata__ for m in _metadata(a)]
            arg = get_args(arg)[0]
        if arg is not list and get_origin(arg) is not list:
            continue
        limit = _max_length(metadata)
        if limit is not None:
            limits.append(limit)
            continue
        item = (get_args(arg) or (object,))[0]
        if get_origin(item) is Annotated:
            item = get_args(item)[0]
        any_length.append(item if isinstance(item, type) else object)
    return (max(limits), tuple(any_length)) if limits else None


def _metadata(annotation_arg: Any) -> list[Any]:
    return [annotation_arg, *getattr(annotation_arg, "metadata", [])]


def _max_length(metadata: list[Any]) -> int | None:
    for m in metadata:
        if type(m).__name__ == "MaxLen":  # annotated_types.MaxLen, as pydantic writes it
            return m.max_length
    return None


def check_not_both(data: dict[str, Any], a: str, b: str) -> None:
    if data.get(a) is not None and data.get(b) is not None:
        raise APIError(400, f"Only one of '{a}' and '{b}' may be set", param=b)
