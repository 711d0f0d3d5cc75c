"""Read and validate the Kaggle Rossmann files (train, store, test) and the external tables.

Every problem with a file is reported as one `DataError` naming the file, the column, the
check and the first few offending rows (CSV line numbers: the header is line 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from modeling.errors import DataError

PathLike = str | Path
STATE_HOLIDAYS = ["0", "a", "b", "c"]
STORE_TYPES = ["a", "b", "c", "d"]
ASSORTMENTS = ["a", "b", "c"]
PROMO_INTERVALS = ["Jan,Apr,Jul,Oct", "Feb,May,Aug,Nov", "Mar,Jun,Sept,Dec"]
MAX_SHOWN = 5

def column(dtype: Any, *checks: pa.Check, nullable: bool = False, required: bool = True,
         unique: bool = False) -> pa.Column:
    return pa.Column(dtype, list(checks), nullable=nullable, required=required, unique=unique)


def _binary(nullable: bool = False) -> pa.Column:
    return column("float64" if nullable else "int64", pa.Check.isin([0, 1]), nullable=nullable)


def _dayofweek_matches_date(df: pd.DataFrame) -> pd.Series:
    """Kaggle DayOfWeek is 1=Monday..7=Sunday; it must agree with Date where both are present."""
    if "DayOfWeek" not in df.columns or "Date" not in df.columns:
        return pd.Series(True, index=df.index)
    dow = df["Date"].dt.dayofweek + 1
    return df["DayOfWeek"].isna() | df["Date"].isna() | (dow == df["DayOfWeek"])


DOW_CHECK = pa.Check(_dayofweek_matches_date, name="DayOfWeek_matches_Date")
WIDE_CHECK_COLUMNS = {"DayOfWeek_matches_Date": ["Date", "DayOfWeek"]}


def _day_columns(date_nullable: bool = False) -> dict[str, pa.Column]:
    return {
        "Store": column("int64", pa.Check.ge(1)),
        "DayOfWeek": column("int64", pa.Check.isin(list(range(1, 8)))),
        "Date": column("datetime64[ns]", nullable=date_nullable),
    }


def _calendar_columns(open_nullable: bool) -> dict[str, pa.Column]:
    return {
        "Open": _binary(nullable=open_nullable),
        "Promo": _binary(),
        "StateHoliday": column(str, pa.Check.isin(STATE_HOLIDAYS)),
        "SchoolHoliday": _binary(),
    }


TRAIN_SCHEMA = pa.DataFrameSchema(
    {
        **_day_columns(),
        "Sales": column("int64", pa.Check.ge(0)),
        "Customers": column("int64", pa.Check.ge(0)),
        **_calendar_columns(open_nullable=False),
    },
    unique=["Store", "Date"], checks=[DOW_CHECK], coerce=True, name="train",
)

TEST_SCHEMA = pa.DataFrameSchema(
    {"Id": column("int64", unique=True), **_day_columns(), **_calendar_columns(open_nullable=True)},
    unique=["Store", "Date"], checks=[DOW_CHECK], coerce=True, name="test",
)

# Known future events in the test.csv layout: Id, DayOfWeek and Open may be present (and are
# checked when they are), the event columns are required.
CALENDAR_SCHEMA = pa.DataFrameSchema(
    {"Id": column("int64", unique=True, required=False),
     "Store": column("int64", pa.Check.ge(1)),
     "DayOfWeek": column("int64", pa.Check.isin(list(range(1, 8))), required=False),
     "Date": column("datetime64[ns]"),
     **_calendar_columns(open_nullable=True),
     "Open": column("float64", pa.Check.isin([0, 1]), nullable=True, required=False)},
    unique=["Store", "Date"], checks=[DOW_CHECK], coerce=True, name="calendar",
)

_opt_float = {"nullable": True}
STORE_SCHEMA = pa.DataFrameSchema(
    {
        "Store": column("int64", pa.Check.ge(1), unique=True),
        "StoreType": column(str, pa.Check.isin(STORE_TYPES)),
        "Assortment": column(str, pa.Check.isin(ASSORTMENTS)),
        "CompetitionDistance": column("float64", pa.Check.ge(0), **_opt_float),
        "CompetitionOpenSinceMonth": column("float64", pa.Check.in_range(1, 12), **_opt_float),
        "CompetitionOpenSinceYear": column("float64", pa.Check.in_range(1900, 2100), **_opt_float),
        "Promo2": _binary(),
        "Promo2SinceWeek": column("float64", pa.Check.in_range(1, 53), **_opt_float),
        "Promo2SinceYear": column("float64", pa.Check.in_range(1900, 2100), **_opt_float),
        "PromoInterval": column(str, pa.Check.isin(PROMO_INTERVALS), **_opt_float),
    },
    coerce=True, name="store",
)



# ---------------------------------------------------------------------------- error reporting


def csv_line(index: Any) -> str:
    """Label a row read from CSV by its 1-based line number (the header is line 1)."""
    return f"line {int(index) + 2}"


def table_row(index: Any) -> str:
    """Label a row of a Parquet file by its 1-based position."""
    return f"row {int(index) + 1}"


def _show(value: Any) -> str:
    if isinstance(value, pd.Timestamp) and value == value.normalize():
        return value.strftime("%Y-%m-%d")
    return repr(value) if isinstance(value, str) else str(value)


def _describe_check(check: str) -> str:
    if check.startswith("coerce_dtype('datetime64"):
        return "parseable as a date (YYYY-MM-DD)"
    if check.startswith("coerce_dtype('int"):
        return "an integer"
    if check.startswith("coerce_dtype('float"):
        return "a number"
    if check == "multiple_fields_uniqueness":
        return "unique together"
    if check == "field_uniqueness":
        return "unique"
    return check


def _drop_noise(fc: pd.DataFrame) -> pd.DataFrame:
    """Drop pandera's follow-up failures once a column already failed to coerce."""
    coerce_failed = set(fc.loc[fc["check"].astype(str).str.startswith("coerce_dtype"), "column"])
    check = fc["check"].astype(str)
    follow_up = fc["column"].isin(coerce_failed) & (
        check.str.startswith("dtype(") | fc["index"].isna()
    )
    null_coerce = check.str.startswith("coerce_dtype") & fc["failure_case"].isna()
    return fc[~(follow_up | null_coerce)]


