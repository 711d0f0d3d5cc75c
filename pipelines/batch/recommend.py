"""`recommend`: top-k items for every known user of a ratings model (or a file of ids) -> Parquet.

The ranking is the model's own (`RatingsPredictor.top_k`: one vectorized top-k over a chunk of
users, seen items excluded, cold-start ranking for unknown ids); this job only chunks the users
so that at most `batch_rows` output rows and SCORE_CELLS scores are held at once, and writes
the rows through the same atomic, locked, tracked frame as `score`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from modeling.errors import DataError
from modeling.predictors import RatingsPredictor, load_predictor
from modeling.schema import canonical_strings
from modeling.uri import ModelUri
from pipelines.batch.inputs import csv_options, file_format, reading
from pipelines.batch.job import batch_job, log_input, log_run, progress, run_id, source_info
from pipelines.batch.outputs import AtomicTableWriter, atomic_outputs, output_path, publish

log = logging.getLogger("tabrec.score")

SCORE_CELLS = 1 << 24  # users x items scores held at once by recommend_file (64 MiB float32)
REC_SCHEMA = pa.schema([("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()),
                        ("score", pa.float32()), ("cold_start", pa.bool_())])


def read_user_ids(path: str | Path) -> pd.Series:
    """User ids from Parquet/CSV (column `user`, or the only column) or a text file (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"users file {p}: no such file")
    fmt = file_format(p)
    if fmt is None:
        with reading(p):
            lines = p.read_text().splitlines()
        ids = pd.Series([s.strip() for s in lines if s.strip()], dtype=object)
        if ids.empty:
            raise DataError(f"users file {p}: no user ids")
        return ids
    with reading(p):
        if fmt == "parquet":
            table = pq.read_table(p)
        else:
            names = pacsv.open_csv(p).schema.names
            read, conv = csv_options({n: pa.string() for n in names})
            table = pacsv.read_csv(p, read_options=read, convert_options=conv)
    if "user" in table.column_names:
        col = "user"
    elif table.num_columns == 1:
        col = table.column_names[0]
    else:
        raise DataError(f"users file {p}: needs a 'user' column or exactly one column; found {table.column_names}")
    ids = table.column(col).to_pandas()
    bad = np.flatnonzero(ids.isna().to_numpy())
    if bad.size:
        where = f"line {bad[0] + 2}" if fmt == "csv" else f"row {bad[0]}"
        raise DataError(f"users file {p} {where}: missing user id in column {col!r}")
    if ids.empty:
        raise DataError(f"users file {p}: no user ids")
    return ids.astype(object)


def _rec_table(predictor: RatingsPredictor, users: np.ndarray, idx: np.ndarray, sc: np.ndarray,
               cold: np.ndarray) -> pa.Table:
    """One chunk's top-k as REC_SCHEMA rows; item indices <= 0 (padding) are dropped."""
    m, k = idx.shape
    valid = (idx > 0).ravel()
    flat = idx.ravel()[valid]
    return pa.Table.from_arrays([
        pa.array(np.repeat(users, k)[valid], type=pa.string()),
        pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), m)[valid]),
        pa.array(predictor.item_ids(flat).astype(str), type=pa.string()),
        pa.array(sc.ravel()[valid], type=pa.float32()),
        pa.array(np.repeat(cold, k)[valid]),
    ], schema=REC_SCHEMA)


def recommend_file(
    model: str,
    output: str | Path,
    *,
    users: str | Path | None = None,
    k: int = 10,
    quiet: bool = False,
    exclude_seen: bool = True,
    batch_rows: int = 100_000,
    experiment: str = "batch",
    track: bool = True,
) -> dict[str, Any]:
    """Top-k items for every known user (or the ids in `users`) -> Parquet user, rank, item, score, cold_start.

    Unknown ids get the bundle's cold-start ranking with cold_start=true. Users are scored in chunks
    (at most `batch_rows` output rows and SCORE_CELLS scores per chunk).
    """
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    if batch_rows < 1:
        raise DataError(f"batch_rows must be >= 1, got {batch_rows}")
    out = output_path(output)
    uri = ModelUri.parse(model)
    with batch_job(uri, [out], track=track, experiment=experiment, run_name="recommend",
                   pipeline="batch-recommend") as run:
        return _recommend(model, uri, out, users, run, k=k, quiet=quiet, exclude_seen=exclude_seen,
                          batch_rows=batch_rows)


def _recommend(model: str, uri: ModelUri, out: Path, users_path: str | Path | None, run: Any, *,
               k: int, quiet: bool, exclude_seen: bool, batch_rows: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    predictor = load_predictor(uri)
    if not isinstance(predictor, RatingsPredictor):
        raise DataError(f"model {model}: recommend needs a ratings model, got a {predictor.kind} model")
    if users_path is None:
        ids = predictor.users.to_numpy(dtype=object)
    else:
        ids = pd.unique(canonical_strings(read_user_ids(users_path)).to_numpy(dtype=object))
    source = source_info(predictor, model)
    per_chunk = max(1, min(batch_rows // k, SCORE_CELLS // max(predictor.n_items, 1)))
    log_run(run, params={"model_uri": model, "model_name": source["name"], "model_version": source["version"],
                         "model_run_id": source["run_id"], "users": str(users_path or "all"), "k": k,
                         "exclude_seen": exclude_seen, "output": str(out), "users_per_chunk": per_chunk})
    if users_path is not None:  # without --users the input is the model's own users (see the params)
        log_input(run, Path(users_path), len(ids), {"user": "string"}, profile={"n_users": len(ids)})
    writer = AtomicTableWriter(out, REC_SCHEMA)
    with atomic_outputs([writer]), progress(len(ids), quiet, "user") as bar:
        n_cold = 0
        for start in range(0, len(ids), per_chunk):
            chunk = np.asarray(ids[start : start + per_chunk], dtype=object)
            idx, sc, cold = predictor.top_k(chunk, k, exclude_seen)
            n_cold += int(cold.sum())
            writer.write(_rec_table(predictor, chunk.astype(str), idx, sc, cold))
            bar.update(len(chunk))
        seconds = time.perf_counter() - t0
        metrics = {"users": len(ids), "cold_start_users": n_cold, "rows_out": writer.rows, "seconds": seconds,
                   "users_per_second": len(ids) / seconds if seconds > 0 else 0.0}
        log_run(run, metrics=metrics)
        publish([writer])
    log.info("wrote top-%d for %d users in %.1f s -> %s", k, len(ids), seconds, out)
    return {"output": str(out), "model": source, "k": k, "run_id": run_id(run),
            **{m: (round(v, 3) if isinstance(v, float) else v) for m, v in metrics.items()}}
