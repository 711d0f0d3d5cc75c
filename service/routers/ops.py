"""Health, readiness and metrics: open (no API key), for probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.deps import RegistryDep
from service.schemas import ReadyResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            summary="Readiness: 200 once every configured model is loaded")
def readyz(registry: RegistryDep) -> JSONResponse:
    body = {"status": "ready" if registry.ready else "not ready", "models": registry.status()}
    return JSONResponse(body, status_code=200 if registry.ready else 503)


@router.get("/ping", summary="MLflow scoring-server health check (200 when ready)", response_class=PlainTextResponse,
            responses={503: {"description": "a model is not loaded yet", "content": {"text/plain": {}}}})
def ping(registry: RegistryDep) -> PlainTextResponse:
    return PlainTextResponse("\n", status_code=200 if registry.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    payload, content_type = request.app.state.metrics.render()
    return Response(payload, media_type=content_type)