@dataclass
class _Problem:
    columns: list[str]
    check: str
    rows: list[int]
    values: list[str]
    count: int


def _problems(fc: pd.DataFrame, wide_columns: Mapping[str, list[str]]) -> list[_Problem]:
    out: list[_Problem] = []
    fc = _drop_noise(fc)
    col_level = fc[fc["schema_context"] != "DataFrameSchema"]
    for (column, check), grp in col_level.groupby(["column", "check"], sort=False, dropna=False):
        grp = grp.drop_duplicates("index")
        head = grp.head(MAX_SHOWN)
        rows = [int(i) if pd.notna(i) else -1 for i in head["index"]]
        out.append(_Problem([str(column)], str(check), rows,
                            [_show(v) for v in head["failure_case"]], len(grp)))
    # frame-level checks that could not run (index NaN) follow from a failure reported above
    frame_level = fc[(fc["schema_context"] == "DataFrameSchema") & fc["index"].notna()]
    for check, grp in frame_level.groupby("check", sort=False):
        shown = wide_columns.get(str(check)) or list(dict.fromkeys(grp["column"]))
        grp = grp[grp["column"].isin(shown)]
        if grp.empty:
            continue
        indices = list(dict.fromkeys(grp["index"]))
        rows, values = [], []
        for i in indices[:MAX_SHOWN]:
            sub = grp[grp["index"] == i].drop_duplicates("column").set_index("column")
            sub = sub.loc[[c for c in shown if c in sub.index]].reset_index()
            rows.append(int(i))
            values.append(", ".join(f"{c}={_show(v)}" for c, v in zip(sub["column"],
                                                                       sub["failure_case"],
                                                                       strict=True)))
        out.append(_Problem(shown, str(check), rows, values, len(indices)))
    return out


