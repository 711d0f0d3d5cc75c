"""Generic, serializable feature steps; a domain's feature pipeline is a configured list of them.

The same fitted pipeline runs at training, batch-scoring and HTTP time, so there is no
training/serving skew. A step's state is plain data: JSON parameters plus DataFrames (join
tables, per-group event history) saved as Parquet by `FeaturePipeline.save`. Never pickled.

Every `transform` returns a new frame (same index and row order as its input) with columns
added; it never mutates its input.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from modeling.errors import DataError

FORMAT = "tabrec.features"
FORMAT_VERSION = 1
FEATURES_JSON = "features.json"
TABLES_DIR = "tables"
STEP_REGISTRY: dict[str, type[Step]] = {}
FALSE_STRINGS = ["0", "", "false", "False", "FALSE", "no", "No", "n", "f", "0.0"]


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step rebuildable by name from its dict."""
    STEP_REGISTRY[cls.name] = cls
    return cls


# ---------------------------------------------------------------------------- helpers


def truthy(values: pd.Series) -> np.ndarray:
    """Boolean-ish column -> bool array: nonzero numbers, True, and strings other than
    "0"/""/"false"/"no" are True; missing values are False."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return values.fillna(False).to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(values.dtype):
        num = values.to_numpy(dtype="float64", na_value=np.nan)
        return ~np.isnan(num) & (num != 0)
    return (values.notna() & ~values.isin(FALSE_STRINGS + [0, False])).to_numpy(dtype=bool)


def numbers(values: pd.Series) -> np.ndarray:
    """Column -> float64 array, NaN where missing or not a number (pd.to_numeric, coerce)."""
    if not pd.api.types.is_numeric_dtype(values.dtype):
        values = pd.to_numeric(values, errors="coerce")
    return values.to_numpy(dtype="float64", na_value=np.nan)


def year_month(dates: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(year, month) of a datetime64[ns] column as float64 arrays, NaN for NaT."""
    values = dates.to_numpy(dtype="datetime64[ns]")
    months = values.astype("datetime64[M]")
    nat = np.isnat(months)
    count = np.where(nat, 0, months.astype(np.int64))  # months since 1970-01
    year = np.where(nat, np.nan, count // 12 + 1970)
    return year, np.where(nat, np.nan, count % 12 + 1)


def require(df: pd.DataFrame | Columns, columns: Iterable[str], step: str) -> None:
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


def day_numbers(dates: pd.Series) -> np.ndarray:
    """Days since 1970-01-01 as int64 (NaT must be excluded by the caller)."""
    return dates.to_numpy(dtype="datetime64[ns]").astype("datetime64[D]").astype(np.int64)


def _int_or_float(values: pd.Series | np.ndarray) -> np.ndarray:
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


def _cast_table(df: pd.DataFrame, columns: Sequence[str], dtypes: Mapping[str, str]) -> pd.DataFrame:
    df = df[list(columns)]
    return canonical_table(df.astype({c: dtypes[c] for c in columns}))


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


# ---------------------------------------------------------------------------- step base


class Step:
    """A feature step: fit on training rows, then add columns to any batch of rows."""

    name: ClassVar[str] = ""

    def fit(self, df: pd.DataFrame) -> Step:
        return self

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        """The columns this step adds (name -> array), computed from `df`'s columns. `df` is a
        DataFrame or a `Columns` view (what `FeaturePipeline.transform` passes), so a step only
        reads `df[name]`, `df.columns`, `df.index` and `len(df)`."""
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


# ---------------------------------------------------------------------------- date parts

DATE_ATTRS = ("Year", "Month", "Week", "Day", "Dayofweek", "Dayofyear", "Is_month_end",
              "Is_month_start", "Is_quarter_end", "Is_quarter_start", "Is_year_end",
              "Is_year_start", "Elapsed")


def _date_parts(values: np.ndarray, attrs: Sequence[str]) -> dict[str, np.ndarray]:
    """Calendar parts of datetime64[ns] values with numpy calendar arithmetic (no pandas
    accessors): int64 when no value is NaT, else float64 with NaN; Is_* flags are 0 for NaT."""
    nat = np.isnat(values)
    day = np.where(nat, np.datetime64(0, "D"), values.astype("datetime64[D]"))
    month_start = day.astype("datetime64[M]")
    year_start = day.astype("datetime64[Y]")
    days = day.astype(np.int64)
    year = year_start.astype(np.int64) + 1970
    month = month_start.astype(np.int64) % 12 + 1
    dom = (day - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    dow = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    month_end = (day + 1).astype("datetime64[M]") != month_start
    out: dict[str, np.ndarray] = {}
    for a in attrs:
        if a == "Year":
            v = year
        elif a == "Month":
            v = month
        elif a == "Day":
            v = dom
        elif a == "Dayofweek":
            v = dow
        elif a == "Dayofyear":
            v = (day - year_start.astype("datetime64[D]")).astype(np.int64) + 1
        elif a == "Week":  # ISO week: the week (Monday..Sunday) holding this week's Thursday
            thursday = day + (3 - dow)
            v = (thursday - thursday.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64) // 7 + 1
        elif a == "Elapsed":
            v = days
        else:
            flag = {"Is_month_end": month_end,
                    "Is_month_start": dom == 1,
                    "Is_quarter_end": month_end & (month % 3 == 0),
                    "Is_quarter_start": (dom == 1) & (month % 3 == 1),
                    "Is_year_end": (month == 12) & (dom == 31),
                    "Is_year_start": (month == 1) & (dom == 1)}[a]
            out[a] = (flag & ~nat).astype(np.int64)
            continue
        out[a] = np.where(nat, np.nan, v) if nat.any() else v.astype(np.int64)
    return out


@register
class DateParts(Step):
    """Calendar parts of a date column: Year, Month, ISO Week, Day, Dayofweek (Monday=0),
    Dayofyear, Is_* flags (0/1) and Elapsed (whole days since 1970-01-01).

    Column names are `prefix + attr`; the default prefix is the field name without a trailing
    "Date"/"date" (so field "Date" gives "Year", "Month", ...).
    """

    name = "date_parts"

    def __init__(self, field: str, prefix: str | None = None,
                 attrs: Sequence[str] | None = None) -> None:
        attrs = list(attrs or DATE_ATTRS)
        unknown = [a for a in attrs if a not in DATE_ATTRS]
        if unknown:
            raise ValueError(f"DateParts: unknown attrs {unknown}; known {list(DATE_ATTRS)}")
        self.field, self.attrs = field, attrs
        if prefix is None:
            prefix = field[:-4] if field.lower().endswith("date") else field + "_"
        self.prefix = prefix

    def outputs(self) -> list[str]:
        return [self.prefix + a for a in self.attrs]

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        require(df, [self.field], self.name)
        dates = as_datetime(df[self.field], self.field, self.name).to_numpy(dtype="datetime64[ns]")
        if len(dates) > 64:  # few distinct days in a big batch: compute once per day
            codes, uniques = pd.factorize(dates)
            uniq = np.append(uniques.astype("datetime64[ns]"), np.datetime64("NaT", "ns"))
            take = np.where(codes < 0, len(uniques), codes)
            parts = _date_parts(uniq, self.attrs)
            cols = {a: _int_or_float(v[take]) if v.dtype.kind == "f" else v[take] for a, v in parts.items()}
        else:
            cols = _date_parts(dates, self.attrs)
        return {self.prefix + a: cols[a] for a in self.attrs}

    def params(self) -> dict[str, Any]:
        return {"field": self.field, "prefix": self.prefix, "attrs": self.attrs}


# ---------------------------------------------------------------------------- joins


def _key_codes(left: list[pd.Series], right: list[pd.Series]) -> tuple[np.ndarray, np.ndarray]:
    """Joint integer codes for (multi-column) keys of both sides; -1 where a key part is missing."""
    n = len(left[0])
    code: np.ndarray | None = None
    for lk, rk in zip(left, right, strict=True):
        if lk.dtype != rk.dtype and pd.api.types.is_datetime64_dtype(lk.dtype):
            rk = rk.astype(lk.dtype)
        part, _ = pd.factorize(pd.concat([lk, rk], ignore_index=True))
        if code is None:
            code = part
            continue
        missing = (code < 0) | (part < 0)
        combined, _ = pd.factorize(code.astype(np.int64) * (int(part.max()) + 1) + part)
        code = np.where(missing, -1, combined)
    assert code is not None
    return code[:n], code[n:]


class _TableKeys:
    """A unique table's key columns, indexed once: left rows are matched with get_indexer
    instead of factorizing the whole table on every call. Used only when every left key
    column has exactly the table's dtype, where matching equals `_key_codes` matching."""

    def __init__(self, dtypes: list[Any], uniques: list[pd.Index], strides: np.ndarray,
                 index: pd.Index) -> None:
        self.dtypes, self.uniques, self.strides, self.index = dtypes, uniques, strides, index

    @classmethod
    def build(cls, right: list[pd.Series]) -> _TableKeys | None:
        parts, uniques = [], []
        for rk in right:
            codes, u = pd.factorize(rk)
            parts.append(codes.astype(np.int64))
            uniques.append(pd.Index(u, dtype=rk.dtype))
        sizes = [max(len(u), 1) for u in uniques]
        if float(np.prod(np.array(sizes, dtype=np.float64))) >= 2.0**62:
            return None  # combined codes would overflow: use the general path
        strides = np.cumprod([1, *sizes[:-1]]).astype(np.int64)
        combined = sum(p * st for p, st in zip(parts, strides, strict=True))
        return cls([rk.dtype for rk in right], uniques, strides,
                   pd.Index(np.asarray(combined, dtype=np.int64)))

    def accepts(self, left: list[pd.Series]) -> bool:
        return all(lk.dtype == dt for lk, dt in zip(left, self.dtypes, strict=True))

    def positions(self, left: list[pd.Series]) -> np.ndarray:
        combined = np.zeros(len(left[0]), dtype=np.int64)
        unmatched = np.zeros(len(left[0]), dtype=bool)
        for lk, u, stride in zip(left, self.uniques, self.strides, strict=True):
            part = u.get_indexer(lk)
            unmatched |= part < 0
            combined += part * stride
        pos = self.index.get_indexer(combined)
        pos[unmatched] = -1
        return pos


@register
class JoinTable(Step):
    """Left-join columns of a stored table on key columns (right side must be unique on the key).

    `on` is a list of shared names or a dict left->right. Rows with no match get NaN; integer
    and boolean table columns are returned as float64 so dtypes do not depend on whether a
    batch happens to contain an unknown key. A table column whose name already exists in the
    input gets `suffix`. With how="inner", unmatched rows are dropped.
    """

    name = "join_table"

    def __init__(self, table: pd.DataFrame, on: str | Sequence[str] | Mapping[str, str],
                 columns: Sequence[str] | None = None, how: str = "left",
                 suffix: str = "_right", label: str = "table") -> None:
        if how not in ("left", "inner"):
            raise ValueError(f"JoinTable: how must be 'left' or 'inner', got {how!r}")
        if isinstance(on, str):
            on = [on]
        self.on: dict[str, str] = dict(on) if isinstance(on, Mapping) else {k: k for k in on}
        right_keys = list(self.on.values())
        require(table, right_keys, f"{self.name}:{label}")
        self.columns = list(columns) if columns is not None else [
            c for c in table.columns if c not in right_keys]
        require(table, self.columns, f"{self.name}:{label}")
        self.how, self.suffix, self.label = how, suffix, label
        table = table[right_keys + self.columns].dropna(subset=right_keys)
        dup = table.duplicated(right_keys, keep=False)
        if dup.any():
            shown = table.loc[dup, right_keys].drop_duplicates().head(5).to_dict("records")
            raise DataError(f"JoinTable {label!r}: table is not unique on {right_keys}; "
                            f"{int(dup.sum())} rows share a key, e.g. {shown}")
        self.table = canonical_table(table)
        self._cache: tuple[pd.DataFrame, _TableKeys | None, dict[str, np.ndarray]] | None = None

    def _lookup(self) -> tuple[_TableKeys | None, dict[str, np.ndarray]]:
        """The table's key index and output columns as arrays, built once per table."""
        if self._cache is None or self._cache[0] is not self.table:
            keys = _TableKeys.build([self.table[k] for k in self.on.values()])
            arrays = {}
            for c in self.columns:
                values = self.table[c].to_numpy()
                arrays[c] = values.astype("float64") if values.dtype.kind in "biu" else values
            self._cache = (self.table, keys, arrays)
        return self._cache[1], self._cache[2]

    def _positions(self, df: pd.DataFrame | Columns, keys: _TableKeys | None) -> np.ndarray:
        """Table row of each input row, -1 where none matches."""
        left = [df[k] for k in self.on]
        if keys is not None and keys.accepts(left):
            return keys.positions(left)
        lcode, rcode = _key_codes(left, [self.table[k] for k in self.on.values()])
        pos = pd.Index(rcode).get_indexer(lcode)
        pos[lcode < 0] = -1
        return pos

    def outputs(self, existing: Iterable[str] = ()) -> list[str]:
        existing = set(existing)
        return [c + self.suffix if c in existing else c for c in self.columns]

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        cols, found = self._join(df)
        result = add_columns(df, cols)
        return result[found] if self.how == "inner" else result

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        if self.how == "inner":
            raise NotImplementedError("an inner JoinTable drops rows: use transform()")
        return self._join(df)[0]

    def _join(self, df: pd.DataFrame | Columns) -> tuple[dict[str, Any], np.ndarray]:
        """(joined columns, which rows found a match)."""
        require(df, list(self.on), f"{self.name}:{self.label}")
        keys, arrays = self._lookup()
        pos = self._positions(df, keys)
        found = pos >= 0
        take = np.where(found, pos, 0)
        cols = {}
        for c, out in zip(self.columns, self.outputs(df.columns), strict=True):
            values = arrays[c]
            taken = values[take] if len(values) else np.full(len(df), np.nan)
            if not found.all():
                if taken.dtype.kind in "fO":
                    taken[~found] = np.nan  # `taken` is a fresh copy (fancy indexing)
                else:
                    taken = pd.Series(taken).where(found, np.nan if taken.dtype.kind != "M"
                                                   else pd.NaT).to_numpy()
            cols[out] = taken
        return cols, found

    def params(self) -> dict[str, Any]:
        return {"on": self.on, "columns": self.columns, "how": self.how, "suffix": self.suffix,
                "label": self.label}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"table": self.table}

    @classmethod
    def _build(cls, params: dict[str, Any], tables: dict[str, pd.DataFrame]) -> Step:
        return cls(tables["table"], **params)


# ---------------------------------------------------------------------------- per-group lookups


@register
class GroupAny(Step):
    """Per-group flag learned in fit: 1 if any fitted row of the group has `column` truthy
    (optionally only rows where each `where` column equals its value); unseen groups get
    `default`. Example: a store "opens on Sundays" = any(Open) where DayOfWeek == 7."""

    name = "group_any"

    def __init__(self, group: str, column: str, out: str,
                 where: Mapping[str, Any] | None = None, default: int = 0) -> None:
        self.group, self.column, self.out = group, column, out
        self.where = dict(where or {})
        self.default = default
        self.table: pd.DataFrame | None = None
        self._index: tuple[pd.DataFrame, pd.Index] | None = None  # (table, its group index)

    def fit(self, df: pd.DataFrame) -> GroupAny:
        require(df, [self.group, self.column, *self.where], self.name)
        mask = truthy(df[self.column])
        for col, value in self.where.items():
            mask &= (df[col] == value).to_numpy()
        flags = pd.Series(mask, index=df.index).groupby(df[self.group].to_numpy()).any()
        self.table = pd.DataFrame({self.group: flags.index.to_numpy(),
                                   self.out: flags.to_numpy().astype(np.int64)})
        return self

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        if self.table is None:
            raise RuntimeError(f"{self.name}: call fit() before transform()")
        require(df, [self.group], self.name)
        if self._index is None or self._index[0] is not self.table:
            self._index = (self.table, pd.Index(self.table[self.group]))
        pos = self._index[1].get_indexer(df[self.group])
        values = self.table[self.out].to_numpy()
        out = np.where(pos >= 0, values[np.maximum(pos, 0)] if len(values) else 0, self.default)
        return {self.out: out.astype(np.int64)}

    def params(self) -> dict[str, Any]:
        return {"group": self.group, "column": self.column, "out": self.out,
                "where": self.where, "default": self.default}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {} if self.table is None else {"table": self.table}

    def set_tables(self, tables: Mapping[str, pd.DataFrame]) -> None:
        self.table = tables.get("table")


MONTH_NAMES = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


@register
class MonthInList(Step):
    """1 when the month of `date_col` is named in the `sep`-separated list in `list_col`
    (e.g. "Jan,Apr,Jul,Oct") and every `require` column is truthy, else 0 (missing list -> 0)."""

    name = "month_in_list"

    def __init__(self, list_col: str, date_col: str, out: str,
                 month_names: Sequence[str] = MONTH_NAMES, sep: str = ",",
                 require: Sequence[str] = ()) -> None:
        if len(month_names) != 12:
            raise ValueError("MonthInList: month_names must name the 12 months")
        self.list_col, self.date_col, self.out = list_col, date_col, out
        self.month_names, self.sep, self.require = list(month_names), sep, list(require)

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        require(df, [self.list_col, self.date_col, *self.require], self.name)
        codes, uniques = pd.factorize(df[self.list_col])
        # one row per distinct list value (+1 all-False row for missing); few distinct values
        lookup = np.zeros((len(uniques) + 1, 12), dtype=bool)
        for i, text in enumerate(uniques):
            parts = {p.strip() for p in str(text).split(self.sep)}
            lookup[i] = [m in parts for m in self.month_names]
        _, month = year_month(as_datetime(df[self.date_col], self.date_col, self.name))
        known = ~np.isnan(month)
        month_idx = np.where(known, month, 1).astype(np.int64) - 1
        flag = lookup[np.where(codes < 0, len(uniques), codes), month_idx] & known
        for col in self.require:
            flag &= truthy(df[col])
        return {self.out: flag.astype(np.int64)}

    def params(self) -> dict[str, Any]:
        return {"list_col": self.list_col, "date_col": self.date_col, "out": self.out,
                "month_names": self.month_names, "sep": self.sep, "require": self.require}


# ---------------------------------------------------------------------------- durations


class _Duration(Step):
    """Shared parts of MonthsSince/WeeksSince: clipped integer durations, sentinel if unknown."""

    def __init__(self, date_col: str, out: str, clip: Sequence[int], missing: int) -> None:
        self.date_col, self.out = date_col, out
        self.clip = (int(clip[0]), int(clip[1]))
        self.missing = int(missing)

    def _finish(self, raw: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
        clipped = np.clip(np.where(valid, raw, 0), *self.clip)
        return {self.out: np.where(valid, clipped, self.missing).astype(np.int64)}


@register
class MonthsSince(_Duration):
    """Calendar months from (year, month) to the row's date, clipped to `clip`
    (e.g. 0..24: not yet started -> 0). Missing or invalid year/month -> `missing` (-1)."""

    name = "months_since"

    def __init__(self, year_col: str, month_col: str, date_col: str, out: str,
                 clip: Sequence[int] = (0, 24), missing: int = -1) -> None:
        super().__init__(date_col, out, clip, missing)
        self.year_col, self.month_col = year_col, month_col

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        require(df, [self.year_col, self.month_col, self.date_col], self.name)
        date_year, date_month = year_month(as_datetime(df[self.date_col], self.date_col, self.name))
        year = numbers(df[self.year_col])
        month = numbers(df[self.month_col])
        valid = ~np.isnan(year) & (month >= 1) & (month <= 12) & ~np.isnan(date_year)
        months = (date_year - year) * 12 + date_month - month
        return self._finish(np.nan_to_num(months), valid)

    def params(self) -> dict[str, Any]:
        return {"year_col": self.year_col, "month_col": self.month_col,
                "date_col": self.date_col, "out": self.out, "clip": list(self.clip),
                "missing": self.missing}


def iso_week_monday(year: np.ndarray, week: np.ndarray) -> np.ndarray:
    """datetime64[D] of the Monday starting ISO week `week` of ISO year `year` (int arrays)."""
    jan4 = (year - 1970).astype("datetime64[Y]").astype("datetime64[D]") + 3
    weekday = (jan4.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return jan4 - weekday + (week - 1) * 7


@register
class WeeksSince(_Duration):
    """Whole weeks from the Monday of ISO week (year, week) to the row's date, clipped to
    `clip` (e.g. 0..25: not yet started -> 0). Missing or invalid year/week -> `missing` (-1)."""

    name = "weeks_since"

    def __init__(self, year_col: str, week_col: str, date_col: str, out: str,
                 clip: Sequence[int] = (0, 25), missing: int = -1) -> None:
        super().__init__(date_col, out, clip, missing)
        self.year_col, self.week_col = year_col, week_col

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        require(df, [self.year_col, self.week_col, self.date_col], self.name)
        dates = as_datetime(df[self.date_col], self.date_col, self.name).to_numpy(dtype="datetime64[ns]")
        year = numbers(df[self.year_col])
        week = numbers(df[self.week_col])
        nat = np.isnat(dates)
        valid = (year >= 1900) & (year <= 2200) & (week >= 1) & (week <= 53) & ~nat
        start = iso_week_monday(np.where(valid, year, 1970).astype(np.int64),
                                np.where(valid, week, 1).astype(np.int64))
        day = np.where(nat, np.datetime64(0, "D"), dates.astype("datetime64[D]"))
        days = day.astype(np.int64) - start.astype(np.int64)
        return self._finish(np.floor_divide(days, 7), valid)

    def params(self) -> dict[str, Any]:
        return {"year_col": self.year_col, "week_col": self.week_col,
                "date_col": self.date_col, "out": self.out, "clip": list(self.clip),
                "missing": self.missing}


# ---------------------------------------------------------------------------- elapsed events

_SHIFT = np.int64(32)
_OFFSET = np.int64(1 << 31)


def _keys(codes: np.ndarray, days: np.ndarray) -> np.ndarray:
    """(group code, day) -> one sortable int64 so a single searchsorted serves all groups."""
    return (codes.astype(np.int64) << _SHIFT) | (days + _OFFSET)


@register
class ElapsedEvents(Step):
    """Per-group distances to event days, by calendar day (gaps in a group's rows are fine).

    For each event column `e` (0/1 or boolean-ish, see `truthy`), per `group`, for a row on day d:
      - `After{e}`:  days since the latest event day <= d (0 when the event is on d), as the
        fast.ai course does ("since last, including today");
      - `Before{e}`: days until the earliest event day >= d (0 when the event is on d);
      - `{e}_bw`: number of event days in [d - window + 1, d]; `{e}_fw`: in [d, d + window - 1].
    Both distances are clipped to [0, cap]; "no such event known" is reported as `cap`.

    fit() keeps, per group, the last event day of each kind and every event day in the last
    `window` days before the end of the fitted data. transform() merges that history with the
    event days present in the batch itself (batch rows win on the same group/day), so rows
    dated after training get exactly the same After/_bw values as one pass over all rows; the
    Before/_fw values equal it when the next event lies inside the batch, and are `cap`/partial
    counts otherwise. Row order does not matter.
    """

    name = "elapsed_events"

    def __init__(self, group: str, date: str, events: Sequence[str], window: int = 7,
                 cap: int = 365, after_prefix: str = "After", before_prefix: str = "Before") -> None:
        if window < 1 or cap < 1:
            raise ValueError("ElapsedEvents: window and cap must be >= 1")
        self.group, self.date, self.events = group, date, list(events)
        self.window, self.cap = int(window), int(cap)
        self.after_prefix, self.before_prefix = after_prefix, before_prefix
        self.history: pd.DataFrame | None = None
        self._cache: tuple[pd.DataFrame, pd.Index, dict[str, np.ndarray]] | None = None

    def outputs(self) -> list[str]:
        return [name for e in self.events for name in (
            self.after_prefix + e, self.before_prefix + e, f"{e}_bw", f"{e}_fw")]

    def _inputs(self, df: pd.DataFrame | Columns) -> tuple[pd.Series, np.ndarray, dict[str, np.ndarray]]:
        require(df, [self.group, self.date, *self.events], self.name)
        dates = as_datetime(df[self.date], self.date, self.name)
        bad = dates.isna().to_numpy() | df[self.group].isna().to_numpy()
        if bad.any():
            first = np.flatnonzero(bad)[:5].tolist()
            raise DataError(f"feature step {self.name!r}: missing {self.group!r} or "
                            f"{self.date!r} in row position(s) {first}")
        flags = {e: truthy(df[e]) for e in self.events}
        return df[self.group], day_numbers(dates), flags

    def fit(self, df: pd.DataFrame) -> ElapsedEvents:
        group, days, flags = self._inputs(df)
        end = days.max() if len(days) else 0
        keep = np.zeros(len(df), dtype=bool)
        gvals = group.to_numpy()
        for f in flags.values():
            keep |= f & (days > end - self.window)
            if f.any():  # the last event day of this kind in each group
                last = pd.Series(days[f]).groupby(gvals[f]).transform("max").to_numpy()
                keep[np.flatnonzero(f)[days[f] == last]] = True
        hist = pd.DataFrame({self.group: gvals[keep],
                             self.date: days[keep].astype("datetime64[D]").astype("datetime64[ns]"),
                             **{e: f[keep].astype(np.int64) for e, f in flags.items()}})
        hist = hist.groupby([self.group, self.date], as_index=False, sort=True).max()
        self.history = canonical_table(hist)
        return self

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        if self.history is None:
            raise RuntimeError(f"{self.name}: call fit() before transform()")
        group, days, flags = self._inputs(df)
        groups, hist_events = self._history_keys()
        codes = groups.get_indexer(group)
        unseen = codes < 0
        if unseen.any():  # groups without history get codes of their own
            codes[unseen] = len(groups) + pd.factorize(group[unseen])[0]
        bkeys = _keys(codes, days)
        cols: dict[str, np.ndarray] = {}
        for e in self.events:
            hist_ev = hist_events[e]
            hist_ev = hist_ev[~np.isin(hist_ev, bkeys)]  # the batch wins where it has the same group/day
            ev = np.unique(np.concatenate([bkeys[flags[e]], hist_ev]))
            since, until, bw, fw = self._distances(ev, bkeys)
            cols[self.after_prefix + e] = since
            cols[self.before_prefix + e] = until
            cols[f"{e}_bw"], cols[f"{e}_fw"] = bw, fw
        return cols

    def _history_keys(self) -> tuple[pd.Index, dict[str, np.ndarray]]:
        """(history's distinct groups, per event the sorted keys of its history event days),
        computed once per history table rather than on every transform."""
        hist = self.history
        assert hist is not None
        if self._cache is None or self._cache[0] is not hist:
            codes, groups = pd.factorize(hist[self.group])
            keys = _keys(codes, day_numbers(hist[self.date]))
            events = {e: np.unique(keys[hist[e].to_numpy() != 0]) for e in self.events}
            self._cache = (hist, pd.Index(groups), events)
        return self._cache[1], self._cache[2]

    def _distances(self, ev: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, ...]:
        """ev: sorted unique event keys; q: row keys. Keys of different groups never mix
        because a group's keys form a contiguous block of the int64 range."""
        cap, w = self.cap, self.window
        if len(ev) == 0:
            full = np.full(len(q), cap, dtype=np.int64)
            return full, full.copy(), np.zeros(len(q), np.int64), np.zeros(len(q), np.int64)
        group = q >> _SHIFT
        right = np.searchsorted(ev, q, "right")
        left = np.searchsorted(ev, q, "left")
        prev = ev[np.maximum(right - 1, 0)]
        has_prev = (right > 0) & ((prev >> _SHIFT) == group)
        since = np.where(has_prev, q - prev, cap)
        nxt = ev[np.minimum(left, len(ev) - 1)]
        has_next = (left < len(ev)) & ((nxt >> _SHIFT) == group)
        until = np.where(has_next, nxt - q, cap)
        bw = right - np.searchsorted(ev, q - (w - 1), "left")
        fw = np.searchsorted(ev, q + (w - 1), "right") - left
        return (np.clip(since, 0, cap).astype(np.int64), np.clip(until, 0, cap).astype(np.int64),
                bw.astype(np.int64), fw.astype(np.int64))

    def params(self) -> dict[str, Any]:
        return {"group": self.group, "date": self.date, "events": self.events,
                "window": self.window, "cap": self.cap, "after_prefix": self.after_prefix,
                "before_prefix": self.before_prefix}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {} if self.history is None else {"history": self.history}

    def set_tables(self, tables: Mapping[str, pd.DataFrame]) -> None:
        self.history = tables.get("history")


# ---------------------------------------------------------------------------- pipeline


class FeaturePipeline:
    """An ordered list of steps; each step is fitted on the output of the previous ones."""

    def __init__(self, steps: Sequence[Step], meta: Mapping[str, Any] | None = None) -> None:
        self.steps = list(steps)
        self.meta = dict(meta or {})

    def fit(self, df: pd.DataFrame) -> FeaturePipeline:
        self.fit_transform(df)
        return self

    def fit_transform(self, df: pd.DataFrame) -> pd.DataFrame:
        for step in self.steps:
            df = step.fit(df).transform(df)
        return df

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Run every step over a `Columns` view and build the output frame once (an inner
        join, which drops rows, materialises the frame at that step)."""
        view = Columns(df)
        for step in self.steps:
            if isinstance(step, JoinTable) and step.how == "inner":
                view = Columns(step.transform(view.to_frame()))
            else:
                view.add(step.new_columns(view))
        return view.to_frame()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with every table inline (small pipelines, tests, embedding)."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "meta": self.meta,
                "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeaturePipeline:
        if d.get("format", FORMAT) != FORMAT or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported feature pipeline format {d.get('format')!r} "
                             f"version {d.get('version')!r} (need {FORMAT} {FORMAT_VERSION})")
        return cls([step_from_dict(s) for s in d["steps"]], d.get("meta"))

    def save(self, folder: str | Path) -> Path:
        """Write features.json plus tables/<NN>_<step>_<table>.parquet (dtypes kept in JSON)."""
        root = Path(folder)
        (root / TABLES_DIR).mkdir(parents=True, exist_ok=True)
        steps = []
        for i, step in enumerate(self.steps):
            refs = {}
            for tname, table in step.tables().items():
                rel = f"{TABLES_DIR}/{i:02d}_{step.name}_{tname}.parquet"
                table.to_parquet(root / rel, index=False)
                refs[tname] = {"path": rel, "columns": [str(c) for c in table.columns],
                               "dtypes": {str(c): str(t) for c, t in table.dtypes.items()}}
            steps.append({"name": step.name, "params": step.params(), "tables": refs})
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "meta": self.meta, "steps": steps}
        (root / FEATURES_JSON).write_text(json.dumps(doc, indent=1))
        return root

    @classmethod
    def load(cls, folder: str | Path) -> FeaturePipeline:
        root = Path(folder)
        path = root / FEATURES_JSON
        if not path.is_file():
            raise DataError(f"{root}: no {FEATURES_JSON}")
        doc = json.loads(path.read_text())
        for step in doc.get("steps", []):
            for tname, ref in (step.get("tables") or {}).items():
                table = pd.read_parquet(root / ref["path"])
                step["tables"][tname] = _cast_table(table, ref["columns"], ref["dtypes"])
        return cls.from_dict(doc)

    def __repr__(self) -> str:
        return "FeaturePipeline([\n  " + ",\n  ".join(map(repr, self.steps)) + "\n])"
