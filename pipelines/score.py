"""Batch jobs: score a Parquet/CSV file (or a directory of them) and write top-k recommendations.

With `uncertainty=True` a tabular bundle's spread forest adds a per-row `spread` column (std of
its trees' predictions of the model's target, e.g. log(Sales)).

Both jobs stream with pyarrow so memory stays bounded, write Parquet to a hidden temp file in
the output's directory and `os.replace` it into place (a crash never leaves a partial output;
a rerun rebuilds it), hold a non-blocking `flock` on `<output>.lock` so two overlapping runs on
one output cannot interleave, and record an MLflow run in experiment "batch".

Chunking and the Rossmann event features: "days until the next promo/holiday" is computed
from the events present in the batch itself (modeling.features.ElapsedEvents), so splitting
one store's rows across chunks would change its features. Rows are therefore chunked by whole
groups: an input of at most `batch_rows` rows is scored in one go; a larger one is first
spilled to hidden Parquet buckets, each holding whole groups (stores), and scored bucket by
bucket. Predictions are identical either way; memory is bounded by `batch_rows` plus the
largest single group. Output rows keep input order within a chunk; with several chunks they
come bucket by bucket (sort by the key columns if order matters).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import math
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from modeling.drift import DriftSampler
from modeling.errors import DataError
from modeling.schema import RecordsError, canonical_strings

log = logging.getLogger("tabrec.score")

ROW = "__row"  # global input row number carried through chunking, for error locations
TMP_SUFFIX = ".tmp"
SPILL_SUFFIX = ".spill"
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")
MAX_SPILL_FILES = 256
SCORE_CELLS = 1 << 24  # users x items scores held at once by recommend_file (64 MiB float32)
MIN_DRIFT_ROWS = 30
TRACKING_TIMEOUT_S = 5.0


class OutputError(DataError):
    """The output cannot be written: bad path, no permission, disk full."""


class OutputLockedError(OutputError):
    """Another run holds the lock on this output."""


class DriftError(DataError):
    """The batch's features differ from the training sample beyond --max-drift-auc."""


class TrackingUnavailableError(DataError):
    """The MLflow tracking server cannot be reached."""


# ============================================================================ inputs


@dataclass
class InputSet:
    """The data files behind an --input path: same columns everywhere, one format."""

    root: Path
    files: list[Path]
    fmt: str  # "parquet" | "csv"
    schema: pa.Schema
    csv_types: dict[str, pa.DataType] = field(default_factory=dict)
    file_rows: list[int] = field(default_factory=list)  # filled by the counting pass

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def locate(self, row: int) -> str:
        """Global row number -> 'file row N' (CSV: line number, header = line 1)."""
        starts = np.cumsum([0, *self.file_rows])
        i = int(np.searchsorted(starts, row, side="right") - 1) if self.file_rows else 0
        i = min(max(i, 0), len(self.files) - 1)
        local = int(row - starts[i])
        where = f"line {local + 2}" if self.fmt == "csv" else f"row {local}"
        return f"{self.files[i]} {where}"


def _file_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    return None


