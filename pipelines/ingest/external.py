"""Read the optional external tables of the Rossmann competition (store_states, weather per
German state, Google Trends per state and for Germany), in either the per-file folders as
distributed or the combined files, into one `ExternalTables`.

Problems are reported like the Kaggle files' (pipelines/ingest/rossmann.py): one `DataError`
naming file, column and rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from modeling.errors import DataError
from pipelines.ingest.rossmann import (
    MAX_SHOWN,
    PathLike,
    check_exists,
    column,
    require_columns,
    validate_frame,
)

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

STORE_STATES_SCHEMA = pa.DataFrameSchema(
    {"Store": column("int64", pa.Check.ge(1), unique=True),
     "State": column(str, pa.Check.str_length(min_value=2))},
    coerce=True, name="store_states",
)


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
    check_exists(path)
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
        {"Date": column("datetime64[ns]"),
         **{c: column("float64", nullable=True) for c in numeric},
         **({"events": column(str, nullable=True)} if "events" in df.columns else {})},
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
        {"week": column(str, pa.Check.str_matches(WEEK_PATTERN)), "trend": column("float64")},
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
