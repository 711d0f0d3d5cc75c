"""Reading a batch job's --input: one Parquet/CSV file or a directory of them, streamed with pyarrow.

Every file must have the first file's columns (Parquet: and types), so a job can read them in
one pass as if they were one table. Batches carry a global row number (`ROW`) so that a rejected
row can be reported as "file, CSV line / Parquet row" however the input was chunked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from modeling.errors import DataError

ROW = "__row"  # global input row number carried through chunking, for error locations
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")


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


def file_format(path: Path) -> str | None:
    """"parquet" or "csv" from the file name, None for anything else."""
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
        if file_format(root) is None:
            raise DataError(f"input {root}: not a Parquet (.parquet/.pq) or CSV (.csv/.csv.gz) file")
        return [root]
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.name.startswith((".", "_")) and file_format(p))
    if not files:
        raise DataError(f"input {root}: directory holds no .parquet/.pq/.csv/.csv.gz files")
    return files


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Map pyarrow read failures (corrupt, truncated, unparseable) to a DataError naming the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"input {path}: cannot read ({type(exc).__name__}: {exc})") from exc


def csv_options(types: dict[str, pa.DataType] | None, columns: Sequence[str] | None = None,
                block_size: int = 1 << 20) -> tuple[pacsv.ReadOptions, pacsv.ConvertOptions]:
    read = pacsv.ReadOptions(block_size=block_size)
    conv = pacsv.ConvertOptions(column_types=types or {}, strings_can_be_null=True,
                                include_columns=list(columns) if columns is not None else None)
    return read, conv


def _csv_schema(path: Path, string_columns: Sequence[str]) -> pa.Schema:
    """Column names and types inferred from the first block (text columns forced to string)."""
    with reading(path):
        read, conv = csv_options({c: pa.string() for c in string_columns})
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
    formats = {file_format(f) for f in files}
    if len(formats) > 1:
        raise DataError(f"input {path}: mixes Parquet and CSV files; use one format per directory")
    fmt = formats.pop() or "csv"
    schemas = []
    for f in files:
        if fmt == "parquet":
            with reading(f):
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
        with reading(path):
            it = pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=list(columns))
    else:
        types = {c: inputs.csv_types[c] for c in columns}
        block = int(min(max(batch_rows * 64, 1 << 20), 1 << 28))
        read, conv = csv_options(types, columns, block_size=block)
        with reading(path):
            it = pacsv.open_csv(path, read_options=read, convert_options=conv)
    while True:
        with reading(path):
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
            with reading(path):
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
