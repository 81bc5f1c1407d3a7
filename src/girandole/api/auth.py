"""Bearer-key authentication for the inference routes."""

from __future__ import annotations

from fastapi import Request

from girandole.api.errors import unauthorized


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the server is open or the request carries a known key."""
    keys = request.app.state.girandole.keys
    if keys.open:
        return
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise unauthorized(
            "Missing API key: send it in the header 'Authorization: Bearer <API_KEY>'"
        )
    if not keys.check(token):
        raise unauthorized()
