"""`score`: a Parquet/CSV file (or a directory of them) through any model -> Parquet of keys + prediction.

With `uncertainty=True` a tabular bundle's spread forest adds a per-row `spread` column (std of
its trees' predictions of the model's target, e.g. log(Sales)). With `calendar=PATH` a tabular
model's event features read the known future events of that file (test.csv layout) laid over
the bundle's event calendar, for this run (`TabularPredictor.with_calendar_file`).

Chunking: a record's features do not depend on the other records of its chunk (Rossmann's
days-until features read the bundle's event calendar, modeling.features.ElapsedEvents), so an
input of at most `batch_rows` rows is scored in one go ("whole") and a larger one streams record
batches of `batch_rows` ("stream"); memory is bounded by `batch_rows`. Predictions are the same
in both modes. A feature pipeline that declared group columns (rows that must be transformed
together; none of tabrec's steps does) would be scored in one chunk, with a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from modeling.errors import DataError
from modeling.predictors import Predictor, RatingsPredictor, TabularPredictor, load_predictor
from modeling.schema import RecordsError
from modeling.uri import ModelUri
from pipelines.batch.drift import drift_gate, drift_sampler
from pipelines.batch.inputs import ROW, InputSet, count_rows, open_inputs, read_batches
from pipelines.batch.job import batch_job, log_run, progress, run_id, source_info
from pipelines.batch.outputs import (
    AtomicTableWriter,
    atomic_outputs,
    output_path,
    publish,
    submission_path,
)

log = logging.getLogger("tabrec.score")

MAX_SPILL_FILES = 256


# ============================================================================ columns


def group_columns(predictor: Predictor) -> list[str]:
    """Columns whose rows must be scored together ([] for tabrec's feature steps)."""
    return predictor.group_columns() if isinstance(predictor, TabularPredictor) else []


def key_columns(predictor: Predictor, inputs: InputSet) -> list[str]:
    """Columns copied to the output to identify rows: declared keys present in the input (e.g. Id),
    else the group and date columns (e.g. Store, Date); user and item for ratings models."""
    cols = inputs.columns
    if isinstance(predictor, RatingsPredictor):
        declared = ["user", "item"]
        missing = [c for c in declared if c not in cols]
        if missing:
            raise DataError(f"input {inputs.files[0]}: missing key column(s) {missing}; found {cols}")
        return declared
    tabular = predictor if isinstance(predictor, TabularPredictor) else None
    keys = tabular.key_columns if tabular is not None else []
    declared = [c for c in keys if c in cols]
    if declared:
        return declared
    feats = tabular.features if tabular is not None else None
    fallback = feats.key_columns() if feats is not None else []
    found = [c for c in fallback if c in cols]
    if not found:
        wanted = list(keys) + fallback
        raise DataError(f"input {inputs.files[0]}: no key column to identify rows; expected one of "
                        f"{wanted}; found {cols}")
    return found


def _string_fields(predictor: Predictor) -> list[str]:
    """Raw fields read as text from CSV (codes such as StateHoliday mix '0' and 'a')."""
    return [f.name for f in predictor.schema.fields if f.type in ("str", "id")]


def _check_required(predictor: Predictor, inputs: InputSet) -> None:
    missing = [f.name for f in predictor.schema.fields if f.required and f.name not in inputs.columns]
    if missing:
        raise DataError(f"input {inputs.files[0]}: missing required column(s) {missing}; "
                        f"found {inputs.columns}")


# ============================================================================ chunks


@dataclass
class Plan:
    """How the input is cut into chunks: 'whole' (one chunk) or 'stream' (record batches)."""

    mode: str
    total_rows: int
    chunk_rows: int


def make_plan(predictor: Predictor, inputs: InputSet, batch_rows: int) -> Plan:
    """Count the input (Parquet: from file metadata; CSV: one pass over a column) and choose the mode."""
    count_rows(inputs, None)
    total = int(sum(inputs.file_rows))
    if total <= batch_rows:
        return Plan("whole", total, batch_rows)
    groups = group_columns(predictor)
    if groups:
        log.warning("features group rows by %s: scoring all %d rows in one chunk", groups, total)
        return Plan("whole", total, total)
    return Plan("stream", total, batch_rows)


def _chunks(inputs: InputSet, columns: Sequence[str], plan: Plan) -> Iterator[pa.Table]:
    if plan.mode == "whole":
        batches = list(read_batches(inputs, columns, max(plan.chunk_rows, 1)))
        if batches:
            yield pa.Table.from_batches(batches)
    else:
        for batch in read_batches(inputs, columns, plan.chunk_rows):
            yield pa.Table.from_batches([batch])


# ============================================================================ predict and write


def _predict_chunk(predictor: Predictor, table: pa.Table, inputs: InputSet, spread: bool = False,
                   sink: Callable[[pd.DataFrame, np.ndarray], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(prediction, spread or None) for one chunk; row errors name the file and line/row."""
    df = table.drop_columns([ROW]).to_pandas(date_as_object=False)
    try:
        if isinstance(predictor, TabularPredictor):
            if spread:
                pred, sd = predictor.predict_with_spread(df, source="input", on_features=sink)
                return np.asarray(pred, dtype=np.float64), np.asarray(sd, dtype=np.float64)
            return np.asarray(predictor.predict(df, source="input", on_features=sink), dtype=np.float64), None
        return np.asarray(predictor.predict(df, source="input"), dtype=np.float64), None
    except RecordsError as exc:
        rows = table.column(ROW).to_numpy()
        where = "; ".join(f"{inputs.locate(int(rows[e.record]))} field {e.field!r}: {e.msg}"
                          for e in exc.errors[:5] if 0 <= e.record < len(rows))
        raise DataError(f"input rows rejected: {where or exc}") from exc


def _output_schema(inputs: InputSet, keys: Sequence[str], spread: bool = False) -> pa.Schema:
    return pa.schema([*(pa.field(k, inputs.schema.field(k).type) for k in keys),
                      pa.field("prediction", pa.float64()),
                      *([pa.field("spread", pa.float64())] if spread else [])])


def _with_calendar(predictor: Predictor, model: str, calendar: str | Path) -> Predictor:
    """The predictor with the calendar file's events laid over its bundle's calendar."""
    if not isinstance(predictor, TabularPredictor) or not predictor.calendar_columns:
        raise DataError(f"--calendar {calendar}: model {model} reads no event calendar (a {predictor.kind} "
                        "model without event features)")
    predictor = predictor.with_calendar_file(calendar)
    log.info("event calendar %s laid over the bundle's: %s", calendar, predictor.calendar_info())
    return predictor


def _check_uncertainty(predictor: Predictor, model: str) -> None:
    """DataError unless the model can give a per-row spread (a tabular bundle with a forest)."""
    if not isinstance(predictor, TabularPredictor):
        raise DataError(f"model {model}: --uncertainty needs a tabular model whose bundle carries a spread "
                        f"forest; a {predictor.kind} model has no per-row spread")
    predictor.forest()  # DataError naming the bundle when it carries none (trained before)


def _submission_schema(inputs: InputSet, predictor: Predictor) -> pa.Schema:
    ids = list(predictor.key_columns) if isinstance(predictor, TabularPredictor) else []
    missing = [c for c in ids if c not in inputs.columns]
    if not isinstance(predictor, TabularPredictor) or not ids or missing:
        raise DataError(f"submission CSV needs the model's id column(s) {ids or '(none declared)'} in "
                        f"the input; missing {missing or ids}")
    return pa.schema([*(pa.field(k, inputs.schema.field(k).type) for k in ids),
                      pa.field(predictor.target_name, pa.float64())])


def _write_chunk(writers: Sequence[AtomicTableWriter], table: pa.Table, pred: np.ndarray,
                 keys: Sequence[str], spread: np.ndarray | None = None) -> None:
    pred_arr = pa.array(pred, type=pa.float64())
    main = writers[0]
    extra = [] if spread is None else [pa.array(spread, type=pa.float64())]
    main.write(pa.Table.from_arrays([*(table.column(k) for k in keys), pred_arr, *extra], schema=main.schema))
    if len(writers) > 1:
        sub = writers[1]
        ids = sub.schema.names[:-1]
        sub.write(pa.Table.from_arrays([*(table.column(k) for k in ids), pred_arr], schema=sub.schema))


# ============================================================================ the job


def score_file(
    model: str,
    input: str | Path,
    output: str | Path,
    *,
    quiet: bool = False,
    uncertainty: bool = False,
    max_drift_auc: float = 0.8,
    fail_on_drift: bool = False,
    batch_rows: int = 100_000,
    experiment: str = "batch",
    track: bool = True,
    submission_csv: str | Path | None = None,
    drift_rows: int = 5000,
    calendar: str | Path | None = None,
) -> dict[str, Any]:
    """Score a Parquet/CSV file or directory with any model URI -> Parquet of key columns + `prediction`.

    With `uncertainty` a tabular model whose bundle carries a spread forest adds `spread`: the std of
    its trees' predictions on the model's target scale (Rossmann: log(Sales)), 0 for closed stores.
    With `submission_csv` a tabular model also writes `<id columns>,<target>` (Kaggle: Id,Sales).
    With `calendar` (CSV/Parquet in the test.csv layout) a tabular model's event features read the
    file's known future events laid over the bundle's calendar; a bad file is a DataError naming
    the file, column and line, raised before anything is written.
    Raises DataError (CLI exit 2) for bad input, a locked/unwritable output, an unreachable tracking
    server or, with `fail_on_drift`, drift; nothing is published then.
    """
    if batch_rows < 1:
        raise DataError(f"batch_rows must be >= 1, got {batch_rows}")
    if not 0.0 <= max_drift_auc <= 1.0:
        raise DataError(f"max_drift_auc must be in [0, 1], got {max_drift_auc}")
    in_path = Path(input)
    out = output_path(output, in_path)
    sub = submission_path(submission_csv, out) if submission_csv else None
    uri = ModelUri.parse(model)
    outputs = [out] if sub is None else [out, sub]
    with batch_job(uri, outputs, track=track, experiment=experiment, run_name="score",
                   pipeline="batch-score") as run:
        return _score(model, uri, in_path, out, sub, run, quiet=quiet, max_drift_auc=max_drift_auc,
                      fail_on_drift=fail_on_drift, batch_rows=batch_rows, drift_rows=drift_rows,
                      uncertainty=uncertainty, calendar=calendar)


def _score(model: str, uri: ModelUri, in_path: Path, out: Path, sub: Path | None, run: Any, *,
           quiet: bool, max_drift_auc: float, fail_on_drift: bool, batch_rows: int,
           drift_rows: int, uncertainty: bool = False, calendar: str | Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    predictor = load_predictor(uri)
    if calendar is not None:
        predictor = _with_calendar(predictor, model, calendar)
    if uncertainty:
        _check_uncertainty(predictor, model)
    inputs = open_inputs(in_path, _string_fields(predictor))
    _check_required(predictor, inputs)
    keys = key_columns(predictor, inputs)
    schemas = [_output_schema(inputs, keys, uncertainty)]
    if sub is not None:
        schemas.append(_submission_schema(inputs, predictor))
    wanted = {f.name for f in predictor.schema.fields} | set(keys) | set(group_columns(predictor))
    columns = [c for c in inputs.columns if c in wanted]
    plan = make_plan(predictor, inputs, batch_rows)
    source = source_info(predictor, model)
    log_run(run, params={"model_uri": model, "model_name": source["name"], "model_version": source["version"],
                         "model_run_id": source["run_id"], "model_kind": predictor.kind, "input": str(in_path),
                         "output": str(out), "submission_csv": str(sub) if sub else None,
                         "batch_rows": batch_rows, "chunk_mode": plan.mode, "max_drift_auc": max_drift_auc,
                         "fail_on_drift": fail_on_drift, "uncertainty": uncertainty,
                         "calendar": str(calendar) if calendar is not None else None})
    sampler = drift_sampler(predictor, plan.total_rows, drift_rows)
    sink = sampler.add if sampler is not None and sampler.active else None
    writers = [AtomicTableWriter(out, schemas[0])]
    if sub is not None:
        writers.append(AtomicTableWriter(sub, schemas[1], fmt="csv"))
    with ExitStack() as stack:
        stack.enter_context(atomic_outputs(writers))
        drift: dict[str, Any] | None = None
        n_chunks = 0
        spread_sum, spread_rows = 0.0, 0
        bar = stack.enter_context(progress(plan.total_rows, quiet, "row"))
        for table in _chunks(inputs, columns, plan):
            pred, spread = _predict_chunk(predictor, table, inputs, uncertainty, sink)
            n_chunks += 1
            if spread is not None:
                scored = spread > 0  # rows the forest scored (zero_when rows get 0)
                spread_sum, spread_rows = spread_sum + float(spread[scored].sum()), spread_rows + int(scored.sum())
            if plan.mode == "whole":  # the whole input is in hand: check before writing a byte
                drift = drift_gate(sampler, max_drift_auc, fail_on_drift)
            _write_chunk(writers, table, pred, keys, spread)
            bar.update(table.num_rows)
        if drift is None:  # several chunks: the sample spans all of them, so check before publishing
            drift = drift_gate(sampler, max_drift_auc, fail_on_drift)
        seconds = time.perf_counter() - t0
        rows_out = writers[0].rows
        metrics = {"rows_in": plan.total_rows, "rows_out": rows_out, "seconds": seconds,
                   "rows_per_second": plan.total_rows / seconds if seconds > 0 else 0.0, "chunks": n_chunks}
        if drift.get("checked"):
            metrics["drift_auc"] = drift["auc"]
        if uncertainty and spread_rows:
            metrics["spread_mean"] = spread_sum / spread_rows
        log_run(run, metrics=metrics, artifacts={"drift.json": drift})
        publish(writers)
    log.info("scored %d rows in %.1f s -> %s", rows_out, seconds, out)
    return {"output": str(out), "submission_csv": str(sub) if sub else None, "model": source,
            "calendar": str(calendar) if calendar is not None else None,
            "key_columns": keys, "chunk_mode": plan.mode, "chunks": n_chunks, "uncertainty": uncertainty,
            "run_id": run_id(run), "drift": drift,
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items()}}
