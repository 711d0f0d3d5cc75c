"""Seeded Rossmann-schema store sales (train.csv, store.csv, test.csv with Kaggle quoting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from modeling.errors import DataError
from pipelines.synth.common import _atomic_write

TEST_DAYS = 48
TRAIN_COLUMNS = ["Store", "DayOfWeek", "Date", "Sales", "Customers", "Open", "Promo",
                 "StateHoliday", "SchoolHoliday"]
STORE_COLUMNS = ["Store", "StoreType", "Assortment", "CompetitionDistance",
                 "CompetitionOpenSinceMonth", "CompetitionOpenSinceYear", "Promo2",
                 "Promo2SinceWeek", "Promo2SinceYear", "PromoInterval"]
TEST_COLUMNS = ["Id", "Store", "DayOfWeek", "Date", "Open", "Promo", "StateHoliday",
                "SchoolHoliday"]
PROMO_INTERVALS = ("Jan,Apr,Jul,Oct", "Feb,May,Aug,Nov", "Mar,Jun,Sept,Dec")
_N_STATES = 12
_STATE_HOLIDAY_CODES = np.array(["0", "a", "b", "c"])


# ---------------------------------------------------------------- file writing

def _kaggle_table(df: pd.DataFrame, quoted: set[str]) -> pa.Table:
    """Arrow types that make the CSV writer quote exactly what Kaggle's R-written files quote."""
    arrays = {}
    for name in df.columns:
        col = df[name]
        if name in quoted:      # strings are quoted; missing is written as ""
            arrays[name] = pa.array(col.astype(object).where(col.notna(), "").astype(str),
                                    pa.string())
        elif name == "Date":    # dates are not quoted
            arrays[name] = pa.array(pd.to_datetime(col).to_numpy().astype("datetime64[D]"))
        elif pd.api.types.is_float_dtype(col) and (col.dropna() % 1 == 0).all():
            arrays[name] = pa.array(col.astype("Int64"), pa.int64())   # 1270, not 1270.0
        else:
            arrays[name] = pa.array(col)
    return pa.table(arrays)


def _write_kaggle_csv(df: pd.DataFrame, path: Path, quoted: set[str]) -> Path:
    table = _kaggle_table(df, quoted)
    opts = pacsv.WriteOptions(quoting_style="needed")
    return _atomic_write(path, lambda p: pacsv.write_csv(table, str(p), opts))


# ---------------------------------------------------------------- Rossmann calendar
def _easter(year: int) -> pd.Timestamp:
    """Gregorian Easter Sunday (anonymous Gregorian computus)."""
    a, b, c = year % 19, year // 100, year % 100
    d, e = divmod(b, 4)
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = divmod(c, 4)
    l_ = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * l_) // 451
    month, day = divmod(h + l_ - 7 * m + 114, 31)
    return pd.Timestamp(year=year, month=month, day=day + 1)


def _state_holidays(dates: pd.DatetimeIndex, rng: np.random.Generator) -> np.ndarray:
    """Holiday codes per (state, day): 0 none, 1 'a' public, 2 'b' Easter, 3 'c' Christmas."""
    codes = np.zeros((_N_STATES, len(dates)), dtype=np.int8)
    observes = rng.random((_N_STATES, 5)) < 0.45   # which states keep each regional holiday
    start = dates[0]
    for year in range(dates[0].year, dates[-1].year + 1):
        easter = _easter(year)
        national = [(pd.Timestamp(year, 1, 1), 1), (pd.Timestamp(year, 5, 1), 1),
                    (pd.Timestamp(year, 10, 3), 1), (pd.Timestamp(year, 12, 25), 3),
                    (pd.Timestamp(year, 12, 26), 3), (easter - pd.Timedelta(days=2), 2),
                    (easter + pd.Timedelta(days=1), 2), (easter + pd.Timedelta(days=39), 1),
                    (easter + pd.Timedelta(days=50), 1)]
        regional = [pd.Timestamp(year, 1, 6), easter + pd.Timedelta(days=60),
                    pd.Timestamp(year, 8, 15), pd.Timestamp(year, 10, 31), pd.Timestamp(year, 11, 1)]
        for day, code in national:
            t = (day - start).days
            if 0 <= t < len(dates):
                codes[:, t] = code
        for j, day in enumerate(regional):
            t = (day - start).days
            if 0 <= t < len(dates):
                codes[observes[:, j], t] = 1
    return codes


