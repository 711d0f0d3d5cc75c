"""The scoring path shared by the predict-style routes (v1 predict, /invocations, v2 infer):
the record-count limit, where the work runs, and JSON-safe outputs. The model logic itself is
the predictor's (modeling); this is only the HTTP side of calling it."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import numpy as np
import pandas as pd
from fastapi import HTTPException, Request

from service.registry import LoadedModel
from service.settings import Settings

INLINE_RECORDS = 256  # requests up to this many records are scored on the event loop


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


def json_values(preds: np.ndarray) -> list[float | None]:
    out = preds.astype(object)
    out[~np.isfinite(preds)] = None
    return out.tolist()


async def has_nan_literals(request: Request) -> bool:
    """Whether the (already read) body may hold NaN literals: a byte search, so that the exact
    per-cell look-up runs only for the rare body that has the bytes `NaN` at all."""
    return b"NaN" in await request.body()
