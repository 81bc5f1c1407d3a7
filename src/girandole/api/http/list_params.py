"""The query parameters of every control-plane list and get route (Fireworks' AIP-132 lists:
deployments, deployed models, datasets, batch jobs, models, users, keys), `readMask` applied to
a resource, and one page of a list cut by them (`list_page`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Query

from girandole.api.http.errors import APIError
from girandole.registry.list_query import QueryError, camel, select


@dataclass
class ListParams:
    """`Depends()` this in a list route."""

    page_size: int | None = Query(default=None, alias="pageSize")
    page_token: str | None = Query(default=None, alias="pageToken")
    filter: str | None = Query(default=None)
    order_by: str | None = Query(default=None, alias="orderBy")
    read_mask: str | None = Query(default=None, alias="readMask")


def read_masked(
    body: dict[str, Any], read_mask: str | None, known: Iterable[str] | None = ()
) -> dict[str, Any]:
    """Only the top-level fields named in `readMask` ("" or "*": every field). A field neither
    in `body` nor in `known` is a 400 (`known` None: left out quietly)."""
    if not read_mask or read_mask.strip() in ("*", "**"):
        return body
    fields = [camel(f.strip()) for f in read_mask.split(",") if f.strip()]
    if known is not None:
        known = set(known)
        unknown = [f for f in fields if f not in body and f not in known]
        if unknown:
            raise APIError(400, f"readMask: unknown field {unknown[0]!r}", param="readMask")
    return {f: body[f] for f in fields if f in body}


def list_page(
    items: list[dict[str, Any]],
    key: str,
    query: ListParams,
    fields: set[str],
    default_order: list[tuple[str, bool]] | None = None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """A list route's answer `{key: [...], nextPageToken, totalSize}`: the `items` its filter
    keeps, in its orderBy (else `default_order`; None: the order of `items`), one page, each
    readMasked. `fields` are what a query may name. `strict`: a readMask naming a field not in
    `fields` is a 400 whether or not there are items (else such a field is left out)."""
    try:
        if strict:
            read_masked({}, query.read_mask, fields)
        chosen, next_token, total = select(
            items, fields, query.filter, query.order_by, default_order, query.page_size,
            query.page_token,
        )  # fmt: skip
    except QueryError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    known = fields if strict else None
    return {
        key: [read_masked(item, query.read_mask, known) for item in chosen],
        "nextPageToken": next_token,
        "totalSize": total,
    }


ListQuery = Depends(ListParams)  # `query: ListParams = ListQuery` in a route's parameters
