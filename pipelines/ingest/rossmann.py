"""Read and validate the Kaggle Rossmann files (train, store, test) and the external tables.

Every problem with a file is reported as one `DataError` naming the file, the column, the
check and the first few offending rows (CSV line numbers: the header is line 1).
"""

from __future__ import annotations

import difflib
import re
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

# German state file names (weather/) -> state codes used by store_states.csv
STATE_CODES = {
    "BadenWuerttemberg": "BW", "Bayern": "BY", "Berlin": "BE", "Brandenburg": "BB",
    "Bremen": "HB", "Hamburg": "HH", "Hessen": "HE", "MecklenburgVorpommern": "MV",
    "Niedersachsen": "NI", "NordrheinWestfalen": "NW", "RheinlandPfalz": "RP", "Saarland": "SL",
    "Sachsen": "SN", "SachsenAnhalt": "ST", "SchleswigHolstein": "SH", "Thueringen": "TH",
}

# Weather columns as distributed -> normalised snake_case names
WEATHER_NAMES = {
    "Max_TemperatureC": "max_temperature_c", "Mean_TemperatureC": "mean_temperature_c",
    "Min_TemperatureC": "min_temperature_c", "Dew_PointC": "dew_point_c",
    "MeanDew_PointC": "mean_dew_point_c", "Min_DewpointC": "min_dew_point_c",
    "Max_Humidity": "max_humidity", "Mean_Humidity": "mean_humidity",
    "Min_Humidity": "min_humidity", "Max_Sea_Level_PressurehPa": "max_sea_level_pressure_hpa",
    "Mean_Sea_Level_PressurehPa": "mean_sea_level_pressure_hpa",
    "Min_Sea_Level_PressurehPa": "min_sea_level_pressure_hpa",
    "Max_VisibilityKm": "max_visibility_km", "Mean_VisibilityKm": "mean_visibility_km",
    "Min_VisibilitykM": "min_visibility_km", "Max_Wind_SpeedKm_h": "max_wind_speed_kmh",
    "Mean_Wind_SpeedKm_h": "mean_wind_speed_kmh", "Max_Gust_SpeedKm_h": "max_gust_speed_kmh",
    "Precipitationmm": "precipitation_mm", "CloudCover": "cloud_cover", "Events": "events",
    "WindDirDegrees": "wind_dir_degrees",
}


def _col(dtype: Any, *checks: pa.Check, nullable: bool = False, required: bool = True,
         unique: bool = False) -> pa.Column:
    return pa.Column(dtype, list(checks), nullable=nullable, required=required, unique=unique)


def _binary(nullable: bool = False) -> pa.Column:
    return _col("float64" if nullable else "int64", pa.Check.isin([0, 1]), nullable=nullable)


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
        "Store": _col("int64", pa.Check.ge(1)),
        "DayOfWeek": _col("int64", pa.Check.isin(list(range(1, 8)))),
        "Date": _col("datetime64[ns]", nullable=date_nullable),
    }


def _calendar_columns(open_nullable: bool) -> dict[str, pa.Column]:
    return {
        "Open": _binary(nullable=open_nullable),
        "Promo": _binary(),
        "StateHoliday": _col(str, pa.Check.isin(STATE_HOLIDAYS)),
        "SchoolHoliday": _binary(),
    }


TRAIN_SCHEMA = pa.DataFrameSchema(
    {
        **_day_columns(),
        "Sales": _col("int64", pa.Check.ge(0)),
        "Customers": _col("int64", pa.Check.ge(0)),
        **_calendar_columns(open_nullable=False),
    },
    unique=["Store", "Date"], checks=[DOW_CHECK], coerce=True, name="train",
)

TEST_SCHEMA = pa.DataFrameSchema(
    {"Id": _col("int64", unique=True), **_day_columns(), **_calendar_columns(open_nullable=True)},
    unique=["Store", "Date"], checks=[DOW_CHECK], coerce=True, name="test",
)

# Known future events in the test.csv layout: Id, DayOfWeek and Open may be present (and are
# checked when they are), the event columns are required.
CALENDAR_SCHEMA = pa.DataFrameSchema(
    {"Id": _col("int64", unique=True, required=False),
     "Store": _col("int64", pa.Check.ge(1)),
     "DayOfWeek": _col("int64", pa.Check.isin(list(range(1, 8))), required=False),
     "Date": _col("datetime64[ns]"),
     **_calendar_columns(open_nullable=True),
     "Open": _col("float64", pa.Check.isin([0, 1]), nullable=True, required=False)},
    unique=["Store", "Date"], checks=[DOW_CHECK], coerce=True, name="calendar",
)

