"""Event calendars: per (group, date) event flags that `ElapsedEvents` reads its distances from.

A calendar is a plain table, one row per (group, date), sorted: the group column, the date
column (datetime64[ns]), one int8 flag per event, and `observed` (1 = a row of the data the
step was fitted on, 0 = a known future event laid over it from a calendar file). It is saved as
Parquet with the other step tables. Keeping every fitted row (not only the event days) lets a
later calendar be checked against what was observed: a file may add and replace future days,
never contradict an observed one.

`CalendarIndex` turns a table into sorted int64 keys (group code << 32 | day), so distances for
any batch are a few `searchsorted` calls over arrays, without per-row Python. Beyond a group's
horizon (the last date the calendar knows for it) an event may repeat with a period (e.g. a
fortnightly promo); otherwise nothing is known there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modeling.errors import DataError
from modeling.features.base import Positions, as_datetime, canonical_table, day_numbers, truthy

OBSERVED = "observed"
SHIFT = np.int64(32)
OFFSET = np.int64(1 << 31)
MAX_SHOWN = 5
RowLabel = Callable[[int], str]


def keys(codes: np.ndarray, days: np.ndarray) -> np.ndarray:
    """(group code, day) -> one sortable int64, so a single searchsorted serves all groups: a
    group's keys form a contiguous block, and day arithmetic stays inside it."""
    return (codes.astype(np.int64) << SHIFT) | (days.astype(np.int64) + OFFSET)


def position_label(i: int) -> str:
    """Default row label: 1-based position in the frame."""
    return f"row {i + 1}"


# ---------------------------------------------------------------------------- tables


