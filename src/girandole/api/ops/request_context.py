"""The request being served, as a context variable: tracking.py sets it for each request, and
the log formatters (jsonlog.py, textlog.py) read its id. A module of its own so the logs can be
set up without importing the serving pipeline (torch): `girandole serve` configures them, and
reports a bad model path or a folder in use, before that import."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from girandole.api.ops.tracking import RequestRecord

CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "girandole_request", default=None
)
