"""Generic feature steps (modeling.features): values against independent computations,
serialization, and the steps' self-description."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest

from modeling.errors import DataError
from modeling.features import (
    DATE_ATTRS,
    STEP_REGISTRY,
    Columns,
    DateParts,
    ElapsedEvents,
    FeaturePipeline,
    GroupAny,
    JoinTable,
    MonthInList,
    MonthsSince,
    WeeksSince,
    iso_week_monday,
)

CAP = 30


def _dates(*days: str) -> pd.Series:
    return pd.Series(pd.to_datetime(list(days)))


# ---------------------------------------------------------------------------- DateParts


def test_date_parts_match_python_calendar() -> None:
    days = ["2015-12-31", "2016-01-01", "2014-02-28", "2015-03-31", "2013-07-01", "2016-02-29"]
    df = pd.DataFrame({"Date": _dates(*days), "x": range(len(days))})
    out = DateParts("Date").transform(df)
    for i, text in enumerate(days):
        d = dt.date.fromisoformat(text)
        nxt = d + dt.timedelta(days=1)
        row = out.iloc[i]
        assert row["Year"] == d.year and row["Month"] == d.month and row["Day"] == d.day
        assert row["Week"] == d.isocalendar()[1]
        assert row["Dayofweek"] == d.weekday()
        assert row["Dayofyear"] == d.timetuple().tm_yday
        assert row["Is_month_end"] == int(nxt.month != d.month)
        assert row["Is_month_start"] == int(d.day == 1)
        assert row["Is_year_end"] == int(nxt.year != d.year)
        assert row["Is_year_start"] == int(d.month == 1 and d.day == 1)
        assert row["Is_quarter_end"] == int(nxt.month != d.month and d.month % 3 == 0)
        assert row["Is_quarter_start"] == int(d.day == 1 and d.month % 3 == 1)
        assert row["Elapsed"] == (d - dt.date(1970, 1, 1)).days
    assert "Date" in out.columns and "Date" in df.columns and "Year" not in df.columns


def test_date_parts_prefix_attrs_and_strings() -> None:
    df = pd.DataFrame({"SaleDate": ["2015-07-31", "2015-08-01"]})
    out = DateParts("SaleDate", attrs=["Year", "Dayofweek"]).transform(df)
    assert list(out.columns) == ["SaleDate", "SaleYear", "SaleDayofweek"]
    assert out["SaleDayofweek"].tolist() == [4, 5]
    out2 = DateParts("SaleDate", prefix="d_", attrs=["Month"]).transform(df)
    assert out2["d_Month"].tolist() == [7, 8]
    with pytest.raises(ValueError, match="unknown attrs"):
        DateParts("SaleDate", attrs=["Fortnight"])
    with pytest.raises(DataError, match="missing column"):
        DateParts("Other").transform(df)


# ---------------------------------------------------------------------------- JoinTable


def test_join_table_left_join_keeps_rows_order_and_index() -> None:
    table = pd.DataFrame({"Store": [1, 2, 3], "Type": ["a", "b", "c"], "Promo2": [0, 1, 1]})
    left = pd.DataFrame({"Store": [3, 9, 1, 3]}, index=[10, 11, 12, 13])
    out = JoinTable(table, on="Store").transform(left)
    assert list(out.index) == [10, 11, 12, 13]
    assert out["Type"].tolist()[0] == "c" and pd.isna(out["Type"].iloc[1])
    assert out["Type"].tolist()[2:] == ["a", "c"]
    # integer table columns come back as float so an unknown key does not change the dtype
    assert out["Promo2"].dtype == np.float64 and np.isnan(out["Promo2"].iloc[1])
    known = JoinTable(table, on="Store").transform(left.loc[[10, 12]])
    assert known["Promo2"].dtype == np.float64
    assert list(left.columns) == ["Store"]  # input untouched


def test_join_table_multi_key_dict_on_suffix_and_inner() -> None:
    table = pd.DataFrame({"st": ["BY", "BY", "NW"], "day": _dates("2015-01-01", "2015-01-02",
                                                                  "2015-01-01"),
                          "temp": [1.5, 2.5, 3.5], "x": [7, 8, 9]})
    left = pd.DataFrame({"State": ["NW", "BY", "BY", "HE"],
                         "Date": _dates("2015-01-01", "2015-01-02", "2015-01-03", "2015-01-01"),
                         "x": ["keep"] * 4})
    step = JoinTable(table, on={"State": "st", "Date": "day"}, suffix="_w")
    out = step.transform(left)
    assert out["temp"].tolist()[:2] == [3.5, 2.5] and out["temp"].isna().tolist()[2:] == [True] * 2
    assert out["x"].tolist() == ["keep"] * 4 and out["x_w"].tolist()[:2] == [9.0, 8.0]
    assert "st" not in out.columns and "day" not in out.columns
    inner = JoinTable(table, on={"State": "st", "Date": "day"}, columns=["temp"],
                      how="inner").transform(left)
    assert inner["State"].tolist() == ["NW", "BY"] and list(inner.index) == [0, 1]


def test_join_table_rejects_duplicate_keys_and_missing_columns() -> None:
    table = pd.DataFrame({"Store": [1, 1, 2], "v": [1, 2, 3]})
    with pytest.raises(DataError, match=r"not unique on \['Store'\].*'Store': 1"):
        JoinTable(table, on="Store")
    with pytest.raises(DataError, match="missing column"):
        JoinTable(table.drop_duplicates("Store"), on="Store").transform(pd.DataFrame({"x": [1]}))


# ---------------------------------------------------------------------------- durations


def test_months_since_clip_and_missing() -> None:
    df = pd.DataFrame({
        "y": [2014, 2014, 2010, np.nan, 2014, 2014],
        "m": [3, 3, 1, 5, 13, 3],
        "Date": _dates("2015-03-15", "2014-01-10", "2015-06-01", "2015-06-01", "2015-06-01",
                       "2014-03-01"),
    })
    out = MonthsSince("y", "m", "Date", "M", clip=(0, 24)).transform(df)
    # 12 months; not yet open -> 0; > 24 -> 24; missing or invalid month -> -1; same month -> 0
    assert out["M"].tolist() == [12, 0, 24, -1, -1, 0]
    assert out["M"].dtype == np.int64


def test_iso_week_monday_matches_python() -> None:
    pairs = [(y, w) for y in range(1998, 2031) for w in (1, 2, 10, 27, 52)]
    pairs += [(2015, 53), (2020, 53), (2009, 53)]
    years = np.array([p[0] for p in pairs])
    weeks = np.array([p[1] for p in pairs])
    got = iso_week_monday(years, weeks)
    expected = np.array([np.datetime64(dt.date.fromisocalendar(y, w, 1)) for y, w in pairs])
    np.testing.assert_array_equal(got, expected.astype("datetime64[D]"))


def test_weeks_since_clip_and_missing() -> None:
    start = dt.date.fromisocalendar(2013, 14, 1)  # Monday 2013-04-01
    days = [start, start + dt.timedelta(days=6), start + dt.timedelta(days=7),
            start - dt.timedelta(days=1), start + dt.timedelta(days=400), start]
    df = pd.DataFrame({"y": [2013] * 5 + [np.nan], "w": [14.0] * 6,
                       "Date": pd.to_datetime([d.isoformat() for d in days])})
    out = WeeksSince("y", "w", "Date", "W", clip=(0, 25)).transform(df)
    assert out["W"].tolist() == [0, 0, 1, 0, 25, -1]


def test_month_in_list_and_require() -> None:
    df = pd.DataFrame({
        "PI": ["Jan,Apr,Jul,Oct", "Jan,Apr,Jul,Oct", "Mar,Jun,Sept,Dec", np.nan, "Feb,May,Aug,Nov"],
        "on": [1, 1, 1, 1, 0],
        "Date": _dates("2015-04-03", "2015-05-03", "2015-09-30", "2015-01-01", "2015-05-02"),
    })
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sept", "Oct", "Nov", "Dec"]
    out = MonthInList("PI", "Date", "act", month_names=months, require=["on"]).transform(df)
    assert out["act"].tolist() == [1, 0, 1, 0, 0]


def test_group_any_learns_per_group_flag() -> None:
    fit_rows = pd.DataFrame({"g": [1, 1, 2, 2, 3], "Open": [0, 1, 1, 0, 1],
                             "dow": [6, 5, 6, 6, 5]})
    step = GroupAny("g", "Open", "OpenSun", where={"dow": 6}).fit(fit_rows)
    out = step.transform(pd.DataFrame({"g": [3, 2, 1, 99]}))
    assert out["OpenSun"].tolist() == [0, 1, 0, 0]  # store 99 unseen -> default 0
    with pytest.raises(RuntimeError, match="fit"):
        GroupAny("g", "Open", "x").transform(fit_rows)


# ---------------------------------------------------------------------------- ElapsedEvents


def _hand_frame() -> pd.DataFrame:
    """Group A: days 1..10 of Jan 2015, events on days 3 and 7. Group B: day 5 row missing,
    an event on day 5 is unknown; event on day 2 only."""
    day = pd.date_range("2015-01-01", periods=10, freq="D")
    a = pd.DataFrame({"g": "A", "Date": day, "ev": [0, 0, 1, 0, 0, 0, 1, 0, 0, 0]})
    b = pd.DataFrame({"g": "B", "Date": day, "ev": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]})
    return pd.concat([a, b.drop(index=4)], ignore_index=True)


def test_elapsed_events_hand_case() -> None:
    df = _hand_frame()
    out = ElapsedEvents("g", "Date", ["ev"], window=3, cap=CAP).fit_transform(df)
    a = out[out["g"] == "A"]
    assert a["Afterev"].tolist() == [CAP, CAP, 0, 1, 2, 3, 0, 1, 2, 3]
    assert a["Beforeev"].tolist() == [2, 1, 0, 3, 2, 1, 0, CAP, CAP, CAP]
    assert a["ev_bw"].tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 1, 0]  # events in [d-2, d]
    assert a["ev_fw"].tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 0, 0]  # events in [d, d+2]
    b = out[out["g"] == "B"]
    # calendar days, not rows: the missing day-5 row does not shift the distances
    assert b["Date"].dt.day.tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert b["Afterev"].tolist() == [CAP, 0, 1, 2, 4, 5, 6, 7, 8]
    assert b["Beforeev"].tolist() == [1, 0] + [CAP] * 7
    assert b["ev_bw"].tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0]


def test_elapsed_events_boolean_ish_and_caps() -> None:
    day = pd.date_range("2015-01-01", periods=400, freq="D")
    df = pd.DataFrame({"g": 1, "Date": day, "h": ["a"] + ["0"] * 398 + ["c"]})
    out = ElapsedEvents("g", "Date", ["h"], window=7, cap=365).fit_transform(df)
    assert out["Afterh"].iloc[0] == 0 and out["Afterh"].iloc[398] == 365  # 398 days, clipped
    assert out["Beforeh"].iloc[1] == 365 and out["Beforeh"].iloc[399] == 0
    assert out["Afterh"].max() == 365 and out["Afterh"].min() == 0


def test_elapsed_events_row_order_does_not_matter() -> None:
    df = _hand_frame()
    step = ElapsedEvents("g", "Date", ["ev"], window=3, cap=CAP).fit(df)
    shuffled = df.sample(frac=1, random_state=3)
    a = step.transform(df)
    b = step.transform(shuffled).loc[df.index]
    pd.testing.assert_frame_equal(a, b)


def _random_series(seed: int, groups: int = 6, days: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for g in range(groups):
        day = pd.date_range("2014-01-01", periods=days, freq="D")
        keep = np.ones(days, dtype=bool)
        if g % 3 == 0:  # a gap of 30 days in some groups
            keep[50:80] = False
        frames.append(pd.DataFrame({
            "g": g + 1, "Date": day[keep],
            "e1": (rng.random(keep.sum()) < 0.08).astype(int),
            "e2": np.where(rng.random(keep.sum()) < 0.2, "x", "0"),
        }))
    return pd.concat(frames, ignore_index=True)


def test_elapsed_events_predict_time_equals_one_pass() -> None:
    """Fit on the first part, lay the last 42 days over the calendar as known events, transform
    them as a shuffled batch: the 'since' features equal one pass over everything; 'until' ones
    wherever the next event is in the calendar, and the cap otherwise (no repeat)."""
    df = _random_series(0)
    cut = df["Date"].max() - pd.Timedelta(days=42)
    cap, w = 60, 7
    full = ElapsedEvents("g", "Date", ["e1", "e2"], window=w, cap=cap).fit_transform(df)
    step = ElapsedEvents("g", "Date", ["e1", "e2"], window=w, cap=cap).fit(df[df["Date"] <= cut])
    batch = df[df["Date"] > cut].sample(frac=1, random_state=1)
    got = step.with_calendar(batch).transform(batch).loc[df.index[df["Date"] > cut]]
    ref = full.loc[got.index]
    end = batch["Date"].max()
    for e in ("e1", "e2"):
        np.testing.assert_array_equal(got[f"After{e}"], ref[f"After{e}"])
        np.testing.assert_array_equal(got[f"{e}_bw"], ref[f"{e}_bw"])
        next_in_batch = (ref[f"Before{e}"] < cap) & (
            ref["Date"] + pd.to_timedelta(ref[f"Before{e}"], unit="D") <= end)
        assert next_in_batch.mean() > 0.5
        np.testing.assert_array_equal(got.loc[next_in_batch, f"Before{e}"],
                                      ref.loc[next_in_batch, f"Before{e}"])
        assert (got.loc[~next_in_batch, f"Before{e}"] == cap).all()
        window_inside = ref["Date"] + pd.Timedelta(days=w - 1) <= end
        np.testing.assert_array_equal(got.loc[window_inside, f"{e}_fw"],
                                      ref.loc[window_inside, f"{e}_fw"])
    # the history must actually matter: some 'since' values reach back before the batch
    assert (got["Aftere1"] > (got["Date"] - cut).dt.days).any()


def test_elapsed_events_requires_fit_and_dates() -> None:
    df = _hand_frame()
    with pytest.raises(RuntimeError, match="fit"):
        ElapsedEvents("g", "Date", ["ev"]).transform(df)
    bad = df.assign(Date=df["Date"].where(df.index != 2))
    with pytest.raises(DataError, match=r"row position\(s\) \[2\]"):
        ElapsedEvents("g", "Date", ["ev"]).fit(bad)


# ---------------------------------------------------------------------------- pipeline


def _pipeline() -> tuple[FeaturePipeline, pd.DataFrame]:
    df = _random_series(5, groups=4, days=120)
    table = pd.DataFrame({"g": [1, 2, 3, 4], "kind": ["a", np.nan, "c", "a"],
                          "dist": [10.0, np.nan, 3.0, 7.0], "since_y": [2013, np.nan, 2013, 2012],
                          "since_m": [5, np.nan, 11, 2], "opened": _dates(
                              "2013-01-01", "2013-02-01", "2013-03-01", "2012-12-31")})
    pipe = FeaturePipeline([
        DateParts("Date"),
        JoinTable(table, on="g", label="groups"),
        MonthsSince("since_y", "since_m", "Date", "months_open"),
        WeeksSince("since_y", "since_m", "Date", "weeks_open"),
        GroupAny("g", "e1", "any_e1", where={"Dayofweek": 6}),
        MonthInList("kind", "Date", "mil"),
        ElapsedEvents("g", "Date", ["e1", "e2"], window=7),
    ], meta={"note": "test"})
    return pipe, df


def test_pipeline_dict_round_trip_through_json() -> None:
    pipe, df = _pipeline()
    train, later = df[df["Date"] < "2014-04-01"], df[df["Date"] >= "2014-04-01"]
    pipe.fit(train)
    doc = json.loads(json.dumps(pipe.to_dict()))
    again = FeaturePipeline.from_dict(doc)
    assert again.meta == {"note": "test"}
    pd.testing.assert_frame_equal(pipe.transform(later), again.transform(later))


def test_pipeline_save_load_round_trip(tmp_path) -> None:
    pipe, df = _pipeline()
    train, later = df[df["Date"] < "2014-04-01"], df[df["Date"] >= "2014-04-01"]
    expected_fit = pipe.fit_transform(train)
    pipe.save(tmp_path / "feat")
    files = sorted(p.name for p in (tmp_path / "feat" / "tables").iterdir())
    assert files == ["01_join_table_table.parquet", "04_group_any_table.parquet",
                     "06_elapsed_events_calendar.parquet"]
    doc = json.loads((tmp_path / "feat" / "features.json").read_text())
    assert [s["name"] for s in doc["steps"]][0] == "date_parts"
    loaded = FeaturePipeline.load(tmp_path / "feat")
    pd.testing.assert_frame_equal(pipe.transform(later), loaded.transform(later))
    pd.testing.assert_frame_equal(loaded.transform(train), expected_fit)
    for a, b in zip(pipe.steps, loaded.steps, strict=True):
        for name, table in a.tables().items():
            pd.testing.assert_frame_equal(table, b.tables()[name])


def test_registry_and_unknown_step() -> None:
    assert {"date_parts", "join_table", "elapsed_events", "months_since", "weeks_since",
            "group_any", "month_in_list"} <= set(STEP_REGISTRY)
    with pytest.raises(ValueError, match="unknown feature step"):
        FeaturePipeline.from_dict({"format": "tabrec.features", "version": 1,
                                   "steps": [{"name": "pickle_me", "params": {}}]})
    with pytest.raises(DataError, match="features.json"):
        FeaturePipeline.load("/nonexistent/dir")


# ---------------------------------------------------------------------------- self-description


def test_date_parts_declare_the_calendar_relative_parts() -> None:
    info = DateParts("SaleDate").describe()
    assert info.outputs == tuple("Sale" + a for a in DATE_ATTRS) and info.date_columns == ("SaleDate",)
    assert info.group_columns == ()
    # the parts that place a row in the year or in time; Dayofweek and the Is_* flags are not
    assert set(info.time_relative) == {f"Sale{a}" for a in ["Year", "Month", "Week", "Day", "Dayofyear",
                                                            "Elapsed"]}
    assert set(info.time_relative.values()) == {"calendar part of the date"}
    assert DateParts("Date", attrs=["Dayofweek", "Is_month_end"]).describe().time_relative == {}


def test_a_join_on_a_date_key_is_time_relative_and_a_join_on_store_is_not() -> None:
    store = pd.DataFrame({"Store": [1, 2], "Kind": ["a", "b"], "Dist": [1.0, 2.0]})
    weather = pd.DataFrame({"State": ["BY", "BY"], "Date": _dates("2015-01-01", "2015-01-02"),
                            "temp": [1.5, 2.5]})
    by_store = JoinTable(store, on="Store", label="store")
    by_day = JoinTable(weather, on=["State", "Date"], label="weather", suffix="_w")
    assert by_store.describe().time_relative == {} and by_store.describe(["Date"]).time_relative == {}
    assert by_store.describe().outputs == ("Kind", "Dist") and by_store.describe().date_columns == ()
    # a datetime key column in the table is a date key on its own
    reason = "joined on the date ('weather' table)"
    assert by_day.describe().time_relative == {"temp": reason, "temp_w": reason}
    assert by_day.describe().date_columns == ("Date",)
    # a key held as text is a date key when another step of the pipeline reads it as a date
    text_days = JoinTable(weather.assign(Date=["2015-01-01", "2015-01-02"]), on=["State", "Date"],
                          label="weather")
    assert text_days.describe().time_relative == {}
    assert text_days.describe(["Date"]).time_relative == {"temp": reason, "temp_right": reason}
    pipe = FeaturePipeline([DateParts("Date", attrs=["Year"]), text_days, by_store])
    assert pipe.time_relative_columns() == {"Year": "calendar part of the date", "temp": reason,
                                            "temp_right": reason}
    assert pipe.date_columns() == ["Date"] and pipe.group_columns() == [] and pipe.key_columns() == []


def test_pipeline_describes_groups_dates_keys_and_time_relative_columns() -> None:
    pipe, df = _pipeline()
    assert pipe.group_columns() == []  # ElapsedEvents reads its calendar, not the batch's other rows
    assert pipe.date_columns() == ["Date"]
    assert pipe.key_columns() == ["g", "Date"]
    events = {f"{p}{e}" for e in ("e1", "e2") for p in ("After", "Before")} | {
        f"{e}_{s}" for e in ("e1", "e2") for s in ("bw", "fw")}
    relative = pipe.time_relative_columns()
    assert set(relative) == {"Year", "Month", "Week", "Day", "Dayofyear", "Elapsed", "months_open",
                             "weeks_open", "mil"} | events
    assert relative["months_open"] == relative["weeks_open"] == "duration up to the row's date"
    assert relative["mil"] == "flag of the date's month"
    assert relative["Beforee1"].startswith("event distance/window")
    # what a step declares is what it adds: run the steps one by one and compare
    current = df
    for step, info in zip(pipe.steps, pipe.describe(), strict=True):
        added = [c for c in step.fit(current).transform(current).columns if c not in current.columns]
        assert tuple(added) == info.outputs, step.name
        assert set(info.time_relative) <= set(info.outputs) | {c + "_right" for c in info.outputs}
        current = step.transform(current)
    # loading a saved pipeline keeps its self-description (it is derived from the parameters)
    again = FeaturePipeline.from_dict(json.loads(json.dumps(pipe.fit(df).to_dict())))
    assert again.describe() == pipe.describe()


def test_every_registered_step_describes_itself() -> None:
    pipe, _ = _pipeline()
    steps = {s.name: s for s in pipe.steps}
    assert set(steps) == set(STEP_REGISTRY)
    for name, step in steps.items():
        info = step.describe()
        assert info.outputs, name
        assert not step.drops_rows
    inner = JoinTable(pd.DataFrame({"g": [1], "v": [2]}), on="g", how="inner")
    assert inner.drops_rows
    view = Columns(pd.DataFrame({"g": [1, 3]}))
    with pytest.raises(NotImplementedError, match="drops rows"):
        inner.new_columns(view)
    assert FeaturePipeline([inner]).transform(pd.DataFrame({"g": [1, 3]}))["v"].tolist() == [2.0]
