"""OpenAI's list pages (`{"object": "list", "data", "first_id", "last_id", "has_more"}`), cut
from a list by cursors: the items after the one whose id is `after`, before the one whose id is
`before`, at most `limit` of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from girandole.api.http.errors import APIError, bad_request

T = TypeVar("T")


def list_page(
    items: Sequence[T],
    limit: int,
    after: str | None = None,
    before: str | None = None,
    id_of: Callable[[T], str] = lambda item: item["id"],  # type: ignore[index]
    render: Callable[[T], dict[str, Any]] = lambda item: item,  # type: ignore[assignment,return-value]
    tail: bool = False,
    cursor_names: tuple[str, str] = ("after", "before"),
) -> dict[str, Any]:
    """The page of `items` (in the order given) the cursors ask for; a cursor that names no
    item is a 400 naming it. `tail`: the last `limit` of them, the page just before `before`
    (Anthropic's `before_id`), rather than the first. `cursor_names`: the query parameters
    `after` and `before` came in, for the 400."""
    ids = [id_of(item) for item in items]
    start, end = 0, len(items)
    for cursor, param in zip((after, before), cursor_names, strict=True):
        if cursor is not None and cursor not in ids:
            raise no_item(cursor, param)
    if after is not None:
        start = ids.index(after) + 1
    if before is not None:
        end = ids.index(before)
    window = items[start:end]
    data = [render(item) for item in (window[-limit:] if tail else window[:limit])]
    return page_json(data, len(window) > limit)


def page_json(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """The page of `data` (a store's page read by key uses this alone, cutting nothing)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def no_item(cursor: str, param: str) -> APIError:
    """list_page's 400 for a cursor that names no item."""
    return bad_request(f"No item with id '{cursor}', field: '{param}'", param)
