"""Observability: Prometheus metrics, JSON log lines and the per-request ASGI middleware.

Each app owns its own CollectorRegistry (no process-global metric state), so several apps
can live in one process (tests) without clashing.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.middleware import DISCONNECTED

LOGGER = "tabrec.service"
LOG_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "model", "client")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The service's Prometheus metrics in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tabrec_http_requests", "HTTP requests by route, model and status.",
                                ["method", "route", "model", "status"], registry=r)
        self.latency = Histogram("tabrec_http_request_duration_seconds", "HTTP request latency.",
                                 ["method", "route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.records = Counter("tabrec_predicted_records", "Records scored, by model.", ["model"], registry=r)
        self.loads = Counter("tabrec_model_loads", "Successful model (re)loads.", ["model"], registry=r)
        self.load_failures = Counter("tabrec_model_load_failures", "Failed model (re)loads.", ["model"],
                                     registry=r)
        self.version = Gauge("tabrec_model_version_info", "Loaded model version (value is always 1).",
                             ["model", "version", "kind"], registry=r)
        self.loaded = Gauge("tabrec_model_loaded", "1 when the model is loaded and serving.", ["model"],
                            registry=r)

    def observe_request(self, method: str, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, model, str(status)).inc()
        self.latency.labels(method, route, model).observe(seconds)

    def model_swapped(self, model: str, old: tuple[str, str] | None, new: tuple[str, str]) -> None:
        """Record a (re)load: `old`/`new` are (version, kind)."""
        if old is not None and old != new:
            self.version.remove(model, *old)
        self.version.labels(model, *new).set(1)
        self.loaded.labels(model).set(1)
        self.loads.labels(model).inc()

    def load_failed(self, model: str, serving: bool) -> None:
        self.load_failures.labels(model).inc()
        self.loaded.labels(model).set(1 if serving else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and any request fields on the record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(out, default=str)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (so redirected/captured stderr works)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: str = "INFO", root: bool = False) -> logging.Logger:
    """JSON lines on stderr for the service logger (and the root logger in server mode)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level.upper())
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.propagate = False
    if root:
        handler = StderrHandler()
        handler.setFormatter(JsonFormatter())
        logging.root.handlers[:] = [handler]
        logging.root.setLevel(level.upper())
        for noisy in ("mlflow", "alembic", "urllib3", "git"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return logger


def uvicorn_log_config(level: str = "INFO") -> dict[str, Any]:
    """dictConfig for uvicorn (applied in every worker): JSON on stderr, no access log."""
    handler = {"class": "service.metrics.StderrHandler", "formatter": "json"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "service.metrics.JsonFormatter"}},
        "handlers": {"stderr": handler},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def route_template(scope: Scope) -> str | None:
    """The route template a request would have been routed to, for requests answered before
    routing (408, 413, 415, a client that left): the label stays the route, not "unmatched"."""
    app = scope.get("app")
    if app is None:
        return None
    table = app.__dict__.get("_tabrec_route_table")
    if table is None:
        table = app.__dict__["_tabrec_route_table"] = _route_table(app)
    path, method = scope.get("path", ""), scope.get("method", "")
    return next((template for regex, template, methods in table
                 if method in methods and regex.match(path)), None)


def _route_table(app: Any) -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
    from starlette.routing import compile_path

    try:  # FastAPI >= 0.16x keeps included routers as nodes; flatten them to effective routes
        from fastapi.routing import iter_route_contexts

        routes = list(iter_route_contexts(app.routes))
    except ImportError:  # pragma: no cover - older FastAPI lists the routes flat
        routes = list(app.routes)
    table = []
    for route in routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path and methods:
            table.append((compile_path(path)[0], path, frozenset(methods)))
    return table


def request_id_from(scope: Scope) -> str:
    """The caller's X-Request-ID when it is a sane token, else a fresh one."""
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            candidate = value.decode("latin-1")
            if REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class ObservabilityMiddleware:
    """Request id, one JSON log line and metrics per request; unhandled errors become a plain 500."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, logger: logging.Logger) -> None:
        self.app = app
        self.metrics = metrics
        self.log = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
            if state.get("disconnected") and not started:
                status = DISCONNECTED  # the client left before it had sent its request
        except Exception:
            self.log.exception("unhandled error", extra={"request_id": rid, "path": scope.get("path")})
            if started:
                raise
            status = 500
            response = JSONResponse({"detail": "internal error", "request_id": rid}, status_code=500,
                                    headers={"X-Request-ID": rid})
            await response(scope, receive, send)
        finally:
            self._record(scope, state, rid, status, time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict, rid: str, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or route_template(scope) or "unmatched"
        model = state.get("model") or ""
        self.metrics.observe_request(scope["method"], route, model, status, seconds)
        client = scope.get("client")
        self.log.info(
            "request",
            extra={
                "request_id": rid, "method": scope["method"], "path": scope.get("path"), "status": status,
                "duration_ms": round(seconds * 1000, 3), "model": model or None,
                "client": client[0] if client else None,
            },
        )
