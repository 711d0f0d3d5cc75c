"""Per-group days since/until events and event counts in a window (e.g. days since the store's
last promo, state holidays in the coming week), by calendar day.

These are the one kind of feature whose values for a row depend on the other rows of its group
in the same batch (the events ahead of the row), so the step declares its group column: batch
scoring keeps a group's rows together.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from modeling.errors import DataError
from modeling.features.base import (
    Columns,
    Step,
    StepInfo,
    as_datetime,
    canonical_table,
    day_numbers,
    register,
    require,
    truthy,
)

EVENT_REASON = ("event distance/window: Before*/*_fw read the batch's own future and cap at its end, "
                "After*/*_bw move with the season")
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

    def describe(self, dates: Collection[str] = ()) -> StepInfo:
        outputs = tuple(self.outputs())
        return StepInfo(outputs=outputs, group_columns=(self.group,), date_columns=(self.date,),
                        time_relative={c: EVENT_REASON for c in outputs})

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
