"""The query parameters of every control-plane list and get route (Fireworks' AIP-132 lists:
deployments, deployed models, datasets, batch jobs), and `readMask` applied to a resource."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Query

from girandole.api.http.errors import APIError
from girandole.registry.list_query import camel


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


ListQuery = Depends(ListParams)  # `query: ListParams = ListQuery` in a route's parameters
