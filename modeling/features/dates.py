"""Date steps: calendar parts of a date, durations from a (year, month|week) to the row's date,
and "is the date's month in this list" flags.

Every output here is a function of the row's date (a time-relative column, in `describe`),
except the date parts that stay comparable between periods (Dayofweek, the Is_* flags).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import pandas as pd

from modeling.features.base import (
    Columns,
    Step,
    StepInfo,
    datetimes,
    int_or_float,
    numbers,
    register,
    require,
    truthy,
)

CALENDAR_REASON = "calendar part of the date"
DURATION_REASON = "duration up to the row's date"
MONTH_FLAG_REASON = "flag of the date's month"


def year_month(dates: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(year, month) of a datetime64[ns] column as float64 arrays, NaN for NaT."""
    values = dates if isinstance(dates, np.ndarray) else dates.to_numpy(dtype="datetime64[ns]")
    months = values.astype("datetime64[M]")
    nat = np.isnat(months)
    count = np.where(nat, 0, months.astype(np.int64))  # months since 1970-01
    year = np.where(nat, np.nan, count // 12 + 1970)
    return year, np.where(nat, np.nan, count % 12 + 1)


# ---------------------------------------------------------------------------- date parts


DATE_ATTRS = ("Year", "Month", "Week", "Day", "Dayofweek", "Dayofyear", "Is_month_end",
              "Is_month_start", "Is_quarter_end", "Is_quarter_start", "Is_year_end",
              "Is_year_start", "Elapsed")
# Parts that place the row in its year (or in time at all): a batch from a few weeks covers only
# part of their range. Dayofweek recurs every week and the Is_* flags are rare 0/1 marks, so
# those stay comparable between a batch and the training rows (not time-relative).
CALENDAR_ATTRS = ("Year", "Month", "Week", "Day", "Dayofyear", "Elapsed")
TABLE_YEARS = (1970, 2100)  # small requests read date parts from a table of these years' days (5 MB)


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
        self._table: np.ndarray | None = None  # [attrs, days of TABLE_YEARS], built on first small call

    def outputs(self) -> list[str]:
        return [self.prefix + a for a in self.attrs]

    def _small(self, dates: np.ndarray) -> dict[str, np.ndarray]:
        """A request's few dates: their parts read from a table of every day in TABLE_YEARS (one
        take instead of some forty NumPy calls per request), computed once by `_date_parts`
        itself, so the values are the same; NaT and days outside the table are computed."""
        days = dates.astype("datetime64[D]").astype(np.int64)  # NaT reads as the smallest int64
        first, end = (np.datetime64(f"{y}-01-01", "D").astype(np.int64) for y in TABLE_YEARS)
        if len(days) == 0 or days.min() < first or days.max() >= end:
            return _date_parts(dates, self.attrs)
        if self._table is None:
            every = np.arange(first, end).astype("datetime64[D]").astype("datetime64[ns]")
            parts = _date_parts(every, self.attrs)
            self._table = np.stack([parts[a] for a in self.attrs])
        rows = self._table[:, days - first]
        return {a: rows[i] for i, a in enumerate(self.attrs)}

    def describe(self, dates: Collection[str] = ()) -> StepInfo:
        return StepInfo(outputs=tuple(self.outputs()), date_columns=(self.field,),
                        time_relative={self.prefix + a: CALENDAR_REASON
                                       for a in self.attrs if a in CALENDAR_ATTRS})

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        require(df, [self.field], self.name)
        dates = datetimes(df[self.field], self.field, self.name)
        if len(dates) > 64:  # few distinct days in a big batch: compute once per day
            codes, uniques = pd.factorize(dates)
            uniq = np.append(uniques.astype("datetime64[ns]"), np.datetime64("NaT", "ns"))
            take = np.where(codes < 0, len(uniques), codes)
            parts = _date_parts(uniq, self.attrs)
            cols = {a: int_or_float(v[take]) if v.dtype.kind == "f" else v[take] for a, v in parts.items()}
        else:
            cols = self._small(dates)
        return {self.prefix + a: cols[a] for a in self.attrs}

    def params(self) -> dict[str, Any]:
        return {"field": self.field, "prefix": self.prefix, "attrs": self.attrs}


# ---------------------------------------------------------------------------- month in a list


_FEW_LISTS = 64  # up to this many rows the list values are looked up one by one, no factorize
_NO_MONTHS = np.zeros(12, dtype=bool)
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
        self._parsed: dict[Any, np.ndarray] = {}  # list value -> its month flags

    def describe(self, dates: Collection[str] = ()) -> StepInfo:
        return StepInfo(outputs=(self.out,), date_columns=(self.date_col,),
                        time_relative={self.out: MONTH_FLAG_REASON})

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        require(df, [self.list_col, self.date_col, *self.require], self.name)
        lists = df[self.list_col]
        _, month = year_month(datetimes(df[self.date_col], self.date_col, self.name))
        known = ~np.isnan(month)
        month_idx = np.where(known, month, 1).astype(np.int64) - 1
        if isinstance(lists, np.ndarray) and len(lists) <= _FEW_LISTS:  # a request's few rows
            rows = np.array([self._months(text) for text in lists.tolist()], dtype=bool).reshape(-1, 12)
            flag = rows[np.arange(len(rows)), month_idx] & known
        else:
            codes, uniques = pd.factorize(lists)
            # one row per distinct list value (+1 all-False row for missing); few distinct values
            lookup = np.zeros((len(uniques) + 1, 12), dtype=bool)
            for i, text in enumerate(uniques):
                lookup[i] = self._months(text)
            flag = lookup[np.where(codes < 0, len(uniques), codes), month_idx] & known
        for col in self.require:
            flag &= truthy(df[col])
        return {self.out: flag.astype(np.int64)}

    def _months(self, text: Any) -> np.ndarray:
        """The 12 month flags of one list value (all False for a missing one), parsed once per
        distinct value (a step meets few: the join table's lists)."""
        if text is None or (isinstance(text, float) and np.isnan(text)):
            return _NO_MONTHS
        found = self._parsed.get(text) if isinstance(text, str) else None
        if found is None:
            parts = {p.strip() for p in str(text).split(self.sep)}
            found = np.array([m in parts for m in self.month_names], dtype=bool)
            if isinstance(text, str) and len(self._parsed) < 4096:
                self._parsed[text] = found
        return found

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

    def describe(self, dates: Collection[str] = ()) -> StepInfo:
        return StepInfo(outputs=(self.out,), date_columns=(self.date_col,),
                        time_relative={self.out: DURATION_REASON})

    def _finish(self, raw: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
        clipped = np.minimum(np.maximum(np.where(valid, raw, 0), self.clip[0]), self.clip[1])  # np.clip, cheaper
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
        date_year, date_month = year_month(datetimes(df[self.date_col], self.date_col, self.name))
        year = numbers(df[self.year_col])
        month = numbers(df[self.month_col])
        valid = ~np.isnan(year) & (month >= 1) & (month <= 12) & ~np.isnan(date_year)
        months = (date_year - year) * 12 + date_month - month
        return self._finish(months, valid)  # NaN only where not valid, which _finish replaces

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
        dates = datetimes(df[self.date_col], self.date_col, self.name)
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
