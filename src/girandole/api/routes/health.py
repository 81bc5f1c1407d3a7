"""GET /health: 503 while the model loads (or failed to, or the engine stalls), 200 once it
serves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health", summary="Liveness and readiness")
async def health(request: Request) -> JSONResponse:
    state = request.app.state.girandole
    body = state.health()
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)
