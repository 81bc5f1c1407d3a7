"""Structured logs: one JSON object a line on stderr, with the request id of the request being
served (when there is one) on every line logged while serving it.

Access lines (logger `girandole.access`) carry the request's fields: request_id, method, path,
status, duration_ms, account, key_id, model, token counts. API keys are never logged: the
Authorization header is not read by any logging code, and keys are known by their id.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from girandole.api.ops.request_context import CURRENT


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            body.update(fields)
        elif (current := CURRENT.get()) is not None:
            body["request_id"] = current.request_id
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Route every logger (uvicorn's too) to one stderr handler, JSON or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        from girandole.api.textlog import TextFormatter, is_terminal

        handler.setFormatter(TextFormatter(color=is_terminal(sys.stderr)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
