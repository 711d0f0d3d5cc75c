"""Shared parts of the feature steps: the Step base class and its self-description (StepInfo),
the `Columns` view a pipeline runs its steps over, the step registry, and helpers.

A domain's feature pipeline is a configured list of generic steps; the same fitted pipeline runs
at training, batch-scoring and HTTP time, so there is no training/serving skew. A step's state
is plain data: JSON parameters plus DataFrames (join tables, per-group event history) saved as
Parquet by `FeaturePipeline.save`. Never pickled.

Every `transform` returns a new frame (same index and row order as its input) with columns
added; it never mutates its input.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype

from modeling.errors import DataError

STEP_REGISTRY: dict[str, type[Step]] = {}
FALSE_STRINGS = ["0", "", "false", "False", "FALSE", "no", "No", "n", "f", "0.0"]
_FALSE_TEXT = pd.Index(FALSE_STRINGS, dtype=object)
_FALSE_SET = frozenset(FALSE_STRINGS)
_FEW = 64  # up to this many values a set lookup beats building a pandas Index


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step rebuildable by name from its dict."""
    STEP_REGISTRY[cls.name] = cls
    return cls


# ---------------------------------------------------------------------------- helpers


def truthy(values: pd.Series | np.ndarray) -> np.ndarray:
    """Boolean-ish column -> bool array: nonzero numbers, True, and strings other than
    "0"/""/"false"/"no" are True; missing values are False. A Series or a plain array (the
    small-request path), with the same answers."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "b":
            return values
        if values.dtype.kind in "iuf":
            num = values.astype("float64", copy=False)
            return ~np.isnan(num) & (num != 0)
        if len(values) <= _FEW and all(isinstance(v, str) for v in values.tolist()):
            return np.array([v not in _FALSE_SET for v in values.tolist()], dtype=bool)  # a request's few
        if infer_dtype(values, skipna=False) == "string":  # plain strings: no Series needed
            return _FALSE_TEXT.get_indexer(values) < 0
        values = pd.Series(values, dtype=object, copy=False)
    if pd.api.types.is_bool_dtype(values.dtype):
        return values.fillna(False).to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(values.dtype):
        num = values.to_numpy(dtype="float64", na_value=np.nan)
        return ~np.isnan(num) & (num != 0)
    return (values.notna() & ~values.isin(FALSE_STRINGS + [0, False])).to_numpy(dtype=bool)


def numbers(values: pd.Series | np.ndarray) -> np.ndarray:
    """Column -> float64 array, NaN where missing or not a number (pd.to_numeric, coerce)."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iufb":
            return values.astype("float64")
        values = pd.Series(values, copy=False)
    if not pd.api.types.is_numeric_dtype(values.dtype):
        values = pd.to_numeric(values, errors="coerce")
    return values.to_numpy(dtype="float64", na_value=np.nan)



def require(df: pd.DataFrame | Columns | ArrayColumns, columns: Iterable[str], step: str) -> None:
    """Raise DataError naming the columns a step needs that `df` lacks."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"feature step {step!r}: missing column(s) {missing}; "
                        f"found {list(df.columns)}")


def add_columns(df: pd.DataFrame, cols: Mapping[str, Any]) -> pd.DataFrame:
    """New frame = df plus `cols` (replacing same-named columns); df's column data is shared,
    not copied (setting a column on a shallow copy never writes into df).

    New columns are attached in one concat rather than one insert each: with ~50 feature
    columns, per-column inserts dominated the cost of a small (HTTP-sized) batch."""
    values = {name: v.to_numpy() if isinstance(v, pd.Series) else v for name, v in cols.items()}
    if values and df.index.is_unique and not df.columns.has_duplicates and not (
            set(values) & set(df.columns)):
        new = pd.DataFrame(values, index=df.index)
        return pd.concat([df, new], axis=1, copy=False)
    out = df.copy(deep=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        for name, v in values.items():
            out[name] = v
    return out


def as_datetime(values: pd.Series, column: str, step: str) -> pd.Series:
    """Column -> datetime64[ns] (date strings allowed); DataError when unparseable."""
    if values.dtype == "datetime64[ns]":
        return values
    if pd.api.types.is_datetime64_dtype(values.dtype):
        return values.astype("datetime64[ns]")
    try:
        return pd.to_datetime(values).astype("datetime64[ns]")
    except (ValueError, TypeError) as err:
        raise DataError(f"feature step {step!r}: column {column!r} is not a date ({err})") from None


def datetimes(values: pd.Series | np.ndarray, column: str, step: str) -> np.ndarray:
    """Column -> datetime64[ns] array (`as_datetime` for a Series or a plain array)."""
    if isinstance(values, np.ndarray) and values.dtype == "datetime64[ns]":
        return values
    series = values if isinstance(values, pd.Series) else pd.Series(values, copy=False)
    return as_datetime(series, column, step).to_numpy(dtype="datetime64[ns]")


def missing(values: pd.Series | np.ndarray) -> np.ndarray:
    """Bool array: where a column (Series or plain array) has no value."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iub":
            return np.zeros(len(values), dtype=bool)
        if values.dtype.kind == "f":
            return np.isnan(values)
        if values.dtype.kind in "mM":
            return np.isnat(values)
        return pd.isna(values)
    return values.isna().to_numpy(dtype=bool)