_opt_float = {"nullable": True}
STORE_SCHEMA = pa.DataFrameSchema(
    {
        "Store": _col("int64", pa.Check.ge(1), unique=True),
        "StoreType": _col(str, pa.Check.isin(STORE_TYPES)),
        "Assortment": _col(str, pa.Check.isin(ASSORTMENTS)),
        "CompetitionDistance": _col("float64", pa.Check.ge(0), **_opt_float),
        "CompetitionOpenSinceMonth": _col("float64", pa.Check.in_range(1, 12), **_opt_float),
        "CompetitionOpenSinceYear": _col("float64", pa.Check.in_range(1900, 2100), **_opt_float),
        "Promo2": _binary(),
        "Promo2SinceWeek": _col("float64", pa.Check.in_range(1, 53), **_opt_float),
        "Promo2SinceYear": _col("float64", pa.Check.in_range(1900, 2100), **_opt_float),
        "PromoInterval": _col(str, pa.Check.isin(PROMO_INTERVALS), **_opt_float),
    },
    coerce=True, name="store",
)

STORE_STATES_SCHEMA = pa.DataFrameSchema(
    {"Store": _col("int64", pa.Check.ge(1), unique=True),
     "State": _col(str, pa.Check.str_length(min_value=2))},
    coerce=True, name="store_states",
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


def _check_exists(path: Path) -> None:
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
    _check_exists(p)
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


@dataclass
class ExternalTables:
    """Optional external tables; a combined state code such as "HB,NI" has its own rows."""

    store_states: pd.DataFrame | None = None  # Store, State
    weather: pd.DataFrame | None = None  # State, Date, normalised weather columns
    trends_state: pd.DataFrame | None = None  # State, week_start, week_end, trend
    trends_de: pd.DataFrame | None = None  # week_start, week_end, trend

    @property
    def empty(self) -> bool:
        return all(t is None for t in (self.store_states, self.weather, self.trends_state,
                                       self.trends_de))


def _csv(path: Path, sep: str = ",") -> pd.DataFrame:
    _check_exists(path)
    try:
        df = pd.read_csv(path, sep=sep)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: malformed CSV ({str(err).strip()})") from None
    if len(df) == 0:
        raise DataError(f"{path}: file has a header but no data rows")
    return df


def _weather_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Normalise names, coerce numbers and dates; the 'events' column stays text."""
    require_columns(df.columns, ["Date"], source)
    df = df.rename(columns={c: WEATHER_NAMES.get(c, _snake(c)) for c in df.columns if c != "Date"})
    numeric = [c for c in df.columns if c not in ("Date", "events", "file", "State")]
    schema = pa.DataFrameSchema(
        {"Date": _col("datetime64[ns]"),
         **{c: _col("float64", nullable=True) for c in numeric},
         **({"events": _col(str, nullable=True)} if "events" in df.columns else {})},
        coerce=True,
    )
    if "events" in df.columns:
        df["events"] = df["events"].where(df["events"].notna() & (df["events"] != ""), np.nan)
    return validate_frame(df, schema, source)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _read_weather_dir(folder: Path) -> pd.DataFrame:
    frames = []
    for path in sorted(folder.glob("*.csv")):
        if path.stem not in STATE_CODES:
            raise DataError(f"{path}: unknown state name {path.stem!r}; expected one of "
                            f"{', '.join(STATE_CODES)}")
        df = _weather_frame(_csv(path, sep=";"), str(path))
        df.insert(0, "State", STATE_CODES[path.stem])
        frames.append(df)
    if not frames:
        raise DataError(f"{folder}: no weather/<StateName>.csv files")
    return pd.concat(frames, ignore_index=True)


def _read_weather_combined(path: Path, state_names: Path) -> pd.DataFrame:
    """fast.ai layout: weather.csv with a 'file' column holding the state name."""
    df = _csv(path)
    require_columns(df.columns, ["file", "Date"], str(path))
    names = dict(STATE_CODES)
    if state_names.exists():
        sn = _csv(state_names)
        require_columns(sn.columns, ["StateName", "State"], str(state_names))
        names.update(zip(sn["StateName"], sn["State"], strict=True))
    unknown = sorted(set(df["file"]) - set(names))
    if unknown:
        raise DataError(f"{path}: column 'file' has unknown state name(s) {unknown[:MAX_SHOWN]}")
    state = df.pop("file").map(names)
    df = _weather_frame(df, str(path))
    df.insert(0, "State", state.to_numpy())
    return df


WEEK_PATTERN = r"^\d{4}-\d{2}-\d{2} - \d{4}-\d{2}-\d{2}$"


def _trend_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Weekly Google-trend rows -> week_start, week_end, trend."""
    schema = pa.DataFrameSchema(
        {"week": _col(str, pa.Check.str_matches(WEEK_PATTERN)), "trend": _col("float64")},
        coerce=True,
    )
    df = validate_frame(df, schema, source)
    return pd.DataFrame({
        "week_start": pd.to_datetime(df["week"].str[:10]),
        "week_end": pd.to_datetime(df["week"].str[-10:]),
        "trend": df["trend"].to_numpy(),
    })


def _read_trend_file(path: Path) -> pd.DataFrame:
    df = _csv(path)
    if df.shape[1] < 2:
        raise DataError(f"{path}: expected two columns (week, trend); found {list(df.columns)}")
    df = df.iloc[:, :2].set_axis(["week", "trend"], axis=1)
    return _trend_frame(df, str(path))


def _trend_code(name: str) -> str | None:
    """'Rossmann_DE_SN' -> 'SN', 'Rossmann_DE' -> None (whole country)."""
    parts = name.split("_")
    return parts[2] if len(parts) > 2 else None


def _read_trends_dir(folder: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    states, de = [], None
    for path in sorted(folder.glob("*.csv")):
        code = _trend_code(path.stem)
        df = _read_trend_file(path)
        if code is None:
            de = df
        else:
            states.append(df.assign(State=code))
    st = pd.concat(states, ignore_index=True) if states else None
    return _state_first(st), de


def _read_trends_combined(path: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """fast.ai layout: googletrend.csv with file, week, trend."""
    df = _csv(path)
    require_columns(df.columns, ["file", "week", "trend"], str(path))
    frame = _trend_frame(df[["week", "trend"]], str(path))
    code = df["file"].astype(str).str.split("_").str[2]
    is_de = code.isna().to_numpy()
    de = frame[is_de].reset_index(drop=True) if is_de.any() else None
    st = frame[~is_de].assign(State=code[~is_de].to_numpy()).reset_index(drop=True)
    return _state_first(st if len(st) else None), de


def _state_first(df: pd.DataFrame | None) -> pd.DataFrame | None:
    return None if df is None else df[["State", *[c for c in df.columns if c != "State"]]]


def _add_combined_states(df: pd.DataFrame | None, codes: Iterable[str]) -> pd.DataFrame | None:
    """Give a combined code like "HB,NI" the rows of its last listed state that has data (NI)."""
    if df is None:
        return None
    have = set(df["State"])
    extra = []
    for code in codes:
        if code in have:
            continue
        parts = [p for p in code.split(",") if p in have]
        if parts:
            extra.append(df[df["State"] == parts[-1]].assign(State=code))
    return pd.concat([df, *extra], ignore_index=True) if extra else df


def read_external(folder: PathLike) -> ExternalTables:
    """Read store_states, weather and Google trends; missing tables are None, bad ones DataError."""
    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"{d}: external-data directory not found")
    tables = ExternalTables()
    if (d / "store_states.csv").exists():
        p = d / "store_states.csv"
        tables.store_states = validate_frame(_csv(p), STORE_STATES_SCHEMA, str(p))
    if (d / "weather").is_dir():
        tables.weather = _read_weather_dir(d / "weather")
    elif (d / "weather.csv").exists():
        tables.weather = _read_weather_combined(d / "weather.csv", d / "state_names.csv")
    if (d / "googletrend").is_dir():
        tables.trends_state, tables.trends_de = _read_trends_dir(d / "googletrend")
    elif (d / "googletrend.csv").exists():
        tables.trends_state, tables.trends_de = _read_trends_combined(d / "googletrend.csv")
    if tables.store_states is not None:
        combined = [c for c in tables.store_states["State"].unique() if "," in c]
        tables.weather = _add_combined_states(tables.weather, combined)
        tables.trends_state = _add_combined_states(tables.trends_state, combined)
    return tables
