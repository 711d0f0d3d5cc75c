"""Event calendars in the generic feature steps (modeling.features.calendar, ElapsedEvents): a
row's event features come from the calendar and its own flags, never from its batch neighbours;
known future events are laid over the calendar; the fallback beyond the horizon; bad calendars."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from modeling.errors import DataError
from modeling.features import ElapsedEvents, FeaturePipeline, calendar_table, read_calendar_file
from modeling.features.calendar import OBSERVED

OUT = ["Aftere1", "Beforee1", "e1_bw", "e1_fw", "Aftere2", "Beforee2", "e2_bw", "e2_fw"]


def _series(seed: int = 0, groups: int = 5, days: int = 160) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    day = pd.date_range("2014-01-01", periods=days, freq="D")
    frames = []
    for g in range(groups):
        keep = np.ones(days, dtype=bool)
        if g % 2:  # gaps in some groups
            keep[40:70] = False
        frames.append(pd.DataFrame({"g": g + 1, "Date": day[keep],
                                    "e1": (rng.random(keep.sum()) < 0.1).astype(int),
                                    "e2": np.where(rng.random(keep.sum()) < 0.25, "x", "0")}))
    return pd.concat(frames, ignore_index=True)


def _split(df: pd.DataFrame, days: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    cut = df["Date"].max() - pd.Timedelta(days=days)
    return df[df["Date"] <= cut], df[df["Date"] > cut]


def _one_by_one(step: ElapsedEvents, rows: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([step.transform(rows.iloc[[i]]) for i in range(len(rows))])


@pytest.mark.parametrize("repeat", [None, {"e1": 14}])
def test_a_rows_features_do_not_depend_on_its_batch(repeat) -> None:
    """Alone, in a random subset, in the whole batch, shuffled: the same features, with and
    without known future events, and with either fallback beyond the horizon."""
    fit_rows, later = _split(_series())
    step = ElapsedEvents("g", "Date", ["e1", "e2"], window=5, cap=40, repeat=repeat).fit(fit_rows)
    assert step.describe().group_columns == () and step.describe().key_columns == ("g", "Date")
    for s in (step, step.with_calendar(later.iloc[: len(later) // 2])):
        whole = s.transform(later)
        pd.testing.assert_frame_equal(_one_by_one(s, later), whole)
        subset = later.sample(50, random_state=1)
        pd.testing.assert_frame_equal(s.transform(subset), whole.loc[subset.index])
        shuffled = later.sample(frac=1, random_state=2)
        pd.testing.assert_frame_equal(s.transform(shuffled).loc[later.index], whole)


def test_training_rows_are_their_own_calendar() -> None:
    """fit_transform = one pass over the series; serving the fitted rows (any subset, alone) with the
    fitted step gives the same values: no training/serving skew."""
    df = _series(3)
    full = ElapsedEvents("g", "Date", ["e1", "e2"], window=7, cap=60).fit_transform(df)
    step = ElapsedEvents("g", "Date", ["e1", "e2"], window=7, cap=60).fit(df)
    pick = df.sample(40, random_state=0)
    pd.testing.assert_frame_equal(_one_by_one(step, pick)[OUT], full.loc[pick.index, OUT])
    # independent check of one row against a direct computation over its group's days
    row = df[(df["g"] == 2)].iloc[100]
    days = df[(df["g"] == 2) & (df["e1"] == 1)]["Date"]
    before = (days[days >= row["Date"]].min() - row["Date"]).days if (days >= row["Date"]).any() else 60
    after = (row["Date"] - days[days <= row["Date"]].max()).days if (days <= row["Date"]).any() else 60
    got = full.loc[row.name]
    assert (got["Beforee1"], got["Aftere1"]) == (min(before, 60), min(after, 60))
    assert got["e1_fw"] == ((days >= row["Date"]) & (days <= row["Date"] + pd.Timedelta(days=6))).sum()


def _hand() -> tuple[ElapsedEvents, pd.DataFrame]:
    """One group, days 2015-01-01..01-28, events on the 5th and the 19th (every 14 days)."""
    day = pd.date_range("2015-01-01", "2015-01-28")
    df = pd.DataFrame({"g": 1, "Date": day, "p": day.day.isin([5, 19]).astype(int)})
    return ElapsedEvents("g", "Date", ["p"], window=7, cap=30).fit(df), df


def _row(date: str, p: int, g: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"g": [g], "Date": [pd.Timestamp(date)], "p": [p]})


def test_a_records_own_flags_count_for_its_own_date_only() -> None:
    step, _ = _hand()
    # the calendar says the 19th is an event day; a record for the 19th saying no event
    no = step.transform(_row("2015-01-19", 0)).iloc[0]
    assert (no["Afterp"], no["Beforep"], no["p_bw"], no["p_fw"]) == (14, 30, 0, 0)
    yes = step.transform(_row("2015-01-19", 1)).iloc[0]
    assert (yes["Afterp"], yes["Beforep"], yes["p_bw"], yes["p_fw"]) == (0, 0, 1, 1)
    # a record's own event on the 20th is not an event for its neighbour on the 21st
    both = step.transform(pd.concat([_row("2015-01-20", 1), _row("2015-01-21", 0)], ignore_index=True))
    assert both["Afterp"].tolist() == [0, 2] and both["p_bw"].tolist() == [2, 1]


def test_beyond_the_horizon_cap_or_repeat() -> None:
    step, df = _hand()
    later = pd.concat([_row(d, 0) for d in ("2015-01-29", "2015-02-01", "2015-02-10")], ignore_index=True)
    capped = step.transform(later)
    assert capped["Beforep"].tolist() == [30, 30, 30] and capped["p_fw"].tolist() == [0, 0, 0]
    assert capped["Afterp"].tolist() == [10, 13, 22]  # since the 19th, the last known event
    repeat = ElapsedEvents("g", "Date", ["p"], window=7, cap=30, repeat={"p": 14}).fit(df)
    # the 19th (the last 14 days before the horizon, the 28th) repeats: Feb 2, Feb 16, ...
    got = repeat.transform(later)
    assert got["Beforep"].tolist() == [4, 1, 6] and got["Afterp"].tolist() == [10, 13, 8]
    assert got["p_fw"].tolist() == [1, 1, 1]
    # inside the horizon only the days after the last known event see the repeat (Feb 2 ahead)
    pd.testing.assert_frame_equal(repeat.transform(df).head(19), step.transform(df).head(19))
    assert repeat.transform(df)["Beforep"].tolist()[19:] == list(range(13, 4, -1))
    # the repeat reaches 2 * cap + window days beyond the horizon
    # (to Apr 5: Feb 2, Feb 16, Mar 2, Mar 16, Mar 30): exact a cap past the horizon, then capped
    month = repeat.transform(pd.concat([_row("2015-02-27", 0), _row("2015-05-11", 0)], ignore_index=True))
    assert month["Afterp"].tolist() == [11, 30] and month["Beforep"].tolist() == [3, 30]
    # a group the calendar lacks has only its own row
    new = repeat.transform(_row("2015-01-10", 1, g=9)).iloc[0]
    assert (new["Afterp"], new["Beforep"], new["p_bw"], new["p_fw"]) == (0, 0, 1, 1)


def test_with_calendar_lays_future_events_over_and_leaves_the_step_alone() -> None:
    step, df = _hand()
    feb = pd.DataFrame({"g": 1, "Date": pd.date_range("2015-01-29", "2015-02-10"), "p": 0})
    feb.loc[feb["Date"] == "2015-02-03", "p"] = 1
    known = step.with_calendar(feb)
    q = _row("2015-01-29", 0)
    assert known.transform(q)["Beforep"].item() == 5 and step.transform(q)["Beforep"].item() == 30
    cal = known.calendar
    assert cal is not None and len(cal) == 28 + 13 and cal[OBSERVED].tolist() == [1] * 28 + [0] * 13
    # a second calendar replaces future days, repeats observed ones, and may not contradict them
    moved = feb.assign(p=(feb["Date"] == "2015-02-05").astype(int))
    again = known.with_calendar(pd.concat([df.tail(3), moved], ignore_index=True))
    assert again.transform(q)["Beforep"].item() == 7
    with pytest.raises(DataError, match=r"(?s)my.csv: 1 event calendar problem.*column 'p': contradicts.*"
                                         r"line 2: g=1, Date=2015-01-19, p=0 \(observed: 1\)"):
        known.with_calendar(df.tail(10).assign(p=0), source="my.csv", row_label=lambda i: f"line {i + 2}")


def test_calendar_problems_name_the_column_and_rows() -> None:
    step, df = _hand()
    bad = pd.DataFrame({"g": [1, 1, 7, 1], "Date": pd.to_datetime(["2015-02-01", "2015-02-01", "2015-02-02",
                                                                    "2015-02-03"]), "p": [0, 1, 0, 3]})
    with pytest.raises(DataError) as info:
        step.with_calendar(bad, source="cal.parquet")
    msg = str(info.value)
    assert msg.startswith("cal.parquet: 3 event calendar problem(s): column 'g, Date'")
    assert "column 'g, Date': duplicate (group, date) rows on 2 row(s), e.g. row 1: g=1, Date=2015-02-01" in msg
    assert "column 'g': unknown g (not in the model's calendar) on 1 row(s), e.g. row 3: g=7" in msg
    assert "column 'p': not a 0/1 flag on 1 row(s), e.g. row 4" in msg
    assert {(d["record"], d["field"]) for d in info.value.details} >= {(0, "g, Date"), (2, "g"), (3, "p")}
    with pytest.raises(DataError, match="missing column"):
        step.with_calendar(bad.drop(columns="p"))
    with pytest.raises(RuntimeError, match="fit"):
        ElapsedEvents("g", "Date", ["p"]).with_calendar(bad)


def test_calendar_round_trips_and_old_bundles_need_a_retrain(tmp_path) -> None:
    step, df = _hand()
    repeat = ElapsedEvents("g", "Date", ["p"], window=7, cap=30, repeat={"p": 14}).fit(df)
    known = repeat.with_calendar(pd.DataFrame({"g": [1], "Date": [pd.Timestamp("2015-02-04")], "p": [1]}))
    pipe = FeaturePipeline([known])
    pipe.save(tmp_path / "feat")
    loaded = FeaturePipeline.load(tmp_path / "feat")
    pd.testing.assert_frame_equal(loaded.steps[0].calendar, known.calendar)
    again = FeaturePipeline.from_dict(json.loads(json.dumps(pipe.to_dict())))
    q = pd.concat([_row("2015-01-30", 0), _row("2015-02-20", 0)], ignore_index=True)
    for p in (loaded, again):
        pd.testing.assert_frame_equal(p.transform(q), pipe.transform(q))
    assert pipe.transform(q)["Beforep"].tolist() == [5, 12]  # Feb 4 known; Mar 4 = Feb 4 + 28
    assert loaded.calendar_info()[0]["future_rows"] == 1 and loaded.calendar_info()[0]["repeat"] == {"p": 14}
    with pytest.raises(DataError, match="retrain the model"):
        ElapsedEvents("g", "Date", ["p"]).set_tables({"history": df})
    with pytest.raises(ValueError, match="repeat"):
        ElapsedEvents("g", "Date", ["p"], repeat={"q": 14})


def test_calendar_table_and_file_reader(tmp_path) -> None:
    rows = pd.DataFrame({"g": [2, 1, 1], "Date": ["2015-01-02", "2015-01-03", "2015-01-03"],
                         "e": ["0", "a", "0"]})
    table = calendar_table(rows, "g", "Date", ["e"])
    assert table["g"].tolist() == [1, 2] and table["e"].tolist() == [1, 0]  # max over a key's rows
    assert str(table["Date"].dtype) == "datetime64[ns]" and table[OBSERVED].tolist() == [1, 1]
    path = tmp_path / "cal.csv"
    rows.assign(extra=1).to_csv(path, index=False)
    frame, label = read_calendar_file(path, ["g", "Date", "e"])
    assert list(frame.columns) == ["g", "Date", "e"] and frame["e"].tolist() == ["0", "a", "0"]
    assert label(0) == "line 2"
    rows.to_parquet(tmp_path / "cal.parquet")
    assert read_calendar_file(tmp_path / "cal.parquet", ["g", "e"])[1](0) == "row 1"
    with pytest.raises(DataError, match=r"lacks column\(s\) \['x'\]"):
        read_calendar_file(path, ["g", "x"])
    with pytest.raises(DataError, match="not found"):
        read_calendar_file(tmp_path / "nope.csv", ["g"])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_calendar_file(tmp_path / "bad.parquet", ["g"])
