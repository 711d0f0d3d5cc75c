"""MLflow's scoring protocol (`POST /invocations`, as `mlflow models serve` answers it), so
MLflow clients and tools can call a tabrec server unchanged. `/ping` is in ops."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from service.auth import require_api_key
from service.deps import SettingsDep, resolve_model
from service.errors import ERRORS
from service.schemas import (
    InputError,
    InvocationsRequest,
    InvocationsResponse,
    columns_frame,
    records_frame,
    split_frame,
)
from service.scoring import check_count, predict_records
from service.settings import Settings

router = APIRouter(tags=["mlflow"], responses=ERRORS)


@router.post("/invocations", response_model=InvocationsResponse, dependencies=[Depends(require_api_key)],
             summary="MLflow scoring protocol (dataframe_split, dataframe_records, instances, inputs)")
async def invocations(
    request: Request,
    body: InvocationsRequest,
    settings: SettingsDep,
    model: Annotated[str | None, Query(description="model name; required when several models are served")] = None,
    x_model_name: Annotated[str | None, Header(description="alternative to ?model=")] = None,
) -> JSONResponse:
    # The model is resolved here, after the body is validated, not in a dependency: which
    # model to use depends on how many are served (a 422 naming the choices) as well as on
    # ?model= or X-Model-Name, and a bad body is reported before a bad model choice.
    loaded = resolve_model(request, choose_model(request, model or x_model_name))
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
