"""The scoring path shared by the predict-style routes (v1 predict, /invocations, v2 infer):
the record-count limit, where the work runs, and JSON-safe outputs. The model logic itself is
the predictor's (modeling); this is only the HTTP side of calling it.

Small requests (up to INLINE_RECORDS records given as JSON objects) take the predictors'
small-request path first (`predict_records`: typed arrays, no DataFrame); a request it does not
take (a value that needs the frame path's reading, or its error) goes the frame path. Responses
are serialized by orjson when installed, else by pydantic-core (both in Rust, no per-value
Python), with non-finite predictions as null."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import numpy as np
import pandas as pd
from fastapi import HTTPException, Request
from fastapi.responses import Response

from service.registry import LoadedModel
from service.settings import Settings

try:  # the faster serializer when installed (a pyproject dependency); pydantic-core otherwise
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None
from pydantic_core import to_json

INLINE_RECORDS = 256  # requests up to this many records are scored on the event loop (fast path)


def check_count(n: int, settings: Settings) -> None:
    """413 when one request carries more than TABREC_MAX_RECORDS records."""
    if n > settings.max_records:
        raise HTTPException(413, f"{n} records in one request; the limit is {settings.max_records} "
                                 "(TABREC_MAX_RECORDS)")


async def predict_array(request: Request, model: LoadedModel,
                        make_frame: Callable[[], pd.DataFrame], n: int) -> np.ndarray:
    """Build the frame and predict: inline on the event loop for small requests (a thread hop
    costs more than the work), in the threadpool for large ones so they do not stall the loop."""
    def work() -> np.ndarray:
        return predict_frame(request, model, make_frame())

    if n <= INLINE_RECORDS:
        return work()
    return await anyio.to_thread.run_sync(work)


async def predict_records(request: Request, model: LoadedModel,
                          make_frame: Callable[[], pd.DataFrame], n: int) -> list[float | None]:
    """predict_array as JSON-safe values: non-finite outputs become null."""
    return json_values(await predict_array(request, model, make_frame, n))


def predict_frame(request: Request, model: LoadedModel, df: pd.DataFrame) -> np.ndarray:
    """One vectorized predict call, as float64.

    Bad values (including integers beyond int64) are rejected by the model's input schema
    with a RecordsError naming record and field (a 422)."""
    raw = model.predictor.predict(df)
    preds = np.asarray(raw, dtype=np.float64).reshape(-1)
    request.app.state.metrics.records.labels(model.name).inc(len(preds))
    return preds


def fast_predict(request: Request, model: LoadedModel,
                 records: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
    """The small-request path (`predict_records` of the predictor) for up to INLINE_RECORDS
    records, on the event loop; None when the request is bigger or the path does not take it
    (then the caller builds the frame: same answers, and the frame path words any error)."""
    if len(records) > INLINE_RECORDS:
        return None
    fast = getattr(model.predictor, "predict_records", None)
    preds = fast(records) if fast is not None else None
    if preds is None:
        return None
    request.app.state.metrics.records.labels(model.name).inc(len(preds))
    return preds


async def score_records(request: Request, model: LoadedModel, records: Sequence[Mapping[str, Any]] | None,
                        make_frame: Callable[[], pd.DataFrame], n: int) -> np.ndarray:
    """Predictions for a request: the small-request path when `records` (parsed JSON objects) are
    given and it takes them, else `predict_array` over `make_frame()`."""
    if records is not None:
        preds = fast_predict(request, model, records)
        if preds is not None:
            return preds
    return await predict_array(request, model, make_frame, n)


def json_response(payload: dict[str, Any], preds: np.ndarray) -> Response:
    """`payload` plus "predictions" (non-finite values as null) as a JSON response, serialized
    without per-value Python (orjson or pydantic-core)."""
    body = {**payload, "predictions": np.asarray(preds, dtype=np.float64).tolist()}
    content = orjson.dumps(body) if orjson is not None else to_json(body, inf_nan_mode="null")
    return Response(content, media_type="application/json")


def json_values(preds: np.ndarray) -> list[float | None]:
    out = preds.astype(object)
    out[~np.isfinite(preds)] = None
    return out.tolist()


async def has_nan_literals(request: Request) -> bool:
    """Whether the (already read) body may hold NaN literals: a byte search, so that the exact
    per-cell look-up runs only for the rare body that has the bytes `NaN` at all."""
    return b"NaN" in await request.body()