def _message(source: str, problems: list[_Problem], row_label: Callable[[Any], str]) -> str:
    lines = [f"{source}: {len(problems)} validation problem(s)"]
    for p in problems:
        what = f"column '{p.columns[0]}'" if len(p.columns) == 1 else (
            "columns " + ", ".join(f"'{c}'" for c in p.columns))
        examples = "; ".join(
            (f"{row_label(r)}: {v}" if r >= 0 else v) for r, v in zip(p.rows, p.values, strict=True)
        )
        lines.append(f"  {what} failed check '{_describe_check(p.check)}' "
                     f"on {p.count} row(s), e.g. {examples}")
    return "\n".join(lines)


def raise_from_schema_errors(err: SchemaErrors, source: str,
                             row_label: Callable[[Any], str] = csv_line,
                             wide_columns: Mapping[str, list[str]] = WIDE_CHECK_COLUMNS) -> None:
    """Turn pandera's lazy failure cases into ONE DataError (with `.details` per record/field)."""
    problems = _problems(err.failure_cases, wide_columns)
    exc = DataError(_message(source, problems, row_label))
    exc.details = [  # type: ignore[attr-defined]
        {"record": r if r >= 0 else None, "field": ",".join(p.columns),
         "msg": f"failed check '{_describe_check(p.check)}': {v}"}
        for p in problems for r, v in zip(p.rows, p.values, strict=True)
    ]
    raise exc from None


def validate_frame(df: pd.DataFrame, schema: pa.DataFrameSchema, source: str,
                   row_label: Callable[[Any], str] = csv_line) -> pd.DataFrame:
    """Validate (and coerce) lazily so every problem in the file is reported at once."""
    try:
        return schema.validate(df, lazy=True)
    except SchemaErrors as err:
        raise_from_schema_errors(err, source, row_label)
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------- file reading


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def _header(path: Path, sep: str = ",") -> list[str]:
    if _is_parquet(path):
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as err:  # noqa: BLE001 - any pyarrow failure means a bad file
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    try:
        return list(pd.read_csv(path, nrows=0, sep=sep).columns)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: cannot read the header ({err})") from None


def require_columns(found: Iterable[str], required: Iterable[str], source: str) -> None:
    """Raise DataError naming missing columns, the closest found name, and what was found."""
    found = [str(c) for c in found]
    missing = [c for c in required if c not in found]
    if not missing:
        return
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, found, n=1, cutoff=0.6)
        close = close or [c for c in found if c.lower() == name.lower()]
        hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise DataError(f"{source}: missing column(s) {', '.join(hints)}; "
                    f"found columns: {', '.join(found) or '(none)'}")


def _read_hints(schema: pa.DataFrameSchema, present: Iterable[str], text: bool) -> dict[str, Any]:
    """dtype hints; text=False leaves text/date columns to inference (pyarrow turns null into
    'None' under a str hint), and `canonical_codes` later maps numeric codes back to text."""
    hints: dict[str, Any] = {}
    for name in present:
        col = schema.columns.get(name)
        if col is None:
            continue
        dtype = str(col.dtype)
        if dtype.startswith("datetime") or dtype == "str":
            if text:
                hints[name] = str
        elif dtype.startswith("int"):
            hints[name] = "float64" if col.nullable else "int64"
        elif dtype.startswith("float"):
            hints[name] = "float64"
    return hints


def canonical_codes(values: pd.Series) -> pd.Series:
    """Code columns such as StateHoliday as strings: 0, 0.0 and "0" all become "0"."""
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) in ("string",
                                                                                 "empty"):
        return values.where(values.notna(), np.nan)  # None (pyarrow) -> NaN
    num = pd.to_numeric(values, errors="coerce")
    integral = num.notna() & (num % 1 == 0)
    out = values.astype(object).where(values.isna(), values.astype(str))
    out[integral] = num[integral].astype("int64").astype(str)
    return out


