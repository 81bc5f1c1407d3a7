"""Turn pydantic errors into Fireworks' 400 messages.

Fireworks words them as pydantic's message followed by the field, e.g.
`Extra inputs are not permitted, field: 'reset_prompt_cache', value: True`; several errors as
`2 request validation errors:\n  <first>; <second>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from girandole.api.errors import APIError, bad_request

M = TypeVar("M", bound=BaseModel)

_MAX_VALUE_CHARS = 100


def _field_name(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def _value_text(value: Any) -> str | None:
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + "...'"
    return None  # objects and arrays are not repeated back


def format_error(err: dict[str, Any]) -> str:
    field = _field_name(err.get("loc", ()))
    message = err.get("msg", "Invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    text = f"{message}, field: '{field}'" if field else message
    if err.get("type") != "missing":
        value = _value_text(err.get("input"))
        if value is not None:
            text += f", value: {value}"
    return text


def format_errors(errors: Sequence[dict[str, Any]]) -> str:
    if len(errors) == 1:
        return format_error(errors[0])
    body = "; ".join(format_error(e) for e in errors)
    return f"{len(errors)} request validation errors:\n  {body}"


def first_field(errors: Sequence[dict[str, Any]]) -> str | None:
    for err in errors:
        field = _field_name(err.get("loc", ()))
        if field:
            return field
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise bad_request("Request body is empty: expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"Request body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request(f"Request body must be a JSON object, got {type(data).__name__}")
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
                field = where or "body"
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
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise bad_request(format_errors(errors), param=first_field(errors)) from None
    except RecursionError:
        raise bad_request("Request body is nested too deeply") from None


def check_not_both(data: dict[str, Any], a: str, b: str) -> None:
    if data.get(a) is not None and data.get(b) is not None:
        raise APIError(400, f"Only one of '{a}' and '{b}' may be set", param=b)
