"""The operations routes: GET /health (503 while the model loads or after it failed to, 200 once
it serves), GET /ready (can this replica take traffic: loaded and not draining) and GET /metrics
(Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from girandole.api.ops.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health", summary="Liveness and readiness")
async def health(request: Request) -> JSONResponse:
    state = request.app.state.girandole
    body = state.health()
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/ready", summary="Readiness: 200 when the model is loaded and not draining")
async def ready(request: Request) -> JSONResponse:
    ok, status = request.app.state.girandole.ops.ready()
    return JSONResponse({"status": status}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.girandole.ops.metrics.render(), media_type=CONTENT_TYPE)