def calendar_table(df: pd.DataFrame, group: str, date: str, events: Sequence[str],
                   observed: bool = True) -> pd.DataFrame:
    """Rows -> a calendar: one row per (group, date), each event's flag the max over that key's
    rows (`truthy`: nonzero, True, any code but "0"), sorted by group and date."""
    missing = [c for c in (group, date, *events) if c not in df.columns]
    if missing:
        raise DataError(f"event calendar: missing column(s) {missing}; found {list(df.columns)}")
    dates = as_datetime(df[date], date, "calendar")
    bad = dates.isna().to_numpy() | df[group].isna().to_numpy()
    if bad.any():
        raise DataError(f"event calendar: missing {group!r} or {date!r} in row position(s) "
                        f"{np.flatnonzero(bad)[:MAX_SHOWN].tolist()}")
    codes, uniques = pd.factorize(df[group], sort=True)
    k = keys(codes, day_numbers(dates))
    order = np.argsort(k, kind="stable")
    k = k[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    starts = np.flatnonzero(first)
    cols: dict[str, Any] = {
        group: np.asarray(uniques)[codes[order][starts]],
        date: dates.to_numpy(dtype="datetime64[ns]")[order][starts],
    }
    for e in events:
        flags = truthy(df[e])[order].astype(np.int8)
        cols[e] = np.maximum.reduceat(flags, starts) if len(starts) else flags
    cols[OBSERVED] = np.full(len(starts), int(observed), dtype=np.int8)
    return canonical_table(pd.DataFrame(cols))


def overlay(base: pd.DataFrame, extra: pd.DataFrame, group: str, date: str) -> pd.DataFrame:
    """`extra`'s rows laid over `base`: on a key both hold, an observed base row stays (callers
    check that `extra` agrees with it first), any other base row is replaced."""
    both = pd.concat([base, extra], ignore_index=True)
    # observed rows first, then the newer (extra) rows: the first row per key wins
    rank = np.where(both[OBSERVED].to_numpy() == 1, 0, np.where(np.arange(len(both)) >= len(base), 1, 2))
    both = both.assign(_rank=rank).sort_values([group, date, "_rank"], kind="stable")
    both = both.drop_duplicates([group, date], keep="first").drop(columns="_rank")
    return canonical_table(both)


# ---------------------------------------------------------------------------- checks


@dataclass
class CalendarProblem:
    """One kind of problem in a calendar frame: the column(s), what is wrong, example rows."""

    column: str
    what: str
    rows: list[int]
    values: list[str]
    count: int


def _show(value: Any) -> str:
    if isinstance(value, pd.Timestamp | np.datetime64):
        return pd.Timestamp(value).strftime("%Y-%m-%d")
    return repr(value) if isinstance(value, str) else str(value)


def _problem(column: str, what: str, mask: np.ndarray, describe: Callable[[int], str]) -> CalendarProblem:
    rows = np.flatnonzero(mask)
    return CalendarProblem(column, what, rows[:MAX_SHOWN].tolist(),
                           [describe(int(i)) for i in rows[:MAX_SHOWN]], len(rows))


def calendar_problems(known: pd.DataFrame | None, frame: pd.DataFrame, group: str, date: str,
                      events: Sequence[str]) -> list[CalendarProblem]:
    """What is wrong with `frame` as a calendar over `known` (rows by position in `frame`):
    duplicate (group, date) rows, groups `known` does not hold, and flags that contradict an
    observed row of `known` for the same (group, date). Types are the caller's check."""
    dates = as_datetime(frame[date], date, "calendar")
    gvals = frame[group]
    days = day_numbers(dates.fillna(pd.Timestamp(0)))
    shown = lambda i: f"{group}={_show(gvals.iloc[i])}, {date}={_show(dates.iloc[i])}"  # noqa: E731
    problems = []
    codes, _ = pd.factorize(gvals)
    own = keys(codes, days)
    dup = pd.Series(own).duplicated(keep=False).to_numpy()
    if dup.any():
        problems.append(_problem(f"{group}, {date}", "duplicate (group, date) rows", dup, shown))
    for e in events:
        col = frame[e]
        if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
            num = col.to_numpy(dtype="float64", na_value=np.nan)
            not_flag = ~np.isin(num, [0.0, 1.0])
            if not_flag.any():
                problems.append(_problem(e, "not a 0/1 flag", not_flag,
                                         lambda i, e=e: f"{shown(i)}, {e}={_show(frame[e].iloc[i])}"))
    if known is None:
        return problems
    groups = pd.Index(known[group].unique())
    pos = groups.get_indexer(gvals)
    unknown = pos < 0
    if unknown.any():
        problems.append(_problem(group, f"unknown {group} (not in the model's calendar)", unknown,
                                 lambda i: f"{group}={_show(gvals.iloc[i])}"))
    seen = known[known[OBSERVED].to_numpy() == 1]
    kkeys = keys(groups.get_indexer(seen[group]), day_numbers(seen[date]))
    order = np.argsort(kkeys, kind="stable")
    kkeys, seen = kkeys[order], seen.iloc[order]
    q = keys(np.maximum(pos, 0), days)
    at = np.minimum(np.searchsorted(kkeys, q), max(len(kkeys) - 1, 0))
    hit = ~unknown & (len(kkeys) > 0) & (kkeys[at] == q) if len(kkeys) else np.zeros(len(q), bool)
    for e in events:
        mine = truthy(frame[e])
        theirs = seen[e].to_numpy()[at] != 0 if len(kkeys) else np.zeros(len(q), bool)
        clash = hit & (mine != theirs)
        if clash.any():
            problems.append(_problem(
                e, "contradicts the observed (training) data for the same (group, date)", clash,
                lambda i, e=e, theirs=theirs: f"{shown(i)}, {e}={_show(frame[e].iloc[i])} "
                                              f"(observed: {int(theirs[i])})"))
    return problems


def raise_problems(problems: list[CalendarProblem], source: str,
                   row_label: RowLabel = position_label) -> None:
    """One DataError naming the source, each problem's column and example rows (with `.details`
    per row, as the readers' validation errors carry)."""
    if not problems:
        return
    lines = []
    for p in problems:
        examples = "; ".join(f"{row_label(r)}: {v}" for r, v in zip(p.rows, p.values, strict=True))
        lines.append(f"column '{p.column}': {p.what} on {p.count} row(s), e.g. {examples}")
    # the first problem on the first line: the service's load errors show only that line
    exc = DataError(f"{source}: {len(problems)} event calendar problem(s): " + "\n  ".join(lines))
    exc.details = [{"record": r, "field": p.column, "msg": f"{p.what}: {v}"}  # type: ignore[attr-defined]
                   for p in problems for r, v in zip(p.rows, p.values, strict=True)]
    raise exc


# ---------------------------------------------------------------------------- files


def read_calendar_file(path: str | Path, columns: Sequence[str]) -> tuple[pd.DataFrame, RowLabel]:
    """A calendar file (CSV or Parquet, e.g. Kaggle's test.csv) -> (its `columns`, row labels).

    CSV values are read as text (the caller validates and coerces them, so "0"/"a" codes and
    ISO dates arrive as written); rows are labelled by CSV line (header = line 1) or Parquet row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: calendar file not found" if not p.exists() else f"{p}: is not a file")
    parquet = p.suffix.lower() in (".parquet", ".pq")
    try:
        if parquet:
            import pyarrow.parquet as pq

            names = pq.read_schema(p).names
            _require(p, names, columns)
            df = pd.read_parquet(p, columns=list(columns))
        else:
            names = list(pd.read_csv(p, nrows=0).columns)
            _require(p, names, columns)
            df = pd.read_csv(p, usecols=list(columns), dtype=str, keep_default_na=True)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure means a bad file
        raise DataError(f"{p}: not a readable {'Parquet' if parquet else 'CSV'} file "
                        f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
                        ) from None
    if len(df) == 0:
        raise DataError(f"{p}: calendar file has no rows")
    return df, ((lambda i: f"row {i + 1}") if parquet else (lambda i: f"line {i + 2}"))


def _require(path: Path, found: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(f"{path}: calendar file lacks column(s) {missing}; found {list(found)}")


# ---------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class CalendarIndex:
    """A calendar as sorted int64 keys, built once per calendar table.

    groups: the calendar's groups (code = position); horizon: per code, the day number of the
    last date the calendar knows; events: per event, the sorted unique keys of its days, with
    the repeats beyond each group's horizon for events that repeat."""

    groups: pd.Index
    horizon: np.ndarray
    events: Mapping[str, np.ndarray]

    @functools.cached_property
    def lookup(self) -> Positions:
        return Positions(self.groups)

    @classmethod
    def build(cls, table: pd.DataFrame, group: str, date: str, events: Sequence[str],
              repeat: Mapping[str, int], reach: int) -> CalendarIndex:
        """`repeat`: event -> period in days; its days in the last period before a group's horizon
        are repeated every period for `reach` days beyond it."""
        codes, uniques = pd.factorize(table[group])
        days = day_numbers(table[date])
        horizon = np.full(len(uniques), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(horizon, codes, days)
        k = keys(codes, days)
        out: dict[str, np.ndarray] = {}
        for e in events:
            on = table[e].to_numpy() != 0
            ev = k[on]
            period = int(repeat.get(e, 0))
            if period > 0:
                last = on & (days > horizon[codes] - period)
                copies = math.ceil(reach / period)
                shifts = np.arange(1, copies + 1, dtype=np.int64) * period
                base, h = days[last], horizon[codes[last]]
                rep_days = (base[:, None] + shifts[None, :]).ravel()
                rep_codes = np.repeat(codes[last], copies)
                keep = rep_days <= np.repeat(h, copies) + reach
                ev = np.concatenate([ev, keys(rep_codes[keep], rep_days[keep])])
            out[e] = np.unique(ev)
        return cls(pd.Index(uniques), horizon, out)

    def codes(self, values: pd.Series) -> np.ndarray:
        """Group values -> codes; groups the calendar lacks get codes of their own (no events)."""
        codes = self.lookup(values)
        unseen = codes < 0
        if unseen.any():
            codes[unseen] = len(self.groups) + pd.factorize(values[unseen])[0]
        return codes.astype(np.int64)

    def describe(self) -> dict[str, Any]:
        """Size and horizon range, for logs and reports."""
        known = self.horizon[self.horizon > np.iinfo(np.int64).min]
        span = [str(np.datetime64(int(d), "D")) for d in (known.min(), known.max())] if len(known) else []
        return {"groups": len(self.groups), "horizon": span,
                "event_days": {e: int(len(v)) for e, v in self.events.items()}}