def _school_holidays(dates: pd.DatetimeIndex, rng: np.random.Generator) -> np.ndarray:
    """School-holiday flags per (state, day): summer, Easter, autumn and Christmas breaks."""
    t = np.arange(len(dates))
    out = np.zeros((_N_STATES, len(dates)), dtype=bool)
    summer_shift = rng.integers(0, 50, _N_STATES)          # staggered summer breaks
    autumn_shift = rng.integers(0, 21, _N_STATES)
    for year in range(dates[0].year - 1, dates[-1].year + 1):
        easter = _easter(year)
        blocks = [(pd.Timestamp(year, 6, 20), summer_shift, 42),
                  (easter - pd.Timedelta(days=7), np.zeros(_N_STATES, int), 14),
                  (pd.Timestamp(year, 10, 1), autumn_shift, 10),
                  (pd.Timestamp(year, 12, 22), np.zeros(_N_STATES, int), 16)]
        for first, shift, length in blocks:
            lo = (first - dates[0]).days + shift
            out |= (t[None, :] >= lo[:, None]) & (t[None, :] < lo[:, None] + length)
    weekday = dates.dayofweek.to_numpy() < 5
    return out & weekday[None, :]


def _promo_days(dates: pd.DatetimeIndex, rng: np.random.Generator) -> np.ndarray:
    """Chain-wide promo: Mon-Fri of roughly every other week, now and then two weeks running."""
    dow = dates.dayofweek.to_numpy()
    week = (np.arange(len(dates)) + dow[0]) // 7
    draws = rng.random(week[-1] + 1)
    on = np.zeros(week[-1] + 1, dtype=bool)
    on[0] = draws[0] < 0.5
    for w in range(1, len(on)):   # a loop over weeks (~100), not rows
        on[w] = draws[w] < (0.15 if on[w - 1] else 0.92)
    return on[week] & (dow < 5)


def _seasonality(dates: pd.DatetimeIndex) -> np.ndarray:
    """Log-sales calendar effect: December run-up, January lull, month-start paydays."""
    doy = dates.dayofyear.to_numpy().astype(float)
    dom = dates.day.to_numpy()
    december = 0.28 * np.exp(-0.5 * ((doy - 353.0) / 9.0) ** 2)
    january = -0.06 * np.exp(-0.5 * ((doy - 12.0) / 10.0) ** 2)
    spring = 0.03 * np.sin(2 * np.pi * (doy - 60.0) / 365.25)
    payday = 0.04 * (dom <= 3)
    return december + january + spring + payday


def _week_start(year: np.ndarray, week: np.ndarray) -> pd.DatetimeIndex:
    """Monday of ISO week ``week`` of ``year``."""
    jan4 = pd.to_datetime(pd.DataFrame({"year": year, "month": 1, "day": 4}))
    monday = jan4 - pd.to_timedelta(jan4.dt.dayofweek, unit="D")
    return pd.DatetimeIndex(monday + pd.to_timedelta(7 * (week - 1), unit="D"))


