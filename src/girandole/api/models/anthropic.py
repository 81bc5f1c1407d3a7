"""`GET /v1/models` as Anthropic's Models API answers it, for a request that sends
`anthropic-version` (the `anthropic` SDK always does; OpenAI's and Fireworks' clients never do):
`{"data": [{"type": "model", "id", "display_name", "created_at"}], "has_more", "first_id",
"last_id"}`, paged by `limit` (1-1000, default 20), `after_id` and `before_id` as Anthropic pages
it. The same ids as the Fireworks list; an error is in Anthropic's shape."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from girandole.api.http.errors import bad_request
from girandole.api.messages.shape import anthropic_error

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


def wants_anthropic(request: Request) -> bool:
    return "anthropic-version" in request.headers


async def anthropic_errors_if_asked(request: Request) -> None:
    """Before the key check: a 401 to the `anthropic` SDK is in its shape too."""
    if wants_anthropic(request):
        request.state.error_body = anthropic_error


def model_object(entry: dict[str, Any]) -> dict[str, Any]:
    """One Fireworks list entry as Anthropic's model object."""
    created = datetime.fromtimestamp(entry["created"], tz=UTC)
    return {
        "type": "model",
        "id": entry["id"],
        "display_name": entry["id"],
        "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def model_page(entries: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """A page of the list, by the request's query: `after_id` starts after that id, `before_id`
    ends before it (the `limit` entries nearest it); an id not listed is a 400 naming it."""
    limit = _limit(query.get("limit"))
    ids = [e["id"] for e in entries]
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise bad_request("Only one of after_id and before_id may be given.", param="after_id")
    start, stop = 0, len(entries)
    if after is not None:
        start = _position(ids, after, "after_id") + 1
        stop = min(start + limit, len(entries))
        has_more = stop < len(entries)
    elif before is not None:
        stop = _position(ids, before, "before_id")
        start = max(stop - limit, 0)
        has_more = start > 0
    else:
        stop = min(limit, len(entries))
        has_more = stop < len(entries)
    data = [model_object(e) for e in entries[start:stop]]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(
            f"limit: must be an integer from 1 to {MAX_LIMIT}, got {raw!r}.", param="limit"
        )
    return limit


def _position(ids: list[str], wanted: str, param: str) -> int:
    try:
        return ids.index(wanted)
    except ValueError:
        raise bad_request(f"{param}: no model {wanted!r} is listed.", param=param) from None
