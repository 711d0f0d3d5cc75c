"""MLflow's scoring protocol (`POST /invocations`, as `mlflow models serve` answers it), so
MLflow clients and tools can call a tabrec server unchanged, several models included:

- plain `/invocations` scores with the model named by `?model=` or `X-Model-Name`, else with
  TABREC_DEFAULT_MODEL, else with the only model served (several and no choice: 422);
- `/models/{name}/invocations` and `/models/{name}/ping` make each model a scoring server of its
  own, so a client that can only be given a base URL (MLflow's ScoringServerClient) reaches any
  model: its base URL is `http://host:port/models/{name}`.

`/ping` (the whole server's health) is in ops."""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Any

import pandas as pd
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse, Response

from service.auth import require_api_key
from service.deps import ModelName, RegistryDep, SettingsDep, resolve_model
from service.errors import ERRORS
from service.registry import LoadedModel
from service.schemas import (
    InputError,
    InvocationsRequest,
    InvocationsResponse,
    columns_frame,
    records_frame,
    split_frame,
)
from service.scoring import (
    INLINE_RECORDS,
    check_count,
    has_nan_literals,
    json_response,
    score_records,
)
from service.settings import Settings

router = APIRouter(tags=["mlflow"], responses=ERRORS)
ModelChoice = Annotated[str | None, Query(description="model name; needed when several models are served and "
                                                      "no TABREC_DEFAULT_MODEL is set", min_length=1)]


@router.post("/invocations", response_model=InvocationsResponse, dependencies=[Depends(require_api_key)],
             summary="MLflow scoring protocol (dataframe_split, dataframe_records, instances, inputs)")
async def invocations(
    request: Request,
    body: InvocationsRequest,
    settings: SettingsDep,
    model: ModelChoice = None,
    x_model_name: Annotated[str | None, Header(description="alternative to ?model=")] = None,
) -> Response:
    # The model is resolved here, after the body is validated, not in a dependency: which
    # model to use depends on how many are served (a 422 naming the choices) as well as on
    # ?model= or X-Model-Name, and a bad body is reported before a bad model choice.
    loaded = resolve_model(request, choose_model(request, settings, model or x_model_name))
    return await score(request, loaded, body, settings)


@router.post("/models/{name}/invocations", response_model=InvocationsResponse,
             dependencies=[Depends(require_api_key)],
             summary="MLflow scoring protocol for one model (base URL http://host:port/models/{name})")
async def model_invocations(request: Request, name: ModelName, body: InvocationsRequest,
                            settings: SettingsDep) -> Response:
    return await score(request, resolve_model(request, name), body, settings)


@router.get("/models/{name}/ping", response_class=PlainTextResponse,
            summary="MLflow-style health of one model (200 when it is loaded)",
            responses={404: {"description": "unknown model", "content": {"application/json": {}}},
                       503: {"description": "not loaded yet", "content": {"text/plain": {}}}})
def model_ping(registry: RegistryDep, name: ModelName) -> PlainTextResponse:
    if name not in registry.specs:
        raise HTTPException(404, f"unknown model {name!r}")
    return PlainTextResponse("\n", status_code=200 if name in registry.models else 503)


async def score(request: Request, loaded: LoadedModel, body: InvocationsRequest, settings: Settings) -> Response:
    n = invocation_count(body, settings)
    nan = await has_nan_literals(request)
    preds = await score_records(request, loaded, invocation_records(body, n),
                                lambda: invocation_frame(body, nan, loaded.predictor.schema.names), n)
    return json_response({}, preds)


def invocation_records(body: InvocationsRequest, n: int) -> list[dict[str, Any]] | None:
    """The request's records as JSON objects for the small-request path (`dataframe_split` rows
    zipped with the columns), or None: a big request, columnar input, or a split with duplicate
    columns or ragged rows (the frame path words those errors)."""
    if n > INLINE_RECORDS:
        return None
    split = body.dataframe_split
    if split is not None:
        width = len(split.columns)
        if len(set(split.columns)) != width or any(len(row) != width for row in split.data):
            return None
        return [dict(zip(split.columns, row, strict=True)) for row in split.data]
    payload = next(p for p in (body.dataframe_records, body.instances, body.inputs) if p is not None)
    return None if isinstance(payload, dict) else payload


def choose_model(request: Request, settings: Settings, chosen: str | None) -> str:
    if chosen:
        return chosen
    default = settings.invocations_model
    if default is not None:
        return default
    names = list(request.app.state.registry.specs)
    raise InputError.one(f"several models are served {names}: choose one with ?model=NAME, the X-Model-Name "
                         "header or the path /models/NAME/invocations (or set TABREC_DEFAULT_MODEL)",
                         field="model")


def invocation_count(body: InvocationsRequest, settings: Settings) -> int:
    """Records in an MLflow scoring request (413 over the limit)."""
    if body.dataframe_split is not None:
        n = len(body.dataframe_split.data)
    else:
        payload = next(p for p in (body.dataframe_records, body.instances, body.inputs) if p is not None)
        n = max((len(v) for v in payload.values()), default=0) if isinstance(payload, dict) else len(payload)
    check_count(n, settings)
    return n


def invocation_frame(body: InvocationsRequest, nan_literals: bool = False,
                     keep: Collection[str] | None = None) -> pd.DataFrame:
    if body.dataframe_split is not None:
        return split_frame(body.dataframe_split, nan_literals, keep)
    payload = next(p for p in (body.dataframe_records, body.instances, body.inputs) if p is not None)
    if isinstance(payload, dict):
        return columns_frame(payload, nan_literals, keep)
    return records_frame(payload, nan_literals, keep)
