"""Open Inference Protocol v2 (KServe, Seldon, Triton clients): server and model metadata,
readiness, and columnar inference (one input tensor per column). Errors also carry the plain
"error" string these clients read (see service.errors.error_body)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from service.auth import require_api_key
from service.deps import ModelName, RegistryDep, ServedModel, ServedVersion, SettingsDep
from service.errors import ERRORS
from service.registry import LoadedModel, ModelRegistry
from service.schemas import InputError, V2InferRequest, V2InferResponse, V2ModelMetadata
from service.scoring import check_count, has_nan_literals, predict_array
from service.settings import Settings
from service.tensors import (
    V2_FOR_INPUT_TYPE,
    batch_size,
    check_tensors,
    infer_body,
    tensors_frame,
    wants_binary,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], responses=ERRORS)
ApiKey = Depends(require_api_key)


@router.get("", summary="Server metadata")
def v2_server(request: Request) -> dict[str, Any]:
    return {"name": "tabrec", "version": request.app.version, "extensions": []}


@router.get("/health/live", summary="Server live")
def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server ready (503 until every model is loaded)")
def v2_ready(registry: RegistryDep) -> JSONResponse:
    return JSONResponse({"ready": registry.ready}, status_code=200 if registry.ready else 503)


@router.get("/models/{name}/ready", summary="Model ready (503 until loaded)",
            responses={404: {"description": "unknown model"}, 503: {"description": "not loaded yet"}})
def v2_model_ready(registry: RegistryDep, name: ModelName) -> JSONResponse:
    return model_ready(registry, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready (404 unless it is serving)",
            responses={404: {"description": "unknown model or version"}, 503: {"description": "not loaded yet"}})
def v2_version_ready(registry: RegistryDep, name: ModelName, version: str) -> JSONResponse:
    return model_ready(registry, name, version)


def model_ready(registry: ModelRegistry, name: str, version: str | None) -> JSONResponse:
    if name not in registry.specs:
        raise HTTPException(404, f"unknown model {name!r}")
    model = registry.models.get(name)
    if model is not None and version is not None and version != str(model.version):
        raise HTTPException(404, f"model {name!r} serves version {model.version}, not {version}")
    return JSONResponse({"name": name, "ready": model is not None}, status_code=200 if model else 503)


@router.get("/models/{name}", response_model=V2ModelMetadata, summary="Model metadata")
def v2_metadata(model: ServedModel) -> V2ModelMetadata:
    return v2_metadata_of(model)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata, summary="Model version metadata")
def v2_version_metadata(model: ServedVersion) -> V2ModelMetadata:
    return v2_metadata_of(model)


def v2_metadata_of(m: LoadedModel) -> V2ModelMetadata:
    inputs = [{"name": f["name"], "datatype": V2_FOR_INPUT_TYPE.get(f["type"], "BYTES"), "shape": [-1]}
              for f in m.predictor.input_fields]
    return V2ModelMetadata(name=m.name, versions=[str(m.version)] if m.version else [],
                           platform=f"tabrec_{m.kind}", inputs=inputs,
                           outputs=[{"name": "prediction", "datatype": "FP64", "shape": [-1]}])


INFER_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}, "description": (
    "JSON, or with binary output asked for (Triton's binary extension) the JSON header followed by "
    "the raw little-endian FP64 predictions, its length in the Inference-Header-Content-Length header")}}


@router.post("/models/{name}/infer", response_model=V2InferResponse, dependencies=[ApiKey],
             responses=INFER_RESPONSES,
             summary="Columnar inference: one input tensor per column, shape [n] or [n, 1]")
async def v2_infer(request: Request, body: V2InferRequest, model: ServedModel, settings: SettingsDep) -> Response:
    return await v2_infer_with(request, model, body, settings)


@router.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse, dependencies=[ApiKey],
             responses=INFER_RESPONSES,
             summary="Columnar inference on a given model version (404 unless it is the one serving)")
async def v2_version_infer(request: Request, body: V2InferRequest, model: ServedVersion,
                           settings: SettingsDep) -> Response:
    return await v2_infer_with(request, model, body, settings)


async def v2_infer_with(request: Request, m: LoadedModel, body: V2InferRequest, settings: Settings) -> Response:
    wanted = {o.name for o in body.outputs or []} - {"prediction"}
    if wanted:
        raise InputError.one(f"unknown outputs {sorted(wanted)}; this model has 'prediction'", field="outputs")
    flats = check_tensors(body.inputs, m.predictor.input_fields)
    n = batch_size(body.inputs)
    check_count(n, settings)
    binary = getattr(request.state, "tensor_bytes", None)
    nan = await has_nan_literals(request)
    preds = await predict_array(request, m, lambda: tensors_frame(body.inputs, flats, binary, nan, m.predictor.schema.names), n)
    header = {"model_name": m.name, "model_version": m.version, "id": body.id}
    content, headers = infer_body(header, preds, wants_binary(body))
    return Response(content, headers=headers)
