"""The FastAPI app: routes of the HTTP contract, error mapping, body limits and OpenAPI docs.

`create_app(settings)` builds an app; `app_from_env()` is the uvicorn factory used by
`tabrec serve` (each worker process rebuilds settings from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any

import anyio
import numpy as np
import pandas as pd
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modeling.errors import DataError
from modeling.schema import RecordsError
from service.auth import get_settings, require_admin, require_api_key
from service.metrics import ObservabilityMiddleware, ServiceMetrics, configure_logging
from service.registry import LoadedModel, ModelNotReady, ModelRegistry, UnknownModel
from service.schemas import (
    V2_FOR_INPUT_TYPE,
    ErrorItem,
    ErrorResponse,
    InputError,
    InvocationsRequest,
    InvocationsResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    ReadyResponse,
    RecommendationsResponse,
    ReloadResponse,
    SimilarResponse,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    columns_frame,
    records_frame,
    split_frame,
    tensors_frame,
)
from service.settings import Settings

log = logging.getLogger("tabrec.service")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [(400, "malformed JSON body or Content-Length"), (401, "API key missing"), (403, "API key wrong"), (404, "unknown model or item"),
                       (413, "too many records or body too large"), (422, "invalid input"),
                       (503, "model not loaded yet")]
}
RECORD_CONTAINERS = {"records", "dataframe_records", "instances", "inputs", "data"}
BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 detail
INLINE_RECORDS = 256  # requests up to this many records are scored on the event loop


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tabrec")
    except PackageNotFoundError:
        return "0"


# ---------------------------------------------------------------- dependencies
async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def serving(request: Request, name: str, kind: str | None = None) -> LoadedModel:
    """The loaded model for `name` (404 unknown, 503 not loaded), labelled for logs and metrics."""
    registry: ModelRegistry = request.app.state.registry
    try:
        model = registry.get(name)
    except UnknownModel:
        raise HTTPException(404, f"unknown model {name!r}; served: {sorted(registry.specs)}") from None
    except ModelNotReady:
        request.state.model = name
        raise HTTPException(503, f"model {name!r} is not loaded", headers={"Retry-After": "5"}) from None
    request.state.model = name
    if kind is not None and model.kind != kind:
        raise HTTPException(404, f"model {name!r} is a {model.kind} model; this endpoint needs a {kind} model")
    return model


def check_count(n: int, settings: Settings) -> None:
    if n > settings.max_records:
        raise HTTPException(413, f"{n} records in one request; the limit is {settings.max_records} "
                                 "(TABREC_MAX_RECORDS)")


async def predict_records(request: Request, model: LoadedModel,
                          make_frame: Callable[[], pd.DataFrame], n: int) -> list[float | None]:
    """Build the frame and predict: inline on the event loop for small requests (a thread hop
    costs more than the work), in the threadpool for large ones so they do not stall the loop."""
    def work() -> list[float | None]:
        return predict_frame(request, model, make_frame())

    if n <= INLINE_RECORDS:
        return work()
    return await anyio.to_thread.run_sync(work)


def predict_frame(request: Request, model: LoadedModel, df: pd.DataFrame) -> list[float | None]:
    """One vectorized predict call; non-finite outputs become null so the JSON stays valid.

    Bad values (including integers beyond int64) are rejected by the model's input schema
    with a RecordsError naming record and field (a 422)."""
    raw = model.predictor.predict(df)
    preds = np.asarray(raw, dtype=np.float64).reshape(-1)
    request.app.state.metrics.records.labels(model.name).inc(len(preds))
    out = preds.astype(object)
    out[~np.isfinite(preds)] = None
    return out.tolist()


ApiKey = Depends(require_api_key)
ModelName = Annotated[str, Path(description="A served model name (see GET /v1/models).", examples=["rossmann"])]

# ---------------------------------------------------------------- health and ops
ops = APIRouter(tags=["operations"])


@ops.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
         summary="Readiness: 200 once every configured model is loaded")
def readyz(registry: ModelRegistry = Depends(get_registry)) -> JSONResponse:
    body = {"status": "ready" if registry.ready else "not ready", "models": registry.status()}
    return JSONResponse(body, status_code=200 if registry.ready else 503)


@ops.get("/ping", summary="MLflow scoring-server health check (200 when ready)", response_class=PlainTextResponse,
         responses={503: {"description": "a model is not loaded yet", "content": {"text/plain": {}}}})
def ping(registry: ModelRegistry = Depends(get_registry)) -> PlainTextResponse:
    return PlainTextResponse("\n", status_code=200 if registry.ready else 503)


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    payload, content_type = request.app.state.metrics.render()
    return Response(payload, media_type=content_type)


# ---------------------------------------------------------------- v1
v1 = APIRouter(prefix="/v1", tags=["models"], dependencies=[ApiKey], responses=ERRORS)


def model_info(m: LoadedModel) -> ModelInfo:
    return ModelInfo(name=m.name, version=m.version, uri=m.uri, kind=m.kind, inputs=m.predictor.input_fields,
                     run_id=m.predictor.source.run_id, loaded_at=m.loaded_at)


@v1.get("/models", response_model=list[ModelInfo], summary="Loaded models with versions and input columns")
def list_models(registry: ModelRegistry = Depends(get_registry)) -> list[ModelInfo]:
    return [model_info(m) for m in registry.models.values()]


@v1.get("/models/{name}", response_model=ModelInfo, summary="One loaded model")
def get_model(request: Request, name: ModelName) -> ModelInfo:
    return model_info(serving(request, name))


@v1.post("/models/{name}/predict", response_model=PredictResponse,
         summary="Predict from raw records (one vectorized call per request)")
async def predict(request: Request, body: PredictRequest, name: ModelName,
                  settings: Settings = Depends(get_settings)) -> JSONResponse:
    model = serving(request, name)
    check_count(len(body.records), settings)
    preds = await predict_records(request, model, lambda: records_frame(body.records), len(body.records))
    return JSONResponse({"model": name, "version": model.version, "predictions": preds})


@v1.get("/models/{name}/users/{user}/recommendations", response_model=RecommendationsResponse,
        response_model_exclude_none=True,
        summary="Top-k items for a user; unknown users get the cold-start list (cold_start: true)")
def recommendations(request: Request, user: str, name: ModelName,
                    k: int = Query(10, ge=1, le=1000), exclude_seen: bool = True) -> dict[str, Any]:
    model = serving(request, name, kind="ratings")
    return model.predictor.recommend([user], k=k, exclude_seen=exclude_seen)[0]


@v1.get("/models/{name}/items/{item}/similar", response_model=SimilarResponse,
        response_model_exclude_none=True, summary="Items closest to an item in embedding space")
def similar(request: Request, item: str, name: ModelName,
            k: int = Query(10, ge=1, le=1000)) -> dict[str, Any]:
    model = serving(request, name, kind="ratings")
    try:
        items = model.predictor.similar(item, k=k)
    except KeyError:
        raise HTTPException(404, f"unknown item {item!r} for model {name!r}") from None
    return {"item": item, "items": items}


admin = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@admin.post("/reload", response_model=ReloadResponse,
            summary="Re-resolve every model URI/alias; load changes off to the side; swap atomically")
def reload(registry: ModelRegistry = Depends(get_registry),
           force: bool = Query(False, description="reload even unchanged versions")) -> ReloadResponse:
    report = registry.refresh(force=force)
    return ReloadResponse(ok=report.ok, ready=registry.ready, models=[vars(e) for e in report.entries])


# ---------------------------------------------------------------- MLflow scoring protocol
mlflow_router = APIRouter(tags=["mlflow"], responses=ERRORS)


@mlflow_router.post("/invocations", response_model=InvocationsResponse, dependencies=[ApiKey],
                    summary="MLflow scoring protocol (dataframe_split, dataframe_records, instances, inputs)")
async def invocations(
    request: Request,
    body: InvocationsRequest,
    settings: Settings = Depends(get_settings),
    model: str | None = Query(None, description="model name; required when several models are served"),
    x_model_name: str | None = Header(None, description="alternative to ?model="),
) -> JSONResponse:
    loaded = serving(request, choose_model(request, model or x_model_name))
    n = invocation_count(body, settings)
    preds = await predict_records(request, loaded, lambda: invocation_frame(body), n)
    return JSONResponse({"predictions": preds})


def choose_model(request: Request, chosen: str | None) -> str:
    names = list(request.app.state.registry.specs)
    if chosen:
        return chosen
    if len(names) == 1:
        return names[0]
    raise InputError.one(f"several models are served {names}: choose one with ?model=NAME "
                         "or the X-Model-Name header", field="model")


def invocation_count(body: InvocationsRequest, settings: Settings) -> int:
    """Records in an MLflow scoring request (413 over the limit)."""
    if body.dataframe_split is not None:
        n = len(body.dataframe_split.data)
    else:
        payload = next(p for p in (body.dataframe_records, body.instances, body.inputs) if p is not None)
        n = max((len(v) for v in payload.values()), default=0) if isinstance(payload, dict) else len(payload)
    check_count(n, settings)
    return n


def invocation_frame(body: InvocationsRequest) -> pd.DataFrame:
    if body.dataframe_split is not None:
        return split_frame(body.dataframe_split)
    payload = next(p for p in (body.dataframe_records, body.instances, body.inputs) if p is not None)
    if isinstance(payload, dict):
        return columns_frame(payload)
    return records_frame(payload)


# ---------------------------------------------------------------- Open Inference Protocol v2
v2 = APIRouter(prefix="/v2", tags=["open inference protocol v2"], responses=ERRORS)


@v2.get("", summary="Server metadata")
def v2_server() -> dict[str, Any]:
    return {"name": "tabrec", "version": _version(), "extensions": []}


@v2.get("/health/live", summary="Server live")
def v2_live() -> dict[str, bool]:
    return {"live": True}


@v2.get("/health/ready", summary="Server ready (503 until every model is loaded)")
def v2_ready(registry: ModelRegistry = Depends(get_registry)) -> JSONResponse:
    return JSONResponse({"ready": registry.ready}, status_code=200 if registry.ready else 503)


@v2.get("/models/{name}/ready", summary="Model ready (503 until loaded)")
def v2_model_ready(request: Request, name: ModelName) -> JSONResponse:
    registry: ModelRegistry = request.app.state.registry
    if name not in registry.specs:
        raise HTTPException(404, f"unknown model {name!r}")
    ready = name in registry.models
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@v2.get("/models/{name}", response_model=V2ModelMetadata, summary="Model metadata")
def v2_metadata(request: Request, name: ModelName) -> V2ModelMetadata:
    return v2_metadata_of(serving(request, name))


@v2.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata, summary="Model version metadata")
def v2_version_metadata(request: Request, name: ModelName, version: str) -> V2ModelMetadata:
    return v2_metadata_of(serving_version(request, name, version))


def v2_metadata_of(m: LoadedModel) -> V2ModelMetadata:
    name = m.name
    inputs = [{"name": f["name"], "datatype": V2_FOR_INPUT_TYPE.get(f["type"], "BYTES"), "shape": [-1]}
              for f in m.predictor.input_fields]
    return V2ModelMetadata(name=name, versions=[str(m.version)] if m.version else [],
                           platform=f"tabrec_{m.kind}", inputs=inputs,
                           outputs=[{"name": "prediction", "datatype": "FP64", "shape": [-1]}])


@v2.post("/models/{name}/infer", response_model=V2InferResponse, dependencies=[ApiKey],
         summary="Columnar inference: one input tensor per column, shape [n] or [n, 1]")
async def v2_infer(request: Request, body: V2InferRequest, name: ModelName,
                   settings: Settings = Depends(get_settings)) -> JSONResponse:
    return await v2_infer_with(request, serving(request, name), body, settings)


@v2.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse, dependencies=[ApiKey],
         summary="Columnar inference on a given model version (404 unless it is the one serving)")
async def v2_version_infer(request: Request, body: V2InferRequest, name: ModelName, version: str,
                           settings: Settings = Depends(get_settings)) -> JSONResponse:
    return await v2_infer_with(request, serving_version(request, name, version), body, settings)


async def v2_infer_with(request: Request, m: LoadedModel, body: V2InferRequest, settings: Settings) -> JSONResponse:
    name = m.name
    wanted = {o.name for o in body.outputs or []} - {"prediction"}
    if wanted:
        raise InputError.one(f"unknown outputs {sorted(wanted)}; this model has 'prediction'", field="outputs")
    n = max((t.shape[0] for t in body.inputs if t.shape), default=0)
    check_count(n, settings)
    preds = await predict_records(request, m, lambda: tensors_frame(body.inputs), n)
    out = {"name": "prediction", "shape": [len(preds)], "datatype": "FP64", "data": preds}
    return JSONResponse({"model_name": name, "model_version": m.version, "id": body.id, "outputs": [out]})


def serving_version(request: Request, name: str, version: str | None) -> LoadedModel:
    m = serving(request, name)
    if version is not None and version != str(m.version):
        raise HTTPException(404, f"model {name!r} serves version {m.version}, not {version}")
    return m


# ---------------------------------------------------------------- errors
def error_body(path: str, detail: Any) -> dict[str, Any]:
    """{"detail": ...}; Open Inference Protocol clients also expect a plain "error" string."""
    body: dict[str, Any] = {"detail": detail}
    if path.startswith("/v2"):
        body["error"] = detail if isinstance(detail, str) else "; ".join(
            f"{d.get('field') or ''}: {d['msg']}".lstrip(": ") for d in detail)
    return body


def items_json(items: list[ErrorItem]) -> list[dict[str, Any]]:
    return [i.model_dump() for i in items]


def validation_items(errors: list[Mapping[str, Any]], path: str) -> tuple[int, list[dict[str, Any]]]:
    """Pydantic errors -> (status, [{record, field, msg}]); malformed JSON is a 400."""
    status, items = 422, []
    for e in errors:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "")
            status = 400
            items.append({"record": None, "field": "body", "msg": f"malformed JSON: {reason}".rstrip(": ")})
            continue
        loc = list(e.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        record = None
        if not path.startswith("/v2") and len(loc) >= 2 and loc[0] in RECORD_CONTAINERS:
            idx = next((j for j, p in enumerate(loc) if isinstance(p, int)), None)
            if idx is not None:
                record, loc = int(loc[idx]), loc[idx + 1:]
        field = ".".join(str(p) for p in loc) or None
        items.append({"record": record, "field": field, "msg": str(e.get("msg", "invalid"))})
    return status, items


def install_error_handlers(app: FastAPI) -> None:
    """Every client error has the {"detail": ...} shape; 422 details are itemised per record."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, items = validation_items(exc.errors(), request.url.path)
        return JSONResponse(error_body(request.url.path, items), status_code=status)

    @app.exception_handler(RecordsError)
    async def on_records(request: Request, exc: RecordsError) -> JSONResponse:
        items = [ErrorItem(record=e.record if e.record >= 0 else None, field=e.field, msg=e.msg)
                 for e in exc.errors]
        return JSONResponse(error_body(request.url.path, items_json(items)), status_code=422)

    @app.exception_handler(InputError)
    async def on_input(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, items_json(exc.items)), status_code=422)

    @app.exception_handler(DataError)
    async def on_data(request: Request, exc: DataError) -> JSONResponse:
        items = [{"record": None, "field": None, "msg": str(exc)}]
        return JSONResponse(error_body(request.url.path, items), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 400 and detail == BODY_PARSE_ERROR:  # FastAPI's own: e.g. not UTF-8
            detail = [{"record": None, "field": "body", "msg": "malformed JSON: the body could not be decoded"}]
        return JSONResponse(error_body(request.url.path, detail), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


# ---------------------------------------------------------------- body limit
class BodyLimitMiddleware:
    """413 when Content-Length or the bytes actually received exceed the limit; 400 on a bad length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.strip().isdigit():
                await self._reject(scope, send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.max_bytes:
                await self._reject(scope, send, 413, self._too_large())
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(scope, send, 413, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (TABREC_MAX_BODY_BYTES)"

    async def _reject(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        response = JSONResponse(error_body(scope.get("path", ""), detail), status_code=status,
                                headers={"Connection": "close"})
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# ---------------------------------------------------------------- OpenAPI with the real inputs
JSON_SCHEMA_FOR_TYPE: dict[str, dict[str, Any]] = {
    "int": {"type": "integer", "format": "int64"},  # larger integers are a 422
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "str": {"type": "string"},
    "id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "date": {"type": "string", "format": "date"},
}
EXAMPLE_FOR_TYPE: dict[str, Any] = {"int": 1, "float": 0.0, "bool": False, "str": "a", "id": "1",
                                    "date": "2015-09-17"}


def record_schema(m: LoadedModel) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for f in m.predictor.input_fields:
        prop = dict(JSON_SCHEMA_FOR_TYPE.get(f["type"], {}))
        if f.get("allowed"):
            prop = {"type": "string", "enum": list(f["allowed"])}
        if f.get("description"):
            prop["description"] = f["description"]
        props[f["name"]] = prop
    required = [f["name"] for f in m.predictor.input_fields if f.get("required", True)]
    return {"type": "object", "title": f"{m.name} record", "properties": props, "required": required,
            "description": f"Raw input record for model {m.name!r} ({m.kind}, version {m.version})."}


def example_record(m: LoadedModel) -> dict[str, Any]:
    """A plausible record: real ids from the vocabulary for ratings models, type defaults otherwise."""
    p = m.predictor
    out: dict[str, Any] = {}
    for f in p.input_fields:
        vocab = getattr(p, f"{f['name']}s", None) if m.kind == "ratings" else None
        if vocab is not None and len(vocab):
            out[f["name"]] = str(vocab[0])
        elif f.get("allowed"):
            out[f["name"]] = f["allowed"][0]
        else:
            out[f["name"]] = EXAMPLE_FOR_TYPE.get(f["type"], "1")
    return out


def add_model_docs(schema: dict[str, Any], models: Mapping[str, LoadedModel]) -> None:
    """Per loaded model: a record schema, a concrete predict path, and examples on the shared routes."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    paths = schema["paths"]
    template = paths["/v1/models/{name}/predict"]["post"]
    for name, m in models.items():
        ref = f"{name}.Record"
        components[ref] = record_schema(m)
        record = example_record(m)
        op = copy.deepcopy(template)
        op["operationId"] = f"predict_{name}"
        op["summary"] = f"Predict with {name} ({m.kind}, version {m.version})"
        op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "name"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "required": ["records"], "additionalProperties": False,
                       "properties": {"records": {"type": "array",
                                                  "items": {"$ref": f"#/components/schemas/{ref}"}}}},
            "example": {"records": [record]}}}}
        paths[f"/v1/models/{name}/predict"] = {"post": op}
        _add_example(paths, "/v1/models/{name}/predict", name, m, {"records": [record]})
        _add_example(paths, "/invocations", name, m,
                     {"dataframe_split": {"columns": list(record), "data": [list(record.values())]}})
        _add_example(paths, "/v2/models/{name}/infer", name, m, {"inputs": [
            {"name": k, "shape": [1], "datatype": V2_FOR_INPUT_TYPE.get(_ftype(m, k), "BYTES"), "data": [v]}
            for k, v in record.items()]})


