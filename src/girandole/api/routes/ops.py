"""GET /ready (can this replica take traffic: loaded and not draining) and GET /metrics
(Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from girandole.api.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/ready", summary="Readiness: 200 when the model is loaded and not draining")
async def ready(request: Request) -> JSONResponse:
    ok, status = request.app.state.girandole.ops.ready()
    return JSONResponse({"status": status}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.girandole.ops.metrics.render(), media_type=CONTENT_TYPE)