def list_input_files(path: str | Path) -> list[Path]:
    """The data files of an --input: the file itself, or a directory's Parquet/CSV files sorted by name
    (hidden and `_`-prefixed files such as Spark's _SUCCESS are skipped)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"input {root}: no such file or directory")
    if root.is_file():
        if _file_format(root) is None:
            raise DataError(f"input {root}: not a Parquet (.parquet/.pq) or CSV (.csv/.csv.gz) file")
        return [root]
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.name.startswith((".", "_")) and _file_format(p))
    if not files:
        raise DataError(f"input {root}: directory holds no .parquet/.pq/.csv/.csv.gz files")
    return files


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Map pyarrow read failures (corrupt, truncated, unparseable) to a DataError naming the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"input {path}: cannot read ({type(exc).__name__}: {exc})") from exc


def _csv_options(types: dict[str, pa.DataType] | None, columns: Sequence[str] | None = None,
                 block_size: int = 1 << 20) -> tuple[pacsv.ReadOptions, pacsv.ConvertOptions]:
    read = pacsv.ReadOptions(block_size=block_size)
    conv = pacsv.ConvertOptions(column_types=types or {}, strings_can_be_null=True,
                                include_columns=list(columns) if columns is not None else None)
    return read, conv


def _csv_schema(path: Path, string_columns: Sequence[str]) -> pa.Schema:
    """Column names and types inferred from the first block (text columns forced to string)."""
    with _reading(path):
        read, conv = _csv_options({c: pa.string() for c in string_columns})
        reader = pacsv.open_csv(path, read_options=read, convert_options=conv)
        schema = reader.schema
        reader.close()
    return schema


def _schema_difference(a: pa.Schema, b: pa.Schema, compare_types: bool) -> str | None:
    missing = [n for n in a.names if n not in b.names]
    extra = [n for n in b.names if n not in a.names]
    if missing or extra:
        return f"missing column(s) {missing}, extra column(s) {extra}"
    if compare_types:
        diff = [f"{n!r} is {b.field(n).type} (expected {a.field(n).type})" for n in a.names
                if not b.field(n).type.equals(a.field(n).type)]
        if diff:
            return "column type(s) differ: " + "; ".join(diff)
    return None


def open_inputs(path: str | Path, string_columns: Sequence[str] = ()) -> InputSet:
    """Check every file opens and shares the first file's columns (and, for Parquet, types)."""
    files = list_input_files(path)
    formats = {_file_format(f) for f in files}
    if len(formats) > 1:
        raise DataError(f"input {path}: mixes Parquet and CSV files; use one format per directory")
    fmt = formats.pop() or "csv"
    schemas = []
    for f in files:
        if fmt == "parquet":
            with _reading(f):
                schemas.append(pq.read_schema(f))
        else:
            schemas.append(_csv_schema(f, string_columns))
    first = schemas[0]
    for f, s in zip(files[1:], schemas[1:], strict=True):
        diff = _schema_difference(first, s, compare_types=fmt == "parquet")
        if diff:
            raise DataError(f"input {f}: schema differs from {files[0]}: {diff}")
    schema = pa.schema([pa.field(n, first.field(n).type) for n in first.names])
    csv_types: dict[str, pa.DataType] = {}
    if fmt == "csv":  # pin the first block's types so later blocks/files cannot re-infer
        csv_types = {n: pa.string() if pa.types.is_null(t) else t for n, t in zip(schema.names, schema.types,
                                                                                 strict=True)}
        schema = pa.schema([pa.field(n, t) for n, t in csv_types.items()])
    return InputSet(Path(path), files, fmt, schema, csv_types)


