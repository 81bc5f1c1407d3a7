"""Human-readable logs for a terminal, and the choice between them and JSON lines.

`--log-format auto` (the default) writes text when stderr is a terminal and JSON lines when it
is not (a file, a pipe, a log collector); `json` and `text` force one. A text line reads

    17:36:42 INFO  POST /v1/completions 200 in 41.3 ms, 5+16 tokens, ttft 12.0 ms  [req 4f2a...]

with the fields of access lines spelled out and the request id of the request being served.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, TextIO

from girandole.api.ops.request_context import CURRENT

LOG_FORMATS = ("auto", "json", "text")

_COLORS = {"WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[1;31m", "DEBUG": "\033[2m"}
_RESET = "\033[0m"
_OWN_LOGGERS = ("girandole", "uvicorn")


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def choose_log_format(requested: str, stream: TextIO) -> str:
    """The format to use: `requested`, or for "auto", text at a terminal and json elsewhere."""
    if requested not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {requested!r}")
    if requested != "auto":
        return requested
    return "text" if is_terminal(stream) else "json"


class TextFormatter(logging.Formatter):
    """One readable line a record; colored levels when `color` (a terminal without NO_COLOR)."""

    def __init__(self, color: bool = False) -> None:
        super().__init__()
        self.color = color and not os.environ.get("NO_COLOR")

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = f"{record.levelname:<5}"
        if self.color and record.levelname in _COLORS:
            level = _COLORS[record.levelname] + level + _RESET
        line = f"{stamp} {level} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        request_id = None
        if isinstance(fields, dict):
            details = _access_details(fields)
            if details:
                line += " " + details
            request_id = fields.get("request_id")
        elif (current := CURRENT.get()) is not None:
            request_id = current.request_id
        if record.levelno >= logging.WARNING and not record.name.startswith(_OWN_LOGGERS):
            line += f"  ({record.name})"  # a library's warning says where it comes from
        if request_id:
            line += f"  [req {request_id}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _access_details(fields: dict[str, Any]) -> str:
    """The numbers of an access line (its message already says method, path and status)."""
    parts = []
    if "duration_ms" in fields:
        parts.append(f"in {fields['duration_ms']} ms")
    if "prompt_tokens" in fields:
        tokens = f"{fields['prompt_tokens']}+{fields.get('completion_tokens', 0)} tokens"
        if fields.get("cached_tokens"):
            tokens += f" ({fields['cached_tokens']} cached)"
        parts.append(tokens)
    if fields.get("ttft_ms") is not None:
        parts.append(f"ttft {fields['ttft_ms']} ms")
    if fields.get("aborted"):
        parts.append("aborted")
    if fields.get("key_id"):
        parts.append(f"key {fields['key_id']}")
    return ", ".join(parts)
