"""FeaturePipeline: an ordered list of feature steps; fit/transform, save/load, self-description.

Saved as `features.json` (format "tabrec.features", version 1: step names, parameters, table
references) plus one Parquet file per table the steps hold, dtypes kept in the JSON.

Self-description: callers ask the pipeline which columns group rows that must be transformed
together (`group_columns`), which input columns are dates (`date_columns`), which columns
identify a row (`key_columns`) and which outputs are functions of the row's date, with a reason
each (`time_relative_columns`); the steps answer for themselves (`Step.describe`), so no caller
looks at step names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modeling.errors import DataError

# importing the step modules registers their steps, so `step_from_dict` finds them by name
from modeling.features import dates as _dates  # noqa: F401
from modeling.features import events as _events  # noqa: F401
from modeling.features import joins as _joins  # noqa: F401
from modeling.features.base import (
    ArrayColumns,
    Columns,
    Step,
    StepInfo,
    canonical_table,
    step_from_dict,
)

FORMAT = "tabrec.features"
FORMAT_VERSION = 1
FEATURES_JSON = "features.json"
TABLES_DIR = "tables"


def _cast_table(df: pd.DataFrame, columns: Sequence[str], dtypes: Mapping[str, str]) -> pd.DataFrame:
    df = df[list(columns)]
    return canonical_table(df.astype({c: dtypes[c] for c in columns}))


class FeaturePipeline:
    """An ordered list of steps; each step is fitted on the output of the previous ones."""

    def __init__(self, steps: Sequence[Step], meta: Mapping[str, Any] | None = None) -> None:
        self.steps = list(steps)
        self.meta = dict(meta or {})

    def fit(self, df: pd.DataFrame) -> FeaturePipeline:
        self.fit_transform(df)
        return self

    def fit_transform(self, df: pd.DataFrame, calendar: pd.DataFrame | None = None) -> pd.DataFrame:
        """Fit each step on the previous steps' output and transform with it. `calendar`: known
        future events (raw rows with the calendar steps' columns) laid over each calendar step's
        fitted rows before it transforms, so the fitted rows see them as serving will."""
        if calendar is not None and not self.calendar_columns():
            raise DataError("an event calendar was given, but no feature step reads one")
        for i, step in enumerate(self.steps):
            step.fit(df)
            if calendar is not None and step.calendar_columns():
                step = self.steps[i] = step.with_calendar(calendar)
            df = step.transform(df)
        return df

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Run every step over a `Columns` view and build the output frame once (an inner
        join, which drops rows, materialises the frame at that step)."""
        view = Columns(df)
        for step in self.steps:
            if step.drops_rows:
                view = Columns(step.transform(view.to_frame()))
            else:
                view.add(step.new_columns(view))
        return view.to_frame()

    def transform_arrays(self, cols: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray] | None:
        """`transform` for small requests: the same steps' `new_columns` over plain arrays (an
        `ArrayColumns` view: no Series per column and step, no output frame). Returns every
        column (inputs and added) as arrays, or None when a step drops rows (an inner join), which
        only the frame path handles."""
        if any(step.drops_rows for step in self.steps):
            return None
        view = ArrayColumns(cols, n)
        for step in self.steps:
            view.add(step.new_columns(view))
        return view.cols

    # ------------------------------------------------------------------ self-description

    def describe(self) -> list[StepInfo]:
        """Each step's `StepInfo`, in order; joins see the date columns of all the steps."""
        dates = self.date_columns()
        return [step.describe(dates) for step in self.steps]

    def date_columns(self) -> list[str]:
        """Input columns the steps read as dates (e.g. ["Date"]), in step order."""
        # without the pipeline's context a join reports only its datetime-typed keys; with it, a
        # key among these columns too, which adds nothing new here
        return list(dict.fromkeys(c for step in self.steps for c in step.describe().date_columns))

    def group_columns(self) -> list[str]:
        """Columns whose rows must be transformed in one batch; [] for every step tabrec has (the
        days until a store's next promo come from the event calendar, not from the batch)."""
        return list(dict.fromkeys(c for info in self.describe() for c in info.group_columns))

    def key_columns(self) -> list[str]:
        """Columns that identify a row: the key columns the steps declare, else the group and
        date columns of each grouping step (e.g. ["Store", "Date"]: one row per store and day);
        empty when no step declares either."""
        return list(dict.fromkeys(c for info in self.describe() for c in (
            info.key_columns or ((*info.group_columns, *info.date_columns) if info.group_columns else ()))))

    def entity_columns(self) -> list[str]:
        """Key columns that are not dates (e.g. ["Store"]): what a row belongs to."""
        dates = set(self.date_columns())
        return [c for c in self.key_columns() if c not in dates]

    # ------------------------------------------------------------------ event calendars

    def calendar_columns(self) -> list[str]:
        """Input columns of the event calendar the steps read (e.g. Store, Date, Promo,
        StateHoliday, SchoolHoliday); [] when no step reads one."""
        return list(dict.fromkeys(c for step in self.steps for c in step.calendar_columns()))

    def with_calendar(self, frame: pd.DataFrame, source: str = "calendar",
                      row_label: Any = None) -> FeaturePipeline:
        """A new pipeline whose calendar steps have `frame`'s events laid over their calendars
        (the other steps are shared; this pipeline is left as it was). DataError naming `source`,
        column and rows (`row_label(position)`) for a frame that does not fit the calendar."""
        if not self.calendar_columns():
            raise DataError(f"{source}: this model's features read no event calendar")
        kw = {} if row_label is None else {"row_label": row_label}
        steps = [s.with_calendar(frame, source, **kw) if s.calendar_columns() else s for s in self.steps]
        return FeaturePipeline(steps, self.meta)

    def calendar_info(self) -> list[dict[str, Any]]:
        """Per calendar step: rows, future rows, groups, horizon range, event days."""
        return [s.calendar_info() for s in self.steps if s.calendar_columns()]  # type: ignore[attr-defined]

    def time_relative_columns(self) -> dict[str, str]:
        """Output column -> why it is a function of the row's date (calendar parts, durations up
        to the date, event distances, tables joined on the date); a batch from another period
        differs there by construction, which is why the drift check leaves them out."""
        out: dict[str, str] = {}
        for info in self.describe():
            out.update(info.time_relative)
        return out

    # ------------------------------------------------------------------ serialization

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