def _file_batches(inputs: InputSet, path: Path, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of at most `batch_rows` rows of `columns` from one file."""
    if inputs.fmt == "parquet":
        with _reading(path):
            it = pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=list(columns))
    else:
        types = {c: inputs.csv_types[c] for c in columns}
        block = int(min(max(batch_rows * 64, 1 << 20), 1 << 28))
        read, conv = _csv_options(types, columns, block_size=block)
        with _reading(path):
            it = pacsv.open_csv(path, read_options=read, convert_options=conv)
    while True:
        with _reading(path):
            try:
                batch = next(it)
            except StopIteration:
                return
        for start in range(0, batch.num_rows, batch_rows):
            yield batch.slice(start, batch_rows)


def read_batches(inputs: InputSet, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of `columns` over all files in order, plus a global row number column `__row`."""
    row = 0
    names = [*columns, ROW]
    for path in inputs.files:
        for batch in _file_batches(inputs, path, columns, batch_rows):
            n = batch.num_rows
            if n == 0:
                continue
            arrays = [batch.column(c) for c in columns]
            arrays.append(pa.array(np.arange(row, row + n, dtype=np.int64)))
            yield pa.RecordBatch.from_arrays(arrays, names=names)
            row += n


def count_rows(inputs: InputSet, group: str | None) -> pd.Series | None:
    """Rows per file (stored on `inputs`) and, with `group`, rows per group value (sorted)."""
    counts: pd.Series | None = None
    inputs.file_rows = []
    for path in inputs.files:
        if group is None and inputs.fmt == "parquet":
            with _reading(path):
                inputs.file_rows.append(pq.ParquetFile(path).metadata.num_rows)
            continue
        col = group or inputs.columns[0]
        n = 0
        for batch in _file_batches(inputs, path, [col], 1 << 20):
            n += batch.num_rows
            if group is not None:
                vc = batch.column(0).to_pandas().value_counts(dropna=False)
                counts = vc if counts is None else counts.add(vc, fill_value=0)
        inputs.file_rows.append(n)
    if group is None:
        return None
    if counts is None:
        return pd.Series([], dtype=np.int64)
    return counts.astype(np.int64).sort_index()


# ============================================================================ outputs


def _output_path(output: str | Path, inputs_root: Path | None = None) -> Path:
    out = Path(output).absolute()
    if out.name.lower().endswith(CSV_SUFFIXES):
        raise DataError(f"output {out}: batch output is Parquet; name it .parquet "
                        "(a Kaggle submission CSV is a separate option)")
    if out.exists() and out.is_dir():
        raise DataError(f"output {out}: is a directory; give a file path")
    if inputs_root is not None:
        root = inputs_root.absolute()
        if root == out:
            raise DataError(f"output {out}: same path as the input")
        if root.is_dir() and root in out.parents:
            raise DataError(f"output {out}: inside the input directory {root}; the next run would read it")
    return out


def _submission_path(path: str | Path, output: Path) -> Path:
    sub = Path(path).absolute()
    if not sub.name.lower().endswith(".csv"):
        raise DataError(f"submission CSV {sub}: name it .csv")
    if sub == output:
        raise DataError(f"submission CSV {sub}: same path as the output")
    return sub


@contextmanager
def _output_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or errno.errorcode.get(exc.errno or 0, "error")
        raise OutputError(f"cannot write output {path}: {reason}") from exc


@contextmanager
def output_lock(output: Path) -> Iterator[Path]:
    """Exclusive, non-blocking flock on `<output>.lock`; released when the process ends, even on kill -9.

    The lock file is left in place on purpose: deleting it would let two runs lock different inodes.
    """
    lock_path = output.with_name(output.name + ".lock")
    with _output_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise OutputLockedError(f"output {output} is locked by another run (pid {holder}, lock file "
                                    f"{lock_path}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        os.close(fd)


def remove_stale_temps(output: Path) -> list[Path]:
    """Delete temp files/spill dirs a crashed run left beside `output` (call only under its lock)."""
    removed = []
    for p in output.parent.glob(f".{glob.escape(output.name)}.*"):
        if p.name.endswith(TMP_SUFFIX) and p.is_file():
            p.unlink(missing_ok=True)
        elif p.name.endswith(SPILL_SUFFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            continue
        removed.append(p)
    if removed:
        log.info("removed %d leftover temp file(s) of an interrupted run beside %s", len(removed), output)
    return removed


def _temp_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicTableWriter:
    """A Parquet (or CSV) file built under a hidden temp name beside `path`; commit() renames it in.

    The temp file is created on the first write, so a job that fails before writing leaves nothing.
    """

    def __init__(self, path: Path, schema: pa.Schema, fmt: str = "parquet") -> None:
        self.path, self.schema, self.fmt = path, schema, fmt
        self.tmp = _temp_name(path, TMP_SUFFIX)
        self.rows = 0
        self._writer: Any = None

    def _open(self) -> None:
        with _output_errors(self.path):
            if self.fmt == "parquet":
                self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="snappy")
            else:
                self._writer = pacsv.CSVWriter(self.tmp, self.schema,
                                               write_options=pacsv.WriteOptions(quoting_header="none"))

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._open()
        with _output_errors(self.path):
            self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is None:
            self._open()
        with _output_errors(self.path):
            self._writer.close()
            _fsync(self.tmp)

    def publish(self) -> None:
        with _output_errors(self.path):
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            with suppress(Exception):  # already failing: the temp file is deleted below anyway
                self._writer.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def _atomic_outputs(writers: Sequence[AtomicTableWriter]) -> Iterator[Sequence[AtomicTableWriter]]:
    """Abort every writer (delete its temp file) unless the body published them."""
    try:
        yield writers
    except BaseException:
        for w in writers:
            w.abort()
        raise


def _publish(writers: Sequence[AtomicTableWriter]) -> None:
    """Close all first (a failure leaves nothing published), then rename each into place."""
    for w in writers:
        w.close()
    for w in writers:
        w.publish()
    with _output_errors(writers[0].path):
        dir_fd = os.open(writers[0].path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ============================================================================ tracking


def check_tracking_reachable(timeout: float = TRACKING_TIMEOUT_S) -> str:
    """Fail fast (not after MLflow's minutes of retries) when an http(s) tracking server is down."""
    from pipelines import tracking

    uri = tracking.tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout).close()
        except OSError as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({exc.strerror or exc}); "
                "check MLFLOW_TRACKING_URI or run without tracking") from exc
    return uri


def _needs_tracking(model: str, track: bool) -> bool:
    return track or model.startswith(("runs:/", "models:/"))


@contextmanager
def _batch_run(track: bool, experiment: str, run_name: str, tags: dict[str, str]) -> Iterator[Any]:
    if not track:
        yield None
        return
    from pipelines import tracking

    with tracking.tracked_run(experiment, run_name=run_name, tags=tags) as run:
        yield run


def _end_stale_runs(run: Any, output: Path) -> int:
    """Mark RUNNING batch runs for this output KILLED: we hold its lock, so their process is gone."""
    if run is None or "'" in str(output):
        return 0
    from mlflow import MlflowClient

    client = MlflowClient()
    flt = f"tags.`tabrec.output` = '{output}' and attributes.status = 'RUNNING'"
    stale = [r for r in client.search_runs([run.info.experiment_id], flt, max_results=100)
             if r.info.run_id != run.info.run_id]
    for r in stale:
        client.set_tag(r.info.run_id, "error", "process died (found RUNNING by a later run)")
        client.set_terminated(r.info.run_id, "KILLED")
    return len(stale)


def _log(run: Any, params: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> None:
    if run is None:
        return
    from pipelines import tracking

    if params:
        tracking.log_params(params)
    if metrics:
        tracking.log_metrics(metrics)


def _source_info(predictor: Any, uri: str) -> dict[str, Any]:
    src = predictor.source
    return {"uri": uri, "kind": predictor.kind, "name": src.name, "version": src.version, "run_id": src.run_id}


# ============================================================================ drift


def drift_exclusions(predictor: Any) -> dict[str, str]:
    """Model inputs the drift check leaves out, with the reason: the columns that are a function of
    the row's date, so a batch from another period differs there by construction, not by drift.

    The feature pipeline declares them (`FeaturePipeline.time_relative_columns`): calendar parts
    (Year, Month, Week, Day, Dayofyear, Elapsed), per-group event distances and window counts (the
    Before*/*_fw values are computed from the events inside the batch and cap where the next event
    lies past its end; After*/*_bw are exact but seasonal), durations to the date, month-of-date
    flags and tables joined on a date column (weather, trends). Their `<col>_na` flags stay in: a
    join that stops matching is real skew.
    """
    return predictor.drift_exclusions() if predictor.kind == "tabular" else {}


def _drift_gate(sampler: DriftSampler | None, max_auc: float, fail: bool) -> dict[str, Any]:
    """Warn, or raise DriftError, when the adversarial AUC exceeds `max_auc`."""
    if sampler is None:
        return {"checked": False, "note": "drift check applies to tabular models only"}
    drift = sampler.result()
    if not drift["checked"]:
        log.info("%s", drift["note"])
        return drift
    log.info("drift check: comparing %d columns %s with the training sample; left out as functions "
             "of the date: %s", len(drift["compared_columns"]), drift["compared_columns"], drift["excluded_columns"])
    scope = drift["reference"]
    if scope.get("narrowed_to"):
        log.info("drift check: reference = the training sample's rows of the %d %s value(s) in the batch "
                 "(%d rows)", scope["groups"], scope["narrowed_to"], scope["rows"])
    log.info("drift check: adversarial AUC %.3f on %d rows; features separating batch from training: %s",
             drift["auc"], drift["rows"], ", ".join(f"{n} ({v:.2f})" for n, v in drift["top_features"]))
    drift["max_auc"] = max_auc
    drift["exceeded"] = drift["auc"] > max_auc
    if drift["exceeded"]:
        top = ", ".join(n for n, _ in drift["top_features"][:3])
        msg = (f"drift: adversarial AUC {drift['auc']:.3f} > --max-drift-auc {max_auc} "
               f"(batch vs training features; most telling: {top})")
        if fail:
            raise DriftError(msg + "; nothing written")
        log.warning("%s", msg)
    return drift


# ============================================================================ scoring


def group_columns(predictor: Any) -> list[str]:
    """Columns whose rows must be scored together (features computed from events in the batch)."""
    return predictor.group_columns() if predictor.kind == "tabular" else []


def key_columns(predictor: Any, inputs: InputSet) -> list[str]:
    """Columns copied to the output to identify rows: declared keys present in the input (e.g. Id),
    else the group and date columns (e.g. Store, Date); user and item for ratings models."""
    cols = inputs.columns
    if predictor.kind == "ratings":
        declared = ["user", "item"]
        missing = [c for c in declared if c not in cols]
        if missing:
            raise DataError(f"input {inputs.files[0]}: missing key column(s) {missing}; found {cols}")
        return declared
    declared = [c for c in getattr(predictor, "key_columns", []) if c in cols]
    if declared:
        return declared
    feats = getattr(predictor, "features", None)
    fallback = feats.key_columns() if feats is not None else []
    found = [c for c in fallback if c in cols]
    if not found:
        wanted = list(getattr(predictor, "key_columns", [])) + fallback
        raise DataError(f"input {inputs.files[0]}: no key column to identify rows; expected one of "
                        f"{wanted}; found {cols}")
    return found


def _string_fields(predictor: Any) -> list[str]:
    """Raw fields read as text from CSV (codes such as StateHoliday mix '0' and 'a')."""
    return [f.name for f in predictor.schema.fields if f.type in ("str", "id")]


def _check_required(predictor: Any, inputs: InputSet) -> None:
    missing = [f.name for f in predictor.schema.fields if f.required and f.name not in inputs.columns]
    if missing:
        raise DataError(f"input {inputs.files[0]}: missing required column(s) {missing}; "
                        f"found {inputs.columns}")


@dataclass
class Plan:
    """How the input is cut into chunks: 'whole' (one chunk), 'stream' (row batches) or 'buckets'
    (whole groups spilled to hidden Parquet files first)."""

    mode: str
    total_rows: int
    chunk_rows: int
    group: str | None = None
    bucket_keys: pd.Index | None = None
    bucket_of_key: np.ndarray | None = None


def make_plan(predictor: Any, inputs: InputSet, batch_rows: int) -> Plan:
    groups = group_columns(predictor)
    group = groups[0] if len(groups) == 1 and groups[0] in inputs.columns else None
    counts = count_rows(inputs, group)
    total = int(sum(inputs.file_rows))
    if total <= batch_rows:
        return Plan("whole", total, batch_rows)
    if not groups:
        return Plan("stream", total, batch_rows)
    if group is None:
        log.warning("features group rows by %s: scoring all %d rows in one chunk", groups, total)
        return Plan("whole", total, total)
    assert counts is not None
    chunk = max(batch_rows, math.ceil(total / MAX_SPILL_FILES))
    c = counts.to_numpy()
    bucket = (np.cumsum(c) - c) // chunk  # contiguous key ranges of about `chunk` rows each
    return Plan("buckets", total, chunk, group, pd.Index(counts.index), bucket.astype(np.int64))


def _spill(inputs: InputSet, columns: Sequence[str], plan: Plan, spill_dir: Path) -> list[Path]:
    """Stream the input once, appending each row to its bucket's Parquet file."""
    assert plan.bucket_keys is not None and plan.bucket_of_key is not None
    writers: dict[int, pq.ParquetWriter] = {}
    paths: dict[int, Path] = {}
    try:
        for batch in read_batches(inputs, columns, plan.chunk_rows):
            pos = plan.bucket_keys.get_indexer(batch.column(plan.group).to_pandas())
            bucket = plan.bucket_of_key[pos]
            order = np.argsort(bucket, kind="stable")
            ids, starts = np.unique(bucket[order], return_index=True)
            ends = np.append(starts[1:], len(order))
            sorted_batch = batch.take(pa.array(order))
            for b, s, e in zip(ids.tolist(), starts.tolist(), ends.tolist(), strict=True):
                if b not in writers:
                    paths[b] = spill_dir / f"{b:05d}.parquet"
                    with _output_errors(paths[b]):
                        writers[b] = pq.ParquetWriter(paths[b], batch.schema, compression="lz4")
                with _output_errors(paths[b]):
                    writers[b].write_batch(sorted_batch.slice(s, e - s))
    finally:
        for w in writers.values():
            w.close()
    return [paths[b] for b in sorted(paths)]


def _chunks(inputs: InputSet, columns: Sequence[str], plan: Plan, spill_dir: Path | None) -> Iterator[pa.Table]:
    if plan.mode == "whole":
        batches = list(read_batches(inputs, columns, max(plan.chunk_rows, 1)))
        if batches:
            yield pa.Table.from_batches(batches)
    elif plan.mode == "stream":
        for batch in read_batches(inputs, columns, plan.chunk_rows):
            yield pa.Table.from_batches([batch])
    else:
        assert spill_dir is not None
        for path in _spill(inputs, columns, plan, spill_dir):
            with _reading(path):
                table = pq.read_table(path)
            path.unlink()
            yield table


def _predict_chunk(predictor: Any, table: pa.Table, inputs: InputSet, spread: bool = False,
                   sink: Callable[[pd.DataFrame, np.ndarray], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(prediction, spread or None) for one chunk; row errors name the file and line/row."""
    df = table.drop_columns([ROW]).to_pandas(date_as_object=False)
    hook = {"on_features": sink} if sink is not None else {}
    try:
        if spread:
            pred, sd = predictor.predict_with_spread(df, source="input", **hook)
            return np.asarray(pred, dtype=np.float64), np.asarray(sd, dtype=np.float64)
        return np.asarray(predictor.predict(df, source="input", **hook), dtype=np.float64), None
    except RecordsError as exc:
        rows = table.column(ROW).to_numpy()
        where = "; ".join(f"{inputs.locate(int(rows[e.record]))} field {e.field!r}: {e.msg}"
                          for e in exc.errors[:5] if 0 <= e.record < len(rows))
        raise DataError(f"input rows rejected: {where or exc}") from exc


def _output_schema(inputs: InputSet, keys: Sequence[str], spread: bool = False) -> pa.Schema:
    return pa.schema([*(pa.field(k, inputs.schema.field(k).type) for k in keys),
                      pa.field("prediction", pa.float64()),
                      *([pa.field("spread", pa.float64())] if spread else [])])


def _check_uncertainty(predictor: Any, model: str) -> None:
    """DataError unless the model can give a per-row spread (a tabular bundle with a forest)."""
    if predictor.kind != "tabular":
        raise DataError(f"model {model}: --uncertainty needs a tabular model whose bundle carries a spread "
                        f"forest; a {predictor.kind} model has no per-row spread")
    predictor.forest()  # DataError naming the bundle when it carries none (trained before)


def _submission_schema(inputs: InputSet, predictor: Any) -> pa.Schema:
    ids = list(getattr(predictor, "key_columns", []))
    missing = [c for c in ids if c not in inputs.columns]
    if predictor.kind != "tabular" or not ids or missing:
        raise DataError(f"submission CSV needs the model's id column(s) {ids or '(none declared)'} in "
                        f"the input; missing {missing or ids}")
    return pa.schema([*(pa.field(k, inputs.schema.field(k).type) for k in ids),
                      pa.field(predictor.target_name, pa.float64())])


def _progress(total: int, quiet: bool, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


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
) -> dict[str, Any]:
    """Score a Parquet/CSV file or directory with any model URI -> Parquet of key columns + `prediction`.

    With `uncertainty` a tabular model whose bundle carries a spread forest adds `spread`: the std of
    its trees' predictions on the model's target scale (Rossmann: log(Sales)), 0 for closed stores.
    With `submission_csv` a tabular model also writes `<id columns>,<target>` (Kaggle: Id,Sales).
    Raises DataError (CLI exit 2) for bad input, a locked/unwritable output, an unreachable tracking
    server or, with `fail_on_drift`, drift; nothing is published then.
    """
    if batch_rows < 1:
        raise DataError(f"batch_rows must be >= 1, got {batch_rows}")
    if not 0.0 <= max_drift_auc <= 1.0:
        raise DataError(f"max_drift_auc must be in [0, 1], got {max_drift_auc}")
    in_path = Path(input)
    out = _output_path(output, in_path)
    sub = _submission_path(submission_csv, out) if submission_csv else None
    if _needs_tracking(model, track):
        check_tracking_reachable()
    tags = {"tabrec.pipeline": "batch-score", "tabrec.output": str(out)}
    with ExitStack() as stack:
        stack.enter_context(output_lock(out))
        run = stack.enter_context(_batch_run(track, experiment, "score", tags))
        remove_stale_temps(out)
        if sub is not None:
            remove_stale_temps(sub)
        _end_stale_runs(run, out)
        result = _score(model, in_path, out, sub, run, stack, quiet=quiet, max_drift_auc=max_drift_auc,
                        fail_on_drift=fail_on_drift, batch_rows=batch_rows, drift_rows=drift_rows,
                        uncertainty=uncertainty)
    return result


def _score(model: str, in_path: Path, out: Path, sub: Path | None, run: Any, stack: ExitStack, *,
           quiet: bool, max_drift_auc: float, fail_on_drift: bool, batch_rows: int,
           drift_rows: int, uncertainty: bool = False) -> dict[str, Any]:
    from modeling.predictors import load_predictor

    t0 = time.perf_counter()
    predictor = load_predictor(model)
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
    source = _source_info(predictor, model)
    _log(run, params={"model_uri": model, "model_name": source["name"], "model_version": source["version"],
                      "model_run_id": source["run_id"], "model_kind": predictor.kind, "input": str(in_path),
                      "output": str(out), "submission_csv": str(sub) if sub else None,
                      "batch_rows": batch_rows, "chunk_mode": plan.mode, "max_drift_auc": max_drift_auc,
                      "fail_on_drift": fail_on_drift, "uncertainty": uncertainty})
    sampler = predictor.drift_sampler(plan.total_rows, drift_rows) if predictor.kind == "tabular" else None
    sink = sampler.add if sampler is not None and sampler.active else None
    writers = [AtomicTableWriter(out, schemas[0])]
    if sub is not None:
        writers.append(AtomicTableWriter(sub, schemas[1], fmt="csv"))
    stack.enter_context(_atomic_outputs(writers))
    spill_dir = None
    if plan.mode == "buckets":
        spill_dir = _temp_name(out, SPILL_SUFFIX)
        with _output_errors(out):
            spill_dir.mkdir()
        stack.callback(shutil.rmtree, spill_dir, True)
    drift: dict[str, Any] | None = None
    n_chunks = 0
    spread_sum, spread_rows = 0.0, 0
    bar = stack.enter_context(_progress(plan.total_rows, quiet, "row"))
    for table in _chunks(inputs, columns, plan, spill_dir):
        pred, spread = _predict_chunk(predictor, table, inputs, uncertainty, sink)
        n_chunks += 1
        if spread is not None:
            scored = spread > 0  # rows the forest scored (zero_when rows get 0)
            spread_sum, spread_rows = spread_sum + float(spread[scored].sum()), spread_rows + int(scored.sum())
        if plan.mode == "whole":  # the whole input is in hand: check before writing a byte
            drift = _drift_gate(sampler, max_drift_auc, fail_on_drift)
        _write_chunk(writers, table, pred, keys, spread)
        bar.update(table.num_rows)
    if drift is None:  # several chunks: the sample spans all of them, so check before publishing
        drift = _drift_gate(sampler, max_drift_auc, fail_on_drift)
    seconds = time.perf_counter() - t0
    rows_out = writers[0].rows
    metrics = {"rows_in": plan.total_rows, "rows_out": rows_out, "seconds": seconds,
               "rows_per_second": plan.total_rows / seconds if seconds > 0 else 0.0, "chunks": n_chunks}
    if drift.get("checked"):
        metrics["drift_auc"] = drift["auc"]
    if uncertainty and spread_rows:
        metrics["spread_mean"] = spread_sum / spread_rows
    _log(run, metrics=metrics)
    if run is not None:
        import mlflow

        mlflow.log_dict(drift, "drift.json")
    _publish(writers)
    log.info("scored %d rows in %.1f s -> %s", rows_out, seconds, out)
    return {"output": str(out), "submission_csv": str(sub) if sub else None, "model": source,
            "key_columns": keys, "chunk_mode": plan.mode, "chunks": n_chunks, "uncertainty": uncertainty,
            "run_id": run.info.run_id if run is not None else None, "drift": drift,
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items()}}


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


# ============================================================================ recommend


def read_user_ids(path: str | Path) -> pd.Series:
    """User ids from Parquet/CSV (column `user`, or the only column) or a text file (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"users file {p}: no such file")
    fmt = _file_format(p)
    if fmt is None:
        with _reading(p):
            lines = p.read_text().splitlines()
        ids = pd.Series([s.strip() for s in lines if s.strip()], dtype=object)
        if ids.empty:
            raise DataError(f"users file {p}: no user ids")
        return ids
    with _reading(p):
        if fmt == "parquet":
            table = pq.read_table(p)
        else:
            names = pacsv.open_csv(p).schema.names
            read, conv = _csv_options({n: pa.string() for n in names})
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


REC_SCHEMA = pa.schema([("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()),
                        ("score", pa.float32()), ("cold_start", pa.bool_())])


def _rec_table(predictor: Any, users: np.ndarray, idx: np.ndarray, sc: np.ndarray, cold: np.ndarray) -> pa.Table:
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
    out = _output_path(output)
    if _needs_tracking(model, track):
        check_tracking_reachable()
    tags = {"tabrec.pipeline": "batch-recommend", "tabrec.output": str(out)}
    with ExitStack() as stack:
        stack.enter_context(output_lock(out))
        run = stack.enter_context(_batch_run(track, experiment, "recommend", tags))
        remove_stale_temps(out)
        _end_stale_runs(run, out)
        result = _recommend(model, out, users, run, stack, k=k, quiet=quiet, exclude_seen=exclude_seen,
                            batch_rows=batch_rows)
    return result


def _recommend(model: str, out: Path, users_path: str | Path | None, run: Any, stack: ExitStack, *,
               k: int, quiet: bool, exclude_seen: bool, batch_rows: int) -> dict[str, Any]:
    from modeling.predictors import load_predictor

    t0 = time.perf_counter()
    predictor = load_predictor(model)
    if predictor.kind != "ratings":
        raise DataError(f"model {model}: recommend needs a ratings model, got a {predictor.kind} model")
    if users_path is None:
        ids = predictor.users.to_numpy(dtype=object)
    else:
        ids = pd.unique(canonical_strings(read_user_ids(users_path)).to_numpy(dtype=object))
    source = _source_info(predictor, model)
    per_chunk = max(1, min(batch_rows // k, SCORE_CELLS // max(predictor.n_items, 1)))
    _log(run, params={"model_uri": model, "model_name": source["name"], "model_version": source["version"],
                      "model_run_id": source["run_id"], "users": str(users_path or "all"), "k": k,
                      "exclude_seen": exclude_seen, "output": str(out), "users_per_chunk": per_chunk})
    writer = AtomicTableWriter(out, REC_SCHEMA)
    stack.enter_context(_atomic_outputs([writer]))
    bar = stack.enter_context(_progress(len(ids), quiet, "user"))
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
    _log(run, metrics=metrics)
    _publish([writer])
    log.info("wrote top-%d for %d users in %.1f s -> %s", k, len(ids), seconds, out)
    return {"output": str(out), "model": source, "k": k,
            "run_id": run.info.run_id if run is not None else None,
            **{m: (round(v, 3) if isinstance(v, float) else v) for m, v in metrics.items()}}
