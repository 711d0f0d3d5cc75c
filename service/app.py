"""The app factory: wiring only (settings, registry, metrics, error handlers, routers,
middleware, OpenAPI builder, lifespan). Routes live in service/routers/.

`create_app(settings)` builds an app; `app_from_env()` is the uvicorn factory used by
`tabrec serve` (each worker process rebuilds settings from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI

from service.errors import install_error_handlers
from service.metrics import ObservabilityMiddleware, ServiceMetrics, configure_logging
from service.middleware import BodyMiddleware
from service.openapi import DESCRIPTION, app_version, openapi_builder
from service.registry import ModelRegistry
from service.routers import admin, ops, v1, v2
from service.routers import mlflow as mlflow_scoring
from service.settings import Settings

log = logging.getLogger("tabrec.service")
ROUTERS = (ops.router, v1.router, admin.router, mlflow_scoring.router, v2.router)


async def _poll(registry: ModelRegistry, interval: float) -> None:
    """Re-resolve aliases every `interval` seconds (TABREC_RELOAD_INTERVAL)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(registry.refresh)
        except Exception:  # refresh never raises by design; keep polling regardless
            log.exception("reload poll failed")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load models in the background (readiness stays 503 meanwhile); poll for new versions."""
    registry: ModelRegistry = app.state.registry
    settings: Settings = app.state.settings
    threading.Thread(target=registry.refresh, name="tabrec-initial-load", daemon=True).start()
    poller = asyncio.create_task(_poll(registry, settings.reload_interval)) if settings.reload_interval else None
    try:
        yield
    finally:
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service app; models load in the background once the app starts (lifespan)."""
    settings = settings or Settings.from_env()
    logger = configure_logging(settings.log_level)
    if settings.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(settings.tracking_uri)
    metrics = ServiceMetrics()
    registry = ModelRegistry(settings.models, metrics, calendars=settings.calendars)
    app = FastAPI(title="tabrec", version=app_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, logger=logger)
    app.openapi = openapi_builder(app, registry, settings)  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """Uvicorn factory (one call per worker process): settings from env, torch threads per worker."""
    settings = Settings.from_env()
    configure_logging(settings.log_level, root=True)
    threads = settings.torch_threads or max(1, _cores() // settings.workers)
    import torch

    torch.set_num_threads(threads)
    log.info("worker %d: torch threads %d, models %s", os.getpid(), threads, sorted(settings.models))
    return create_app(settings)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