class Positions:
    """`index.get_indexer(values)` (position of each value, -1 where absent) for a unique index,
    with a sorted int64 copy for integer and datetime keys: a plain-array lookup is then one
    searchsorted (no Index built per call, which dominated one-record requests); other keys, and
    Series (the frame path), go to `get_indexer` itself. Same answers either way."""

    def __init__(self, index: pd.Index) -> None:
        self.index = index
        self.kind = index.dtype.kind if isinstance(index.dtype, np.dtype) else ""
        self.keys: np.ndarray | None = None
        # the one array dtype searched directly: the index's own (datetimes only in ns)
        self.dtype = index.dtype if self.kind == "i" or index.dtype == "datetime64[ns]" else None
        if self.kind in "iM" and index.is_unique and len(index):
            raw = index.to_numpy().view(np.int64) if self.kind == "M" else index.to_numpy().astype(np.int64)
            self.order = np.argsort(raw, kind="stable")
            self.keys = raw[self.order]
            self.last = len(raw) - 1

    def __call__(self, values: pd.Series | np.ndarray) -> np.ndarray:
        keys = self.keys
        if keys is not None and type(values) is np.ndarray and values.dtype == self.dtype:
            q = values.view(np.int64) if self.kind == "M" else values.astype(np.int64, copy=False)
            at = np.minimum(keys.searchsorted(q), self.last)
            return np.where(keys[at] == q, self.order[at], -1)
        return self.index.get_indexer(values)


def day_numbers(dates: pd.Series | np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 as int64 (NaT must be excluded by the caller)."""
    values = dates if isinstance(dates, np.ndarray) else dates.to_numpy(dtype="datetime64[ns]")
    return values.astype("datetime64[D]").astype(np.int64)


def int_or_float(values: pd.Series | np.ndarray) -> np.ndarray:
    """int64 when no value is missing, else float64 with NaN."""
    arr = pd.Series(values).astype("float64").to_numpy()
    return arr if np.isnan(arr).any() else arr.astype(np.int64)


def canonical_table(df: pd.DataFrame) -> pd.DataFrame:
    """Reset the index and use NaN for missing values in object columns, so a table is
    identical after JSON or Parquet round trips."""
    out = df.reset_index(drop=True)
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].where(out[c].notna(), np.nan)
    return out


def encode_table(df: pd.DataFrame) -> dict[str, Any]:
    """DataFrame -> JSON-able dict (column order, dtypes, values; dates as ISO strings)."""
    data: dict[str, list[Any]] = {}
    for c in df.columns:
        s = df[c]
        if pd.api.types.is_datetime64_dtype(s.dtype):
            s = s.dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
        data[str(c)] = s.astype(object).where(s.notna(), None).tolist()
    return {"columns": [str(c) for c in df.columns],
            "dtypes": {str(c): str(t) for c, t in df.dtypes.items()}, "data": data}


def decode_table(d: Mapping[str, Any]) -> pd.DataFrame:
    """Inverse of `encode_table`."""
    cols = {}
    for c in d["columns"]:
        dtype = d["dtypes"][c]
        values = d["data"][c]
        if dtype.startswith("datetime64"):
            cols[c] = pd.to_datetime(pd.Series(values, dtype=object)).astype(dtype)
        elif dtype == "object":
            cols[c] = pd.Series(values, dtype=object)
        else:
            cols[c] = pd.Series(values, dtype="float64" if None in values else None).astype(dtype)
    return canonical_table(pd.DataFrame(cols, columns=d["columns"]))




class Columns:
    """A DataFrame plus columns added by steps, without building a frame after every step.

    `FeaturePipeline.transform` runs its steps over this view and builds the output frame once;
    per-step frames (one concat each) dominated the cost of small, HTTP-sized batches."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.frame = df
        self.index = df.index
        self.added: dict[str, Any] = {}
        self._series: dict[str, pd.Series] = {}
        self.columns: list[Any] = list(df.columns)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, name: str) -> pd.Series:
        if name not in self.added:
            return self.frame[name]
        if name not in self._series:
            self._series[name] = pd.Series(self.added[name], index=self.index, name=name, copy=False)
        return self._series[name]

    def add(self, cols: Mapping[str, Any]) -> None:
        for name, values in cols.items():
            self.added[name] = values.to_numpy() if isinstance(values, pd.Series) else values
            self._series.pop(name, None)
        known = set(self.columns)
        self.columns += [c for c in cols if c not in known]

    def to_frame(self) -> pd.DataFrame:
        return add_columns(self.frame, self.added) if self.added else self.frame