def _read_raw(path: Path, schema: pa.DataFrameSchema, nrows: int | None) -> pd.DataFrame:
    header = _header(path)
    required = [n for n, c in schema.columns.items() if c.required]
    require_columns(header, required, str(path))
    if _is_parquet(path):
        df = pd.read_parquet(path)
        if nrows is not None:
            df = df.head(nrows)
    else:
        engine = "c" if nrows is not None else "pyarrow"
        hints = _read_hints(schema, header, text=engine == "c")
        try:
            df = pd.read_csv(path, dtype=hints, nrows=nrows, engine=engine)
        except (ValueError, TypeError, OverflowError):
            # a value does not fit its type: read as text, and let validation name the rows
            try:
                df = pd.read_csv(path, dtype=str, nrows=nrows)
            except (ValueError, UnicodeDecodeError) as err:  # ParserError is a ValueError
                raise DataError(f"{path}: malformed CSV ({str(err).strip()})") from None
    if len(df) == 0:
        raise DataError(f"{path}: file has a header but no data rows")
    for name, col in schema.columns.items():
        if str(col.dtype) == "str" and name in df.columns:
            df[name] = canonical_codes(df[name])
    return df


def _read(path: PathLike, schema: pa.DataFrameSchema, nrows: int | None) -> pd.DataFrame:
    p = Path(path)
    check_exists(p)
    df = _read_raw(p, schema, nrows)
    label = table_row if _is_parquet(p) else csv_line
    return validate_frame(df, schema, str(p), label)


def read_train(path: PathLike, nrows: int | None = None) -> pd.DataFrame:
    """Kaggle train.csv (or .csv.gz / .parquet): typed, validated, StateHoliday as "0"/"a"/"b"/"c"."""
    return _read(path, TRAIN_SCHEMA, nrows)


def read_test(path: PathLike, nrows: int | None = None) -> pd.DataFrame:
    """Kaggle test.csv: like train without Sales/Customers, with Id; Open may be missing (NaN)."""
    return _read(path, TEST_SCHEMA, nrows)


def read_calendar(path: PathLike, nrows: int | None = None) -> pd.DataFrame:
    """Known future events in the test.csv layout (Store, Date, Promo, StateHoliday,
    SchoolHoliday; Id, DayOfWeek, Open optional): typed and validated, (Store, Date) unique."""
    return _read(path, CALENDAR_SCHEMA, nrows)


def check_calendar(calendar: pd.DataFrame, train: pd.DataFrame, path: PathLike) -> None:
    """The calendar read from `path` against train.csv: every Store must be one of train.csv's
    and no event flag may contradict train.csv's row for the same (Store, Date). One DataError
    naming the file, the column and the first lines otherwise."""
    from modeling.features.calendar import calendar_problems, calendar_table, raise_problems
    from pipelines.features.rossmann import EVENTS

    known = calendar_table(train, "Store", "Date", EVENTS, observed=True)
    p = Path(path)
    label = table_row if _is_parquet(p) else csv_line
    raise_problems(calendar_problems(known, calendar.reset_index(drop=True), "Store", "Date", EVENTS),
                   str(p), label)


def read_store(path: PathLike, nrows: int | None = None) -> pd.DataFrame:
    """Kaggle store.csv: one row per store; optional competition/Promo2 fields are NaN."""
    return _read(path, STORE_SCHEMA, nrows)


def check_stores(frame: pd.DataFrame, store: pd.DataFrame, path: PathLike) -> None:
    """Every Store of train/test must have a row in store.csv (else DataError naming `path`)."""
    known = store["Store"].unique()
    schema = pa.DataFrameSchema({"Store": pa.Column(checks=pa.Check(
        lambda s: s.isin(known), name="present in store.csv"))})
    p = Path(path)
    label = table_row if _is_parquet(p) else csv_line
    validate_frame(frame[["Store"]], schema, str(p), label)


# ---------------------------------------------------------------------------- external tables
