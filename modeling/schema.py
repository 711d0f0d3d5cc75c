"""Raw-input schemas stored in a bundle, so a server validates requests without domain code.

Types are strict where a lenient reading would be a silent guess: a date is an ISO 8601 string
(`YYYY-MM-DD`, optionally with a time `THH:MM[:SS[.fff]]`, no time zone) or an already typed
datetime column, never a number (20150917 is not read as nanoseconds since 1970) nor a slash
date (01/02/2015 is ambiguous); a boolean is only accepted where a `bool` is declared (`true`
is not store 1). Integers and floats may come as numeric strings ("4"), because CSV and
form-like clients send text; ids take strings or finite numbers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype

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
        """Coerce each declared column to its type; raise RecordsError naming bad records.

        Columns already of the declared type (int64 ints, datetime64 dates) pass through
        unchanged, so validating a typed frame costs next to nothing."""
        errors: list[RecordError] = []
        coerced_cols: dict[str, pd.Series] = {}
        for f in self.fields:
            if f.name not in df.columns:
                if f.required:
                    errors.append(RecordError(0 if len(df) else -1, f.name, "field required"))
                continue
            col = df[f.name]
            coerced, bad = _coerce(col, f.type)
            missing = _missing(coerced)
            if f.required:
                bad = bad | missing
            if f.allowed is not None:
                as_str = coerced if coerced.dtype == object else coerced.astype("string")
                not_allowed = ~as_str.isin(f.allowed).to_numpy() & ~missing
                bad = bad | not_allowed
            if bad.any():
                for i in np.flatnonzero(bad)[:max_per_field]:
                    errors.append(RecordError(int(i), f.name, _message(col.iloc[i], f)))
            if coerced is not col:  # typed columns pass through untouched
                coerced_cols[f.name] = coerced
        if errors:
            errors.sort(key=lambda e: (e.record, e.field))
            raise RecordsError(errors, source)
        out = df.copy()
        for name, coerced in coerced_cols.items():
            out[name] = coerced
        return out

    def validate_records(self, records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray] | None:
        """The small-request path's `validate`: parsed JSON records (dicts) straight to typed
        arrays by column, or None when any value needs more than the plain reading below.

        Only values whose reading is unambiguous are taken here: ints (not bools) within int64
        for int fields, finite ints/floats for floats, allowed strings, ints/strings for ids,
        `YYYY-MM-DD` strings for dates, bools and 0/1 for bools, null where a field is optional.
        Anything else (numeric strings, NaN, a missing required value, a bad date, ...) returns
        None and the caller runs `validate` on a frame, which accepts or rejects it with the
        usual RecordsError: both paths give the same answers and the same errors, and the
        arrays equal what `validate` gives after `records_frame` (the property tests check)."""
        out: dict[str, np.ndarray] = {}
        for f in self.fields:
            name = f.name
            if not any(name in r for r in records):  # the frame would lack the column
                if f.required and records:
                    return None
                continue
            values = [r.get(name) for r in records]
            kinds = set(map(type, values))
            if f.required and type(None) in kinds:
                return None
            column = _plain_column(values, kinds - {type(None)}, f)
            if column is None:
                return None
            out[name] = column
        return out


_PLAIN_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATE_LOW, _DATE_HIGH = np.datetime64("1678-01-01", "D"), np.datetime64("2261-12-31", "D")


def _plain_column(values: list[Any], kinds: set[type], f: InputField) -> np.ndarray | None:
    """`values` of field `f` as the array `validate` would give, or None (see validate_records)."""
    if f.allowed is not None and f.type != "str":
        return None
    has_none = any(v is None for v in values)
    if f.type == "int" and kinds <= {int, float}:
        present = [v for v in values if v is not None] if has_none else values
        if int in kinds and not all(INT64_MIN <= v <= INT64_MAX for v in present if type(v) is int):
            return None
        if float in kinds and not all(v == v and abs(v) < _TWO_63 and v == int(v)
                                      for v in present if type(v) is float):
            return None  # fractional or infinite: `validate` words the error
        if not has_none:
            return np.array(present, dtype=np.float64).astype(np.int64) if float in kinds \
                else np.array(values, dtype=np.int64)
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    if f.type == "float" and kinds <= {int, float}:
        if kinds & {int} and any(type(v) is int and not INT64_MIN <= v <= INT64_MAX for v in values):
            return None
        arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        return arr if np.isfinite(arr).sum() == len(values) - values.count(None) else None
    if f.type in ("str", "id") and kinds <= {str, int}:
        if int in kinds and any(type(v) is int and not INT64_MIN <= v <= INT64_MAX for v in values):
            return None
        if f.allowed is None:
            return _plain_ids(values)
        if int in kinds:  # an int's canonical string is its decimal form (0 -> "0")
            values = [str(v) if type(v) is int else v for v in values]
        allowed = _plain_allowed(tuple(f.allowed))
        if not all(v in allowed for v in values if v is not None):
            return None
        return np.array(values, dtype=object)
    if f.type == "date" and kinds <= {str}:
        if not all(_PLAIN_DATE.fullmatch(v) for v in values if v is not None):
            return None
        try:
            days = np.array(values, dtype="datetime64[D]")
        except ValueError:  # not a calendar date: `validate` words the error
            return None
        known = days[~np.isnat(days)]
        if len(known) and (known.min() < _DATE_LOW or known.max() > _DATE_HIGH):
            return None
        return days.astype("datetime64[ns]")
    if f.type == "bool" and kinds <= {bool, int}:
        if not all(v in (0, 1) for v in values if v is not None):
            return None
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return None


_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]{0,17}")  # int texts canonical_strings keeps as they are
_DIGIT = re.compile(r"\d")  # any Unicode decimal digit: what float() and pandas parse


def _plain_ids(values: list[Any]) -> np.ndarray:
    """canonical_strings of str/int/None values (ints within int64), skipping pandas when every
    value is its own canonical string: an int up to 2**53 (exact as a float, which pandas makes of
    an int beside a null or a text) in decimal, a canonical int text, or a text without digits (no
    number). Otherwise canonical_strings decides, as on the frame path."""
    if any(type(v) is int and abs(v) > 2**53 for v in values):
        return canonical_strings(pd.Series(values, dtype=object)).to_numpy()
    out = [str(v) if type(v) is int else v for v in values]
    if all(v is None or _CANONICAL_INT.fullmatch(v) or not _DIGIT.search(v) for v in out):
        return np.array(out, dtype=object)
    return canonical_strings(pd.Series(values, dtype=object)).to_numpy()


@functools.lru_cache(maxsize=64)
def _plain_allowed(allowed: tuple[str, ...]) -> frozenset[str]:
    """Allowed values that are their own canonical string (a request value equal to one of them
    needs no canonicalising)."""
    canon = canonical_strings(pd.Series(list(allowed), dtype=object)).tolist()
    return frozenset(a for a, c in zip(allowed, canon, strict=True) if a == c)


def _missing(col: pd.Series) -> np.ndarray:
    if isinstance(col.dtype, np.dtype) and col.dtype.kind in "iub":
        return np.zeros(len(col), dtype=bool)  # numpy ints and bools cannot be missing
    return col.isna().to_numpy()


def _message(value: Any, f: InputField) -> str:
    """Why one value of field `f` was rejected."""
    if f.required and _is_missing(value):
        return "field required"
    if f.type == "int" and _out_of_int64(value):
        return f"integer {_short(value)} out of range (int64)"
    if f.type == "date":
        if isinstance(value, str) and re.fullmatch(ISO_DATE, value):
            return f"value {_short(value)} is not a calendar date in the years {DATE_YEARS}"
        return f"value {_short(value)} is not an ISO 8601 date (YYYY-MM-DD)"
    if f.allowed is not None and not _scalar_bad(value, f.type):
        return f"value {_short(value)} not in {f.allowed}"
    return f"value {_short(value)} is not a valid {f.type}"


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-like cells
        return False


def _out_of_int64(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    num = pd.to_numeric(pd.Series([value], dtype=object), errors="coerce",
                        dtype_backend="numpy_nullable")
    if num.isna().iloc[0]:
        return False
    v = num.iloc[0]
    return bool(np.isfinite(float(v))) and not (INT64_MIN <= v <= INT64_MAX)


def _short(value: Any, limit: int = 60) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    text = "NaN" if isinstance(value, float) and value != value else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scalar_bad(value: Any, type_: str) -> bool:
    _, bad = _coerce(pd.Series([value], dtype=object), type_)
    return bool(bad[0])


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_TWO_63 = 2.0**63
_BOOL_WORDS = {"true": 1, "false": 0}


def _coerce(col: pd.Series, type_: str) -> tuple[pd.Series, np.ndarray]:
    """Return the coerced column and a mask of values that were present but unusable
    (unparseable, fractional or out-of-int64-range for ints, not 0/1 for bools, booleans
    anywhere but in a bool field, dates that are not ISO 8601 strings)."""
    if type_ == "date":
        return _coerce_date(col)
    if type_ == "bool":
        present = col.notna().to_numpy()
        if col.dtype == object:
            col = _bool_words(col)
        num = pd.to_numeric(col, errors="coerce")
        bad = present & (num.isna().to_numpy() | ~num.isin([0, 1]).to_numpy())
        return num.astype("float64"), bad
    booleans = _booleans(col)
    if type_ == "int":
        coerced, bad = _coerce_int(col)
    elif type_ == "float":
        present = col.notna().to_numpy()
        num = pd.to_numeric(col, errors="coerce")
        coerced, bad = num.astype("float64"), present & num.isna().to_numpy()
    else:  # "str" and "id": canonical strings, integral floats without ".0"
        coerced, bad = canonical_strings(col), np.zeros(len(col), dtype=bool)
    return coerced, bad | booleans


def _booleans(col: pd.Series) -> np.ndarray:
    """Mask of boolean values (True/False, numpy or pandas booleans): read as 1/0 they would be
    a silent guess where a number, an id or a string is declared. Typed columns are decided by
    dtype; an object column gets a per-cell type check only when it mixes booleans in."""
    n = len(col)
    if pd.api.types.is_bool_dtype(col.dtype):
        return col.notna().to_numpy(dtype=bool) if n else np.zeros(0, dtype=bool)
    if col.dtype != object or not n:
        return np.zeros(n, dtype=bool)
    kind = infer_dtype(col, skipna=True)
    if kind == "boolean":
        return col.notna().to_numpy(dtype=bool)
    if kind.startswith("mixed"):
        return col.map(type).isin([bool, np.bool_]).to_numpy(dtype=bool)
    return np.zeros(n, dtype=bool)


DATE_YEARS = "1678-2261"  # what datetime64[ns] holds
ISO_DATE = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?"
_DATE_OBJECTS = {"date", "datetime", "datetime64"}
_TEXT_KINDS = {"string", "mixed", "mixed-integer"}


def _coerce_date(col: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Datetime columns pass through; text must be ISO 8601 (a calendar date, optionally with a
    time, no time zone); Python/NumPy date objects are taken as they are; anything else present
    (numbers, booleans, other strings) is bad."""
    n = len(col)
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return col, np.zeros(n, dtype=bool)
    present = col.notna().to_numpy(dtype=bool) if n else np.zeros(0, dtype=bool)
    obj = col if col.dtype == object else col.astype(object)
    kind = infer_dtype(obj, skipna=True) if n else "empty"
    nat = pd.Series(pd.NaT, index=col.index, name=col.name, dtype="datetime64[ns]")
    if kind in _DATE_OBJECTS:
        dates = pd.to_datetime(obj, errors="coerce")
        return dates, present & dates.isna().to_numpy()
    if kind not in _TEXT_KINDS:  # numbers, booleans, nothing present
        return nat, present
    iso = obj.str.fullmatch(ISO_DATE).eq(True).to_numpy(dtype=bool)
    if not iso.any():
        return nat, present
    dates = pd.to_datetime(obj.where(iso), format="ISO8601", errors="coerce")
    return dates, present & dates.isna().to_numpy()


