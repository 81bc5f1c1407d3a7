"""Bearer-key authentication for the inference routes."""

from __future__ import annotations

from fastapi import Request


def bearer_token(header: str | None) -> str | None:
    """The key of `Bearer <key>`: any case, any whitespace between (a tab was read as no key)."""
    if not header:
        return None
    parts = header.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the server is open or the request carries a live key (the
    `--api-key` ones or the keys database's); then the key's rate limits (429), and 503 while
    the server drains. See `girandole.api.ops.server_ops.ServerOps.authorize`."""
    await request.app.state.girandole.ops.authorize(request)
