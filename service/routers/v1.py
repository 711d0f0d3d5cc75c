"""The tabrec v1 API: loaded models, predictions from raw records, recommendations and
similar items. Every route needs an API key when keys are configured."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response

from service.auth import require_api_key
from service.deps import RatingsModel, RegistryDep, ServedModel, SettingsDep
from service.errors import ERRORS
from service.registry import LoadedModel
from service.schemas import (
    ModelInfo,
    PredictRequest,
    PredictResponse,
    RecommendationsResponse,
    SimilarResponse,
    records_frame,
)
from service.scoring import check_count, has_nan_literals, json_response, score_records

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)], responses=ERRORS)
TopK = Annotated[int, Query(ge=1, le=1000)]


def model_info(m: LoadedModel) -> ModelInfo:
    return ModelInfo(name=m.name, version=m.version, uri=m.uri, kind=m.kind, inputs=m.predictor.input_fields,
                     run_id=m.predictor.source.run_id, loaded_at=m.loaded_at)


@router.get("/models", response_model=list[ModelInfo], summary="Loaded models with versions and input columns")
def list_models(registry: RegistryDep) -> list[ModelInfo]:
    return [model_info(m) for m in registry.models.values()]


@router.get("/models/{name}", response_model=ModelInfo, summary="One loaded model")
def get_model(model: ServedModel) -> ModelInfo:
    return model_info(model)


@router.post("/models/{name}/predict", response_model=PredictResponse,
             summary="Predict from raw records (one vectorized call per request)")
async def predict(request: Request, body: PredictRequest, model: ServedModel, settings: SettingsDep) -> Response:
    check_count(len(body.records), settings)
    nan = await has_nan_literals(request)
    preds = await score_records(request, model, body.records,
                                lambda: records_frame(body.records, nan, model.predictor.schema.names),
                                len(body.records))
    return json_response({"model": model.name, "version": model.version}, preds)


@router.get("/models/{name}/users/{user}/recommendations", response_model=RecommendationsResponse,
            response_model_exclude_none=True,
            summary="Top-k items for a user; unknown users get the cold-start list (cold_start: true)")
def recommendations(user: str, model: RatingsModel, k: TopK = 10, exclude_seen: bool = True) -> dict[str, Any]:
    return model.predictor.recommend([user], k=k, exclude_seen=exclude_seen)[0]


@router.get("/models/{name}/items/{item}/similar", response_model=SimilarResponse,
            response_model_exclude_none=True, summary="Items closest to an item in embedding space")
def similar(item: str, model: RatingsModel, k: TopK = 10) -> dict[str, Any]:
    try:
        items = model.predictor.similar(item, k=k)
    except KeyError:
        raise HTTPException(404, f"unknown item {item!r} for model {model.name!r}") from None
    return {"item": item, "items": items}