# ---------------------------------------------------------------- Rossmann store table
def _store_table(stores: int, start: pd.Timestamp, end: pd.Timestamp,
                 rng: np.random.Generator) -> pd.DataFrame:
    """store.csv with Kaggle's mix of types and its missing-value pattern."""
    sunday = np.zeros(stores, dtype=bool)
    sunday[rng.choice(stores, size=max(1, round(0.03 * stores)), replace=False)] = True
    store_type = rng.choice(np.array(["a", "c", "d"]), size=stores, p=[0.55, 0.13, 0.32])
    store_type[sunday] = "b"
    assortment = rng.choice(np.array(["a", "c"]), size=stores, p=[0.53, 0.47])
    assortment[sunday & (rng.random(stores) < 0.5)] = "b"

    distance = np.round(np.exp(rng.normal(np.log(2300.0), 1.2, stores)).clip(20, 75_000), -1)
    distance[rng.choice(stores, size=max(1, round(0.003 * stores)), replace=False)] = np.nan
    known_since = ~np.isnan(distance) & (rng.random(stores) > 0.3)
    opens_inside = rng.random(stores) < 0.2      # a competitor arriving during the data
    first = start.year * 12 + start.month - 1
    last = end.year * 12 + end.month - 1
    months = np.where(opens_inside, rng.integers(first, last + 1, stores),
                      first - 1 - np.minimum(rng.geometric(1 / 60, stores), 25 * 12))
    comp_year = np.where(known_since, months // 12, np.nan)
    comp_month = np.where(known_since, months % 12 + 1, np.nan)

    promo2 = rng.random(stores) < 0.5
    p2_year = rng.integers(2009, end.year + 1, stores)
    p2_week = rng.integers(1, 51, stores)
    interval = rng.choice(len(PROMO_INTERVALS), size=stores, p=[0.59, 0.23, 0.18])
    return pd.DataFrame({
        "Store": np.arange(1, stores + 1, dtype=np.int64),
        "StoreType": store_type.astype(object),
        "Assortment": assortment.astype(object),
        "CompetitionDistance": distance,
        "CompetitionOpenSinceMonth": comp_month,
        "CompetitionOpenSinceYear": comp_year,
        "Promo2": promo2.astype(np.int64),
        "Promo2SinceWeek": np.where(promo2, p2_week, np.nan),
        "Promo2SinceYear": np.where(promo2, p2_year, np.nan),
        "PromoInterval": pd.Series(np.array(PROMO_INTERVALS, dtype=object)[interval]).where(
            promo2, np.nan),
    })


def _competition_effect(store: pd.DataFrame, dates: pd.DatetimeIndex) -> np.ndarray:
    """Negative log-sales effect of a competitor, stronger when close, ramping in after opening."""
    dist = store["CompetitionDistance"].to_numpy()
    year = store["CompetitionOpenSinceYear"].fillna(1900).to_numpy().astype(int)
    month = store["CompetitionOpenSinceMonth"].fillna(1).to_numpy().astype(int)
    opened = pd.to_datetime(pd.DataFrame({"year": year, "month": month, "day": 1}))
    open_t = (opened - dates[0]).dt.days.to_numpy()
    t = np.arange(len(dates))
    ramp = np.clip((t[None, :] - open_t[:, None] + 1) / 45.0, 0.0, 1.0)
    strength = np.where(np.isnan(dist), 0.0, 0.2 * np.exp(-np.nan_to_num(dist) / 3000.0))
    return -strength[:, None] * ramp


def _promo2_effect(store: pd.DataFrame, dates: pd.DatetimeIndex) -> np.ndarray:
    """Small uplift in the months a store's Promo2 round restarts, once Promo2 has begun."""
    on = store["Promo2"].to_numpy() == 1
    year = store["Promo2SinceYear"].fillna(2100).to_numpy().astype(int)
    week = store["Promo2SinceWeek"].fillna(1).to_numpy().astype(int)
    start_t = (_week_start(year, week) - dates[0]).days.to_numpy()
    month_sets = np.zeros((len(PROMO_INTERVALS) + 1, 13), dtype=bool)
    for j, first in enumerate((1, 2, 3)):
        month_sets[j, first::3] = True
    idx = store["PromoInterval"].map({v: j for j, v in enumerate(PROMO_INTERVALS)})
    idx = idx.fillna(len(PROMO_INTERVALS)).to_numpy().astype(int)
    t = np.arange(len(dates))
    in_month = month_sets[idx][:, dates.month.to_numpy()]
    return 0.06 * (on[:, None] & (t[None, :] >= start_t[:, None]) & in_month)


def _shift(a: np.ndarray, k: int) -> np.ndarray:
    """a[:, t + k] with False past the ends (k > 0 looks ahead)."""
    out = np.zeros_like(a)
    if k > 0:
        out[:, :-k] = a[:, k:]
    else:
        out[:, -k:] = a[:, :k]
    return out


def synth_rossmann(stores: int = 50, days: int = 730, seed: int = 0,
                   start: str = "2013-01-01") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Kaggle-schema (train, store, test) frames; test covers the 48 days after training.

    Log sales = store level (by type/assortment) + weekday + promo (~+25%) + school holiday
    + pre/post-holiday uplift + competition (distance, opening date) + Promo2 months
    + seasonality (December peak) + store trend + reopening bounce + noise. Stores close on
    Sundays (except a few), state holidays, random days and refurbishment blocks.
    """
    if stores < 1 or days < 1:
        raise DataError(f"synth_rossmann: stores and days must be >= 1 (got {stores}, {days})")
    rng = np.random.default_rng(seed)
    total = days + TEST_DAYS
    dates = pd.date_range(pd.Timestamp(start), periods=total, freq="D")
    store = _store_table(stores, dates[0], dates[days - 1], rng)
    state = rng.integers(0, _N_STATES, stores)
    dow = dates.dayofweek.to_numpy() + 1                       # 1 = Monday .. 7 = Sunday
    t = np.arange(total)

    holiday = _state_holidays(dates, rng)[state]               # (stores, total) codes
    school = _school_holidays(dates, rng)[state]
    promo = np.broadcast_to(_promo_days(dates, rng), (stores, total))

    sunday_store = (store["StoreType"] == "b").to_numpy()
    is_open = np.ones((stores, total), dtype=bool)
    is_open[:, dow == 7] = sunday_store[:, None]
    is_open &= (holiday == 0) | (rng.random((stores, total)) < 0.02)
    is_open &= rng.random((stores, total)) >= 0.004            # odd closed days
    refurb = rng.random(stores) < 0.1
    r_start = rng.integers(0, max(days - 30, 1), stores)
    r_len = rng.integers(3, 90, stores)
    closed_block = refurb[:, None] & (t[None, :] >= r_start[:, None]) & (
        t[None, :] < (r_start + r_len)[:, None])
    is_open &= ~closed_block
    since_reopen = np.where(refurb[:, None] & (t[None, :] >= (r_start + r_len)[:, None]),
                            t[None, :] - (r_start + r_len)[:, None], 10_000)

    type_eff = store["StoreType"].map({"a": 0.0, "b": 0.45, "c": 0.03, "d": 0.0}).to_numpy()
    assort_eff = store["Assortment"].map({"a": 0.0, "b": -0.1, "c": 0.1}).to_numpy()
    level = (np.log(5800.0) + type_eff + assort_eff - 0.08 * store["Promo2"].to_numpy()
             + rng.normal(0.0, 0.3, stores))
    weekday = np.array([0.13, 0.02, -0.01, 0.0, 0.05, -0.06, 0.1])[dow - 1]
    store_weekday = rng.normal(0.0, 0.03, (stores, 7))[:, dow - 1]
    promo_gain = 0.22 + rng.normal(0.0, 0.05, stores)
    trend = rng.normal(0.02, 0.04, stores)
    closed_holiday = holiday > 0
    log_sales = (level[:, None] + weekday[None, :] + store_weekday
                 + promo * promo_gain[:, None] + 0.03 * school
                 + 0.12 * _shift(closed_holiday, 1) + 0.05 * _shift(closed_holiday, 2)
                 + 0.06 * _shift(closed_holiday, -1)
                 + _seasonality(dates)[None, :] + trend[:, None] * (t[None, :] / 365.25)
                 + _competition_effect(store, dates) + _promo2_effect(store, dates)
                 + 0.25 * np.exp(-since_reopen / 7.0)
                 + rng.normal(0.0, 0.07, (stores, total)))
    sales = np.rint(np.exp(log_sales)).astype(np.int64) * is_open
    type_basket = store["StoreType"].map({"a": 0.0, "b": -0.35, "c": 0.0, "d": 0.15}).to_numpy()
    log_basket = (np.log(9.0) + type_basket + rng.normal(0.0, 0.1, stores))[:, None] + 0.1 * promo
    customers = np.rint(sales / np.exp(log_basket + rng.normal(0.0, 0.04, (stores, total))))
    customers = customers.astype(np.int64)

    def rows(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Kaggle row order over days [lo, hi): Date descending, Store ascending."""
        return a[:, lo:hi][:, ::-1].T.ravel()

    store_ids = np.arange(1, stores + 1, dtype=np.int64)
    day_str = dates.strftime("%Y-%m-%d").to_numpy().astype(object)
    full = np.broadcast_to(store_ids[:, None], (stores, total))
    dow_full = np.broadcast_to(dow[None, :], (stores, total)).astype(np.int64)
    date_full = np.broadcast_to(day_str[None, :], (stores, total))
    hol_str = _STATE_HOLIDAY_CODES[holiday].astype(object)

    def frame(lo: int, hi: int) -> dict[str, np.ndarray]:
        return {"Store": rows(full, lo, hi), "DayOfWeek": rows(dow_full, lo, hi),
                "Date": rows(date_full, lo, hi),
                "Open": rows(is_open.astype(np.int64), lo, hi),
                "Promo": rows(promo.astype(np.int64), lo, hi),
                "StateHoliday": rows(hol_str, lo, hi),
                "SchoolHoliday": rows(school.astype(np.int64), lo, hi)}

    train_cols = frame(0, days)
    train_cols["Sales"] = rows(sales, 0, days)
    train_cols["Customers"] = rows(customers, 0, days)
    train = pd.DataFrame(train_cols)[TRAIN_COLUMNS]

    test = pd.DataFrame(frame(days, total))
    test["Open"] = test["Open"].astype(np.float64)
    # As in Kaggle's test.csv: one store has Open missing on a few weekdays.
    odd = rng.integers(1, stores + 1)
    cand = np.flatnonzero((test["Store"] == odd).to_numpy() & (test["DayOfWeek"] < 7).to_numpy())
    test.loc[rng.choice(cand, size=min(11, len(cand)), replace=False), "Open"] = np.nan
    test.insert(0, "Id", np.arange(1, len(test) + 1, dtype=np.int64))
    return train, store[STORE_COLUMNS], test[TEST_COLUMNS]


def write_rossmann(out_dir: str | Path, stores: int = 50, days: int = 730,
                   seed: int = 0) -> dict[str, Path]:
    """Write train.csv, store.csv and test.csv (Kaggle quoting) atomically into ``out_dir``."""
    out = Path(out_dir)
    train, store, test = synth_rossmann(stores=stores, days=days, seed=seed)
    return {
        "train.csv": _write_kaggle_csv(train, out / "train.csv", {"StateHoliday", "SchoolHoliday"}),
        "store.csv": _write_kaggle_csv(store, out / "store.csv",
                                       {"StoreType", "Assortment", "PromoInterval"}),
        "test.csv": _write_kaggle_csv(test, out / "test.csv", {"StateHoliday", "SchoolHoliday"}),
    }