def _bool_words(col: pd.Series) -> pd.Series:
    """'true'/'false' strings (any case) -> 1/0; other values unchanged (vectorized)."""
    is_str = col.map(type).eq(str).to_numpy() if len(col) else np.zeros(0, dtype=bool)
    if not is_str.any():
        return col
    out = col.copy()
    words = col[is_str].str.lower()
    known = words.isin(list(_BOOL_WORDS)).to_numpy()
    out[np.flatnonzero(is_str)[known]] = words[known].map(_BOOL_WORDS).to_numpy()
    return out


def _coerce_int(col: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """int64 when nothing is missing, else nullable Int64; values beyond int64, infinities and
    fractions are bad (never wrapped around or silently turned into floats)."""
    n = len(col)
    if col.dtype == np.int64:
        return col, np.zeros(n, dtype=bool)
    present = col.notna().to_numpy()
    num = pd.to_numeric(col, errors="coerce", dtype_backend="numpy_nullable")
    values = num.to_numpy(dtype="float64", na_value=np.nan)  # only for the checks below
    bad = present & np.isnan(values)
    kind = num.dtype.kind if isinstance(num.dtype, np.dtype) else num.dtype.numpy_dtype.kind
    if kind == "u":
        bad |= (num > INT64_MAX).fillna(False).to_numpy(dtype=bool)
    elif kind == "f":
        with np.errstate(invalid="ignore"):
            bad |= ~np.isnan(values) & (~np.isfinite(values) | (values % 1 != 0)
                                        | (np.abs(values) >= _TWO_63))
    keep = ~bad & ~np.isnan(values)
    if kind in "iub":
        ints = num.to_numpy(dtype="int64", na_value=0) if kind != "u" else np.where(
            keep, num.to_numpy(dtype="uint64", na_value=0), 0).astype(np.int64)
    else:
        ints = np.where(keep, values, 0).astype(np.int64)
    if keep.all():
        return pd.Series(ints, index=col.index, name=col.name), bad
    out = pd.Series(pd.arrays.IntegerArray(ints, ~keep), index=col.index, name=col.name)
    return out, bad


def canonical_strings(values: pd.Series | Sequence[Any]) -> pd.Series:
    """Map 1, 1.0, "1" and np.int64(1) to the same string so vocabularies match at serve time.

    Missing values become None. Integral numbers (and numeric strings such as "1.0") are
    written as integers, but only within int64 (1e30 stays "1e+30", as the processor's
    vocabulary has it), so nothing wraps around. Numpy-backed columns are converted with
    array operations; extension dtypes take the general pandas path."""
    s = pd.Series(values, copy=False) if not isinstance(values, pd.Series) else values
    dtype = s.dtype
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufO":
        return _canonical_general(s)
    arr = s.to_numpy()
    if dtype.kind == "b":
        out = np.where(arr, "True", "False").astype(object)
    elif dtype.kind in "iu":
        out = arr.astype(str).astype(object)
    elif dtype.kind == "f":
        out = _canonical_numbers(arr, arr, s.astype("string").to_numpy(dtype=object))
    else:
        num = pd.to_numeric(arr, errors="coerce")
        if num.dtype.kind == "f" and np.isnan(num).all():  # nothing numeric
            out = pd.Series(arr, copy=False).astype(str).to_numpy(dtype=object)
        else:
            out = _canonical_numbers(num, arr, pd.Series(arr, copy=False).astype(str).to_numpy(dtype=object))
        out[pd.isna(arr)] = None
    return pd.Series(out, index=s.index, name=s.name, dtype=object)


def _canonical_numbers(num: np.ndarray, raw: np.ndarray, text: np.ndarray) -> np.ndarray:
    """`text` with integral numbers (within int64) rewritten as integers, missing -> None."""
    if num.dtype.kind in "iu":  # every value present and an integer
        return num.astype(str).astype(object)
    out = text.copy()
    with np.errstate(invalid="ignore"):
        integral = np.isfinite(num) & (num % 1 == 0) & (np.abs(num) < _TWO_63)
    out[integral] = num[integral].astype(np.int64).astype(str)
    out[pd.isna(raw)] = None
    return out


def _canonical_general(s: pd.Series) -> pd.Series:
    """canonical_strings for extension dtypes (nullable ints/floats/booleans, strings, ...)."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("string").str.title().astype(object)
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype("string").astype(object).where(s.notna(), None)
    if pd.api.types.is_float_dtype(s.dtype):
        num = s.to_numpy(dtype=np.float64, na_value=np.nan)
        text = s.astype("string").to_numpy(dtype=object)
        out = _canonical_numbers(num, num, text)
        return pd.Series(out, index=s.index, name=s.name, dtype=object)
    return s.astype("string").astype(object).where(s.notna(), None)