class ArrayColumns:
    """Plain arrays by column name, for the small-request path (`FeaturePipeline.transform_arrays`):
    the steps run the same `new_columns` code over it as over a `Columns` view, but `df[name]`
    is a NumPy array (no Series per column and step, which dominated one-record requests)."""

    index = None

    def __init__(self, cols: Mapping[str, np.ndarray], n: int) -> None:
        self.cols = dict(cols)
        self.n = n
        self.columns: list[str] = list(self.cols)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def add(self, cols: Mapping[str, Any]) -> None:
        own = self.cols
        for name, values in cols.items():
            if name not in own:
                self.columns.append(name)
            own[name] = values if type(values) is np.ndarray else (
                values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values))


# ---------------------------------------------------------------------------- step base


@dataclass(frozen=True)
class StepInfo:
    """What a step says about itself, so callers (batch chunking, the drift check, key columns)
    ask the pipeline instead of looking at step names and parameters.

    outputs: the columns the step adds (a join whose column name clashes with an input column
        adds it with its suffix; `outputs` gives the plain names).
    group_columns: rows that share these columns' values must be transformed in one batch: a
        row's values depend on the other rows of its group in the batch. No step of tabrec's
        declares any today (event distances read a calendar instead, `ElapsedEvents`).
    key_columns: input columns that identify a row for the step (e.g. ("Store", "Date"): one
        row per store and day of the event calendar).
    date_columns: input columns the step reads as dates.
    time_relative: output -> why it is a function of the row's date, so that a batch from
        another period differs there by construction, not by drift.
    """

    outputs: tuple[str, ...] = ()
    group_columns: tuple[str, ...] = ()
    key_columns: tuple[str, ...] = ()
    date_columns: tuple[str, ...] = ()
    time_relative: Mapping[str, str] = field(default_factory=dict)


class Step:
    """A feature step: fit on training rows, then add columns to any batch of rows."""

    name: ClassVar[str] = ""

    @property
    def drops_rows(self) -> bool:
        """True when `transform` may drop rows (then `new_columns` cannot be used)."""
        return False

    def describe(self, dates: Collection[str] = ()) -> StepInfo:
        """This step's outputs, grouping, date inputs and time-relative outputs.

        `dates` are the columns the pipeline's other steps read as dates: a step that only
        matches values (a join) learns from them that one of its keys is a date."""
        raise NotImplementedError(f"feature step {self.name!r} does not describe itself")

    def fit(self, df: pd.DataFrame) -> Step:
        return self

    def calendar_columns(self) -> list[str]:
        """Input columns of an event calendar this step reads (group, date, events); [] when the
        step reads none (then `with_calendar` does not apply)."""
        return []

    def with_calendar(self, frame: pd.DataFrame, source: str = "calendar",
                      row_label: Any = None) -> Step:
        """A copy of this fitted step with `frame`'s events laid over its calendar."""
        raise NotImplementedError(f"feature step {self.name!r} reads no event calendar")

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        """The columns this step adds (name -> array), computed from `df`'s columns. `df` is a
        DataFrame, a `Columns` view (what `FeaturePipeline.transform` passes) or an
        `ArrayColumns` view (`transform_arrays`: `df[name]` is then a NumPy array), so a step
        only reads `df[name]`, `df.columns` and `len(df)`, through helpers that take both."""
        raise NotImplementedError

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        return add_columns(df, self.new_columns(df))

    def fit_transform(self, df: pd.DataFrame) -> pd.DataFrame:
        return self.fit(df).transform(df)

    def params(self) -> dict[str, Any]:
        """JSON-able constructor arguments (without tables)."""
        raise NotImplementedError

    def tables(self) -> dict[str, pd.DataFrame]:
        """DataFrames this step holds (given or learned in fit), saved as data."""
        return {}

    def set_tables(self, tables: Mapping[str, pd.DataFrame]) -> None:
        if tables:
            raise ValueError(f"step {self.name!r} holds no tables; got {sorted(tables)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with tables inline; `FeaturePipeline.save` writes them as Parquet."""
        return {"name": self.name, "params": self.params(),
                "tables": {k: encode_table(v) for k, v in self.tables().items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Step:
        """Rebuild from `to_dict` output; tables may be inline dicts or DataFrames."""
        tables = {k: v if isinstance(v, pd.DataFrame) else decode_table(v)
                  for k, v in (d.get("tables") or {}).items()}
        return cls._build(dict(d.get("params") or {}), tables)

    @classmethod
    def _build(cls, params: dict[str, Any], tables: dict[str, pd.DataFrame]) -> Step:
        step = cls(**params)
        step.set_tables(tables)
        return step

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def step_from_dict(d: Mapping[str, Any]) -> Step:
    """Look the step class up by its registered name."""
    name = d.get("name")
    if name not in STEP_REGISTRY:
        raise ValueError(f"unknown feature step {name!r}; known: {sorted(STEP_REGISTRY)}")
    return STEP_REGISTRY[name].from_dict(d)

