"""How the CLIs print records: one record as aligned `Key: value` lines, many as a table of
aligned columns (a header row first). Shared by `girandole deployment`, `batch`, `lora` and
`keys`/`models`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fields(rows: Sequence[tuple[str, Any]]) -> str:
    """`Name:        value` lines, the values aligned."""
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in rows)


def table(rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