def _ftype(m: LoadedModel, name: str) -> str:
    return next(f["type"] for f in m.predictor.input_fields if f["name"] == name)


def _add_example(paths: dict[str, Any], path: str, name: str, m: LoadedModel, value: Any) -> None:
    content = paths.get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
    if "application/json" in content:
        cols = ", ".join(f["name"] for f in m.predictor.input_fields)
        content["application/json"].setdefault("examples", {})[name] = {
            "summary": f"{name} ({m.kind}, version {m.version}): {cols}", "value": value}


def openapi_builder(app: FastAPI, registry: ModelRegistry) -> Callable[[], dict[str, Any]]:
    """app.openapi replacement, rebuilt whenever the set of loaded versions changes."""
    cache: dict[Any, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        models = registry.models
        key = tuple((n, m.identity) for n, m in models.items())
        if key not in cache:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            add_model_docs(schema, models)
            cache.clear()
            cache[key] = schema
        return cache[key]

    return openapi


# ---------------------------------------------------------------- app
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


DESCRIPTION = """Predictions, recommendations and similar items from tabrec models.

Send `Authorization: Bearer <key>` or `X-API-Key: <key>` when API keys are configured.
The input columns of each loaded model are under **components/schemas** (`<name>.Record`)
and in the per-model `POST /v1/models/<name>/predict` operations below.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service app; models load in the background once the app starts (lifespan)."""
    settings = settings or Settings.from_env()
    logger = configure_logging(settings.log_level)
    if settings.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(settings.tracking_uri)
    metrics = ServiceMetrics()
    registry = ModelRegistry(settings.models, metrics)
    app = FastAPI(title="tabrec", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    install_error_handlers(app)
    for router in (ops, v1, admin, mlflow_router, v2):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, logger=logger)
    app.openapi = openapi_builder(app, registry)  # type: ignore[method-assign]
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
