"""Rossmann feature engineering as a configured list of generic steps (modeling.features).

Order of work at training time: compute features over ALL rows of train.csv (closed days and
holidays carry the events), then keep the rows worth learning from (`training_rows`), then
split off the last weeks (`split_by_days`). At predict time the same fitted pipeline, saved in the
bundle, turns raw Kaggle-schema rows (validated by the bundle's `input_schema`) into the same
features: `modeling.predictors.load_predictor(bundle).engineer(rows)`, for HTTP and batch alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from modeling.errors import DataError
from modeling.features import (
    DateParts,
    ElapsedEvents,
    FeaturePipeline,
    GroupAny,
    JoinTable,
    MonthInList,
    MonthsSince,
    Step,
    WeeksSince,
)
from pipelines.ingest.external import ExternalTables
from pipelines.ingest.rossmann import STATE_HOLIDAYS

EVENTS = ["StateHoliday", "SchoolHoliday", "Promo"]
EVENT_WINDOW = 7
EVENT_CAP = 365  # days; "no event known" also reads as this value
# Beyond a store's calendar horizon: event -> repeat period in days ({}: no event known there,
# distances read EVENT_CAP). See docs/features.md for the measurement behind the choice.
EVENT_REPEAT: dict[str, int] = {}
KAGGLE_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sept", "Oct", "Nov",
                 "Dec"]
TARGET = "Sales"

_AFTER_BEFORE = [f"{p}{e}" for e in EVENTS for p in ("After", "Before")]
_WINDOW_COUNTS = [f"{e}_{s}" for e in EVENTS for s in ("bw", "fw")]

# Dayofweek is derived from Date in the pipeline (Monday=0), so requests need not send the
# Kaggle DayOfWeek column (1=Monday); it carries the same information.
CAT_COLS = [
    "Store", "Dayofweek", "Year", "Month", "Day", "Week", "StateHoliday", "StoreType",
    "Assortment", "PromoInterval", "CompetitionOpenSinceYear", "Promo2SinceYear",
    "CompetitionMonthsOpen", "Promo2Weeks", "Promo", "SchoolHoliday", "Promo2Active",
    "OpensSundays", *_AFTER_BEFORE,
]
CONT_COLS = ["CompetitionDistance", *_WINDOW_COUNTS]
WEATHER_COLS = [
    "max_temperature_c", "mean_temperature_c", "min_temperature_c", "max_humidity",
    "mean_humidity", "min_humidity", "max_wind_speed_kmh", "mean_wind_speed_kmh", "cloud_cover",
    "precipitation_mm",
]
EXTERNAL_CAT_COLS = ["State", "events"]
TREND_COLS = ["trend", "trend_DE"]
EXTERNAL_CONT_COLS = [*WEATHER_COLS, *TREND_COLS]


def feature_columns(external: bool, trends: bool = True) -> tuple[list[str], list[str]]:
    """(categorical, continuous) model inputs, with or without the external tables.

    `trends=False` leaves out the Google Trends indices: they drift with time (validation weeks
    sit above most of the training range), so models extrapolate from them (see docs/benchmarks.md).
    """
    if external:
        conts = [c for c in EXTERNAL_CONT_COLS if trends or c not in TREND_COLS]
        return CAT_COLS + EXTERNAL_CAT_COLS, CONT_COLS + conts
    return list(CAT_COLS), list(CONT_COLS)


def _daily(weekly: pd.DataFrame, value: str, out: str, keys: list[str]) -> pd.DataFrame:
    """Weekly rows (week_start..week_end) -> one row per day, for a plain join on Date."""
    weekly = weekly.dropna(subset=["week_start", "week_end"])
    n = ((weekly["week_end"] - weekly["week_start"]).dt.days + 1).clip(lower=1).to_numpy()
    rep = weekly.loc[weekly.index.repeat(n)]
    offset = pd.to_timedelta(rep.groupby(level=0).cumcount().to_numpy(), unit="D")
    daily = pd.DataFrame({**{k: rep[k].to_numpy() for k in keys},
                          "Date": (rep["week_start"] + offset).to_numpy(),
                          out: rep[value].to_numpy()})
    return daily.drop_duplicates([*keys, "Date"], keep="last").reset_index(drop=True)


def _external_steps(external: ExternalTables) -> tuple[list[Step], list[str], list[str]]:
    steps: list[Step] = []
    cats: list[str] = []
    conts: list[str] = []
    if external.store_states is not None:
        steps.append(JoinTable(external.store_states, on="Store", columns=["State"],
                               label="store_states"))
        cats.append("State")
        if external.weather is not None:
            cols = [c for c in [*WEATHER_COLS, "events"] if c in external.weather.columns]
            steps.append(JoinTable(external.weather, on=["State", "Date"], columns=cols,
                                   label="weather"))
            cats += [c for c in cols if c == "events"]
            conts += [c for c in cols if c != "events"]
        if external.trends_state is not None:
            daily = _daily(external.trends_state, "trend", "trend", ["State"])
            steps.append(JoinTable(daily, on=["State", "Date"], columns=["trend"],
                                   label="trends_state"))
            conts.append("trend")
    if external.trends_de is not None:
        daily = _daily(external.trends_de, "trend", "trend_DE", [])
        steps.append(JoinTable(daily, on="Date", columns=["trend_DE"], label="trends_de"))
        conts.append("trend_DE")
    return steps, cats, conts


def build_feature_pipeline(store: pd.DataFrame,
                           external: ExternalTables | None = None) -> FeaturePipeline:
    """The Rossmann feature pipeline (unfitted); it carries the store and external tables."""
    steps: list[Step] = [
        DateParts("Date"),
        JoinTable(store, on="Store", label="store"),
    ]
    cats, conts = feature_columns(external=False)
    if external is not None:
        ext_steps, ext_cats, ext_conts = _external_steps(external)
        steps += ext_steps
        cats, conts = cats + ext_cats, conts + ext_conts
    steps += [
        MonthsSince("CompetitionOpenSinceYear", "CompetitionOpenSinceMonth", "Date",
                    "CompetitionMonthsOpen", clip=(0, 24)),
        WeeksSince("Promo2SinceYear", "Promo2SinceWeek", "Date", "Promo2Weeks", clip=(0, 25)),
        # month named in PromoInterval and the store takes part in Promo2 at all
        MonthInList("PromoInterval", "Date", "Promo2Active", month_names=KAGGLE_MONTHS,
                    require=["Promo2"]),
        GroupAny("Store", "Open", "OpensSundays", where={"Dayofweek": 6}),
        ElapsedEvents("Store", "Date", EVENTS, window=EVENT_WINDOW, cap=EVENT_CAP, repeat=EVENT_REPEAT),
    ]
    meta = {"domain": "rossmann", "cat_cols": cats, "cont_cols": conts,
            "target": TARGET, "target_transform": "log"}
    return FeaturePipeline(steps, meta)


def engineer_training(train: pd.DataFrame, store: pd.DataFrame,
                      external: ExternalTables | None = None
                      ) -> tuple[FeaturePipeline, pd.DataFrame]:
    """Fit the pipeline on ALL rows of train (events live on closed days too) -> (pipeline,
    features of every row); follow with `training_rows` and `split_by_days`."""
    pipeline = build_feature_pipeline(store, external)
    return pipeline, pipeline.fit_transform(train)


def training_rows(features: pd.DataFrame) -> pd.DataFrame:
    """Rows to learn from: store open and Sales > 0 (log target defined)."""
    return features[(features["Open"] == 1) & (features[TARGET] > 0)]


def log_target(df: pd.DataFrame) -> np.ndarray:
    """Training target: log(Sales) as float32."""
    return np.log(df[TARGET].to_numpy(dtype="float64")).astype(np.float32)


def split_by_days(df: pd.DataFrame, valid_days: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid): valid = rows with Date > last date - valid_days (the last N days)."""
    if valid_days < 1:
        raise DataError(f"valid_days must be >= 1, got {valid_days}")
    cutoff = df["Date"].max() - pd.Timedelta(days=valid_days)
    is_valid = df["Date"] > cutoff
    return df[~is_valid], df[is_valid]


def input_schema() -> Any:
    """Raw request fields as a modeling.schema.InputSchema, for the bundle (serving side)."""
    from modeling.schema import InputField, InputSchema

    return InputSchema([
        InputField("Store", "int"),
        InputField("DayOfWeek", "int", required=False),
        InputField("Date", "date"),
        InputField("Open", "int", required=False),
        InputField("Promo", "int"),
        InputField("StateHoliday", "str", allowed=list(STATE_HOLIDAYS)),
        InputField("SchoolHoliday", "int"),
    ])
