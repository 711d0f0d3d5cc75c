"""Raw-input schemas stored in a bundle, so a server validates requests without domain code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from modeling.errors import DataError

INPUT_TYPES = ("int", "float", "str", "date", "bool", "id")


@dataclass
class InputField:
    """One raw input column a model accepts."""

    name: str
    type: str
    required: bool = True
    allowed: list[str] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.type not in INPUT_TYPES:
            raise ValueError(f"input field {self.name!r}: type must be one of {INPUT_TYPES}")


@dataclass
class RecordError:
    """A problem with one record of a request batch (0-based record index)."""

    record: int
    field: str
    msg: str


class RecordsError(DataError):
    """Some records of a batch are invalid; `errors` lists them (first few per field)."""

    def __init__(self, errors: list[RecordError], source: str = "request") -> None:
        self.errors = errors
        first = "; ".join(f"record {e.record} field {e.field!r}: {e.msg}" for e in errors[:5])
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{source}: {first}{more}")


@dataclass
class InputSchema:
    fields: list[InputField] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def to_dict(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self.fields]

    @classmethod
    def from_dict(cls, items: Sequence[dict[str, Any]]) -> InputSchema:
        return cls([InputField(**d) for d in items])

    def validate(self, df: pd.DataFrame, source: str = "request", max_per_field: int = 5) -> pd.DataFrame:
        """Coerce each declared column to its type; raise RecordsError naming bad records."""
        out = df.copy()
        errors: list[RecordError] = []
        positions = np.arange(len(df))
        for f in self.fields:
            if f.name not in out.columns:
                if f.required:
                    errors.append(RecordError(0 if len(df) else -1, f.name, "field required"))
                continue
            col = out[f.name]
            coerced, bad = _coerce(col, f.type)
            missing = coerced.isna().to_numpy()
            if f.required:
                bad = bad | missing
            if f.allowed is not None:
                as_str = coerced.astype("string")
                not_allowed = ~as_str.isin(f.allowed).to_numpy() & ~missing
                bad = bad | not_allowed
            if bad.any():
                for i in positions[bad][:max_per_field]:
                    value = col.iloc[i]
                    if f.required and pd.isna(value):
                        msg = "field required"
                    elif f.allowed is not None and not _scalar_bad(value, f.type):
                        msg = f"value {value!r} not in {f.allowed}"
                    else:
                        msg = f"value {value!r} is not a valid {f.type}"
                    errors.append(RecordError(int(i), f.name, msg))
            out[f.name] = coerced
        if errors:
            errors.sort(key=lambda e: (e.record, e.field))
            raise RecordsError(errors, source)
        return out


def _scalar_bad(value: Any, type_: str) -> bool:
    _, bad = _coerce(pd.Series([value], dtype=object), type_)
    return bool(bad[0])


def _coerce(col: pd.Series, type_: str) -> tuple[pd.Series, np.ndarray]:
    """Return the coerced column and a mask of values that were present but unparseable."""
    present = col.notna().to_numpy()
    if type_ in ("int", "float", "bool"):
        if type_ == "bool" and col.dtype == object:
            mapped = col.map(
                lambda v: {"true": 1, "false": 0}.get(v.lower(), v) if isinstance(v, str) else v
            )
            col = mapped
        num = pd.to_numeric(col, errors="coerce")
        bad = present & num.isna().to_numpy()
        if type_ == "int":
            frac = (num % 1).fillna(0).to_numpy() != 0
            bad |= frac
            return num.astype("Int64" if num.isna().any() else "int64", errors="ignore"), bad
        if type_ == "bool":
            bad |= present & ~num.isin([0, 1]).to_numpy()
        return num.astype("float64"), bad
    if type_ == "date":
        dates = pd.to_datetime(col, errors="coerce", format="mixed")
        bad = present & dates.isna().to_numpy()
        return dates, bad
    # "str" and "id": canonical strings, integral floats without ".0"
    return canonical_strings(col), np.zeros(len(col), dtype=bool)


def canonical_strings(values: pd.Series | Sequence[Any]) -> pd.Series:
    """Map 1, 1.0, "1" and np.int64(1) to the same string so vocabularies match at serve time."""
    s = pd.Series(values, copy=False) if not isinstance(values, pd.Series) else values
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("string").str.title().astype(object)
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype("string").astype(object).where(s.notna(), None)
    if pd.api.types.is_float_dtype(s.dtype):
        integral = s.notna() & (s % 1 == 0)
        out = s.astype("string").astype(object)
        out[integral] = s[integral].astype("int64").astype(str)
        return out.where(s.notna(), None)
    num = pd.to_numeric(s, errors="coerce")
    if s.dtype == object and num.notna().any():
        integral = num.notna() & (num % 1 == 0)
        out = s.astype(str).astype(object)
        out[integral] = num[integral].astype("int64").astype(str)
        return out.where(s.notna(), None)
    return s.astype("string").astype(object).where(s.notna(), None)
