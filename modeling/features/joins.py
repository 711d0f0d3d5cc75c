"""Joins against stored tables (store attributes, weather by state and day, ...) and per-group
lookups learned in fit (e.g. "this store opens on Sundays").

A join's outputs are a function of the row's date when one of its keys is a date: a key the
pipeline's other steps read as dates, or a key whose table column holds dates.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from modeling.errors import DataError
from modeling.features.base import (
    Columns,
    Positions,
    Step,
    StepInfo,
    add_columns,
    canonical_table,
    register,
    require,
    truthy,
)


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
        self.dtypes, self.strides = dtypes, strides
        self.uniques = [Positions(u) for u in uniques]
        self.index = Positions(index)
        # one key column: its unique value's code -> table row, so a lookup is one search
        single = len(uniques) == 1 and len(uniques[0]) > 0
        self.rows = index.get_indexer(np.arange(len(uniques[0]), dtype=np.int64)) if single else None

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
        if self.rows is not None:
            part = self.uniques[0](left[0])
            return np.where(part >= 0, self.rows[part], -1)  # part -1 reads the last row: replaced
        combined = np.zeros(len(left[0]), dtype=np.int64)
        unmatched = np.zeros(len(left[0]), dtype=bool)
        for lk, u, stride in zip(left, self.uniques, self.strides, strict=True):
            part = u(lk)
            unmatched |= part < 0
            combined += part * stride
        pos = self.index(combined)
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
        left = [lk if isinstance(lk, pd.Series) else pd.Series(lk, copy=False) for lk in left]
        lcode, rcode = _key_codes(left, [self.table[k] for k in self.on.values()])
        pos = pd.Index(rcode).get_indexer(lcode)
        pos[lcode < 0] = -1
        return pos

    def outputs(self, existing: Iterable[str] = ()) -> list[str]:
        existing = set(existing)
        return [c + self.suffix if c in existing else c for c in self.columns]

    @property
    def drops_rows(self) -> bool:
        return self.how == "inner"

    def date_keys(self, dates: Collection[str] = ()) -> list[str]:
        """Left key columns that hold dates: named in `dates`, or datetime in the table."""
        return [left for left, right in self.on.items()
                if left in dates or pd.api.types.is_datetime64_dtype(self.table[right].dtype)]

    def describe(self, dates: Collection[str] = ()) -> StepInfo:
        """A join on a date key (weather, trends by day) adds time-relative columns, under
        either name the step may give them (plain, or with the suffix on a name clash)."""
        date_keys = self.date_keys(dates)
        time_relative: dict[str, str] = {}
        if date_keys:
            reason = f"joined on the date ({self.label!r} table)"
            time_relative.update({c: reason for c in self.columns})
            time_relative.update({c + self.suffix: reason for c in self.columns})
        return StepInfo(outputs=tuple(self.outputs()), date_columns=tuple(date_keys),
                        time_relative=time_relative)

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
        all_found = bool(found.all())
        cols = {}
        for c, out in zip(self.columns, self.outputs(df.columns), strict=True):
            values = arrays[c]
            taken = values[take] if len(values) else np.full(len(df), np.nan)
            if not all_found:
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
        self._index: tuple[pd.DataFrame, Positions, np.ndarray] | None = None  # (table, its group index, flags)

    def describe(self, dates: Collection[str] = ()) -> StepInfo:
        # the flag is learned in fit: a row's value does not depend on its batch neighbours
        return StepInfo(outputs=(self.out,))

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
            self._index = (self.table, Positions(pd.Index(self.table[self.group])),
                           self.table[self.out].to_numpy())
        _, index, values = self._index
        pos = index(df[self.group])
        out = np.where(pos >= 0, values[np.maximum(pos, 0)] if len(values) else 0, self.default)
        return {self.out: out.astype(np.int64)}

    def params(self) -> dict[str, Any]:
        return {"group": self.group, "column": self.column, "out": self.out,
                "where": self.where, "default": self.default}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {} if self.table is None else {"table": self.table}

    def set_tables(self, tables: Mapping[str, pd.DataFrame]) -> None:
        self.table = tables.get("table")
