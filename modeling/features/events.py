"""Per-group days since/until events and event counts in a window (e.g. days since the store's
last promo, state holidays in the coming week), by calendar day, read from an event calendar.

The calendar (modeling.features.calendar) holds every (group, date) the step was fitted on, plus
known future events laid over it (`with_calendar`). A row's values depend only on the calendar
and on the row itself (its own flags count for its own date), never on the other rows of its
batch: the same record gets the same features alone, in a request of 50 or in a file of 2M rows,
so batch scoring may cut rows anywhere and the service answers records independently.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from modeling.errors import DataError
from modeling.features.base import (
    Columns,
    Step,
    StepInfo,
    datetimes,
    day_numbers,
    missing,
    register,
    require,
    truthy,
)
from modeling.features.calendar import (
    OBSERVED,
    SHIFT,
    CalendarIndex,
    RowLabel,
    calendar_problems,
    calendar_table,
    keys,
    overlay,
    position_label,
    raise_problems,
)

EVENT_REASON = ("event distance/window read from the event calendar: moves with the season and with "
                "the events known ahead (cap or repeat beyond the calendar's horizon)")
OLD_BUNDLE = ("feature step 'elapsed_events' was saved with a per-group event history (a tabrec "
              "before event calendars), whose days-until features depended on the other rows of a "
              "batch; this tabrec needs its event calendar: retrain the model (tabrec train ...)")


@register
class ElapsedEvents(Step):
    """Per-group distances to event days, by calendar day (gaps in a group's rows are fine).

    For each event column `e` (0/1 or boolean-ish, see `truthy`), per `group`, for a row on day d:
      - `After{e}`:  days since the latest event day <= d (0 when the event is on d), as the
        fast.ai course does ("since last, including today");
      - `Before{e}`: days until the earliest event day >= d (0 when the event is on d);
      - `{e}_bw`: number of event days in [d - window + 1, d]; `{e}_fw`: in [d, d + window - 1].
    Both distances are clipped to [0, cap]; "no such event known" is reported as `cap`.

    Event days come from the calendar: fit() stores one row per (group, date) of the fitted rows
    (so the training rows, which are their own calendar, get exactly the values of one pass over
    the series); `with_calendar` lays known future events over it. At transform time a row's own
    flags replace the calendar's for its own (group, date); no other row of the batch is read.

    Beyond a group's horizon (the last date its calendar knows) an event in `repeat` (event ->
    period in days, e.g. {"Promo": 14}) repeats its days of the last period before the horizon,
    for up to 2 * cap + window days; other events have no known days there (distances read
    `cap`, window counts count the known days only). Groups the calendar lacks have only their
    own row.
    """

    name = "elapsed_events"

    def __init__(self, group: str, date: str, events: Sequence[str], window: int = 7,
                 cap: int = 365, after_prefix: str = "After", before_prefix: str = "Before",
                 repeat: Mapping[str, int] | None = None) -> None:
        if window < 1 or cap < 1:
            raise ValueError("ElapsedEvents: window and cap must be >= 1")
        self.group, self.date, self.events = group, date, list(events)
        if OBSERVED in (group, date, *self.events):
            raise ValueError(f"ElapsedEvents: {OBSERVED!r} is reserved for the calendar table")
        self.repeat = {str(k): int(v) for k, v in (repeat or {}).items()}
        unknown = sorted(set(self.repeat) - set(self.events))
        if unknown or any(v < 1 for v in self.repeat.values()):
            raise ValueError(f"ElapsedEvents: repeat must map events {self.events} to periods >= 1 "
                             f"day, got {self.repeat}")
        self.window, self.cap = int(window), int(cap)
        self.after_prefix, self.before_prefix = after_prefix, before_prefix
        self._set_calendar(None)

    def outputs(self) -> list[str]:
        return [name for e in self.events for name in (
            self.after_prefix + e, self.before_prefix + e, f"{e}_bw", f"{e}_fw")]

    def describe(self, dates: Collection[str] = ()) -> StepInfo:
        outputs = tuple(self.outputs())
        # no group columns: a row's values do not depend on its batch neighbours
        return StepInfo(outputs=outputs, key_columns=(self.group, self.date), date_columns=(self.date,),
                        time_relative={c: EVENT_REASON for c in outputs})

    def calendar_columns(self) -> list[str]:
        return [self.group, self.date, *self.events]

    # ------------------------------------------------------------------ the calendar

    def _set_calendar(self, table: pd.DataFrame | None) -> None:
        self.calendar: pd.DataFrame | None = table
        self._index: CalendarIndex | None = None if table is None else CalendarIndex.build(
            table, self.group, self.date, self.events, self.repeat, reach=2 * self.cap + self.window)
        self._stacked: np.ndarray | None = None  # every event's keys, event i's block + (i << EVENT_SHIFT)
        if self._index is not None and len(self.events) < 128:
            blocks = [self._index.events[e] for e in self.events]
            if all(len(b) == 0 or b.max() < EVENT_BIT for b in blocks):
                self._stacked = np.concatenate([b.astype(np.int64) + (np.int64(i) << EVENT_SHIFT)
                                                for i, b in enumerate(blocks)])
        self._event_off = (np.arange(len(self.events), dtype=np.int64) << EVENT_SHIFT)[:, None]
        names = self.outputs()  # per event: after, before, _bw, _fw
        self._names = [tuple(names[i : i + 4]) for i in range(0, len(names), 4)]

    def _require_fitted(self) -> CalendarIndex:
        if self._index is None:
            raise RuntimeError(f"{self.name}: call fit() before transform()")
        return self._index

    def fit(self, df: pd.DataFrame) -> ElapsedEvents:
        require(df, self.calendar_columns(), self.name)
        self._set_calendar(calendar_table(df, self.group, self.date, self.events, observed=True))
        return self

    def with_calendar(self, frame: pd.DataFrame, source: str = "calendar",
                      row_label: RowLabel = position_label) -> ElapsedEvents:
        """A copy of this fitted step whose calendar has `frame`'s rows (group, date and event
        columns) laid over it; this step is left as it was (safe under concurrent requests).

        DataError naming `source`, column and rows (`row_label(position)`) for duplicate (group,
        date) rows, groups the calendar lacks, and flags contradicting an observed row."""
        self._require_fitted()
        require(frame, self.calendar_columns(), f"{self.name} calendar {source}")
        frame = frame.reset_index(drop=True)
        raise_problems(calendar_problems(self.calendar, frame, self.group, self.date, self.events),
                       source, row_label)
        extra = calendar_table(frame, self.group, self.date, self.events, observed=False)
        new = copy.copy(self)
        assert self.calendar is not None
        new._set_calendar(overlay(self.calendar, extra, self.group, self.date))
        return new

    def calendar_info(self) -> dict[str, Any]:
        """The calendar's size, its groups' horizons and its event days (for logs and reports)."""
        index = self._require_fitted()
        assert self.calendar is not None
        return {"rows": len(self.calendar), "future_rows": int((self.calendar[OBSERVED] == 0).sum()),
                "repeat": dict(self.repeat), **index.describe()}

    # ------------------------------------------------------------------ transform

    def _inputs(self, df: pd.DataFrame | Columns) -> tuple[pd.Series | np.ndarray, np.ndarray,
                                                          dict[str, np.ndarray]]:
        require(df, self.calendar_columns(), self.name)
        dates = datetimes(df[self.date], self.date, self.name)
        bad = np.isnat(dates) | missing(df[self.group])
        if bad.any():
            first = np.flatnonzero(bad)[:5].tolist()
            raise DataError(f"feature step {self.name!r}: missing {self.group!r} or "
                            f"{self.date!r} in row position(s) {first}")
        flags = {e: truthy(df[e]) for e in self.events}
        return df[self.group], day_numbers(dates), flags

    def new_columns(self, df: pd.DataFrame | Columns) -> dict[str, Any]:
        index = self._require_fitted()
        group, days, flags = self._inputs(df)
        q = keys(index.codes(group), days)
        cols: dict[str, np.ndarray] = {}
        if len(q) <= STACKED_ROWS and self._stacked is not None and (len(q) == 0 or q.max() < EVENT_BIT):
            # a request's few rows: every event in one pass over the stacked calendars (the
            # same searches on the same keys, each event's block marked by its high bits)
            own = np.stack([flags[e] for e in self.events])
            since, until, bw, fw = self._distances(self._stacked, q[None, :] + self._event_off, own)  # [events, n]
            for i, (a, b, c, d) in enumerate(self._names):
                cols[a], cols[b], cols[c], cols[d] = since[i], until[i], bw[i], fw[i]
            return cols
        for e in self.events:
            since, until, bw, fw = self._distances(index.events[e], q, flags[e])
            cols[self.after_prefix + e] = since
            cols[self.before_prefix + e] = until
            cols[f"{e}_bw"], cols[f"{e}_fw"] = bw, fw
        return cols

    def _distances(self, ev: np.ndarray, q: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, ...]:
        """ev: sorted unique event keys of the calendar; q: row keys; own: the rows' own flags,
        which replace the calendar's on each row's own key (so the calendar's day q itself is
        never read: only days strictly before or after it)."""
        cap, w = self.cap, self.window
        own64 = own.astype(np.int64)
        if len(ev) == 0:
            none = np.where(own, 0, cap).astype(np.int64)
            return none, none.copy(), own64, own64.copy()
        group = q >> SHIFT
        left = ev.searchsorted(q, "left")  # calendar days < q end here
        right = ev.searchsorted(q, "right")  # calendar days > q start here
        prev = ev[np.maximum(left - 1, 0)]
        has_prev = (left > 0) & ((prev >> SHIFT) == group)
        since = np.where(own, 0, np.where(has_prev, q - prev, cap))
        nxt = ev[np.minimum(right, len(ev) - 1)]
        has_next = (right < len(ev)) & ((nxt >> SHIFT) == group)
        until = np.where(own, 0, np.where(has_next, nxt - q, cap))
        bw = left - ev.searchsorted(q - (w - 1), "left") + own64
        fw = ev.searchsorted(q + (w - 1), "right") - right + own64
        return (_clip(since, cap), _clip(until, cap),
                bw.astype(np.int64), fw.astype(np.int64))

    # ------------------------------------------------------------------ state

    def params(self) -> dict[str, Any]:
        out = {"group": self.group, "date": self.date, "events": self.events,
               "window": self.window, "cap": self.cap, "after_prefix": self.after_prefix,
               "before_prefix": self.before_prefix}
        if self.repeat:
            out["repeat"] = dict(self.repeat)
        return out

    def tables(self) -> dict[str, pd.DataFrame]:
        return {} if self.calendar is None else {"calendar": self.calendar}

    def set_tables(self, tables: Mapping[str, pd.DataFrame]) -> None:
        if "history" in tables and "calendar" not in tables:
            raise DataError(OLD_BUNDLE)
        self._set_calendar(tables.get("calendar"))


# stacked calendars for small requests: event i's keys get i << EVENT_SHIFT, above every
# (group code, day) key (keys below EVENT_BIT: group codes under 2**24), so one sorted array
# holds all events and a key's group comparison also tells the events apart
EVENT_SHIFT = np.int64(56)
EVENT_BIT = np.int64(1) << EVENT_SHIFT
STACKED_ROWS = 64


def _clip(x: np.ndarray, cap: int) -> np.ndarray:
    """`np.clip(x, 0, cap)` as int64 with two ufuncs (np.clip's wrapper costs more than the work
    on a request's few rows)."""
    return np.minimum(np.maximum(x, 0), cap).astype(np.int64, copy=False)
