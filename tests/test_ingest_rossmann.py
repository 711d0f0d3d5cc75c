"""Reading and validating the Kaggle Rossmann files and the external tables."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modeling.errors import DataError
from pipelines.ingest.external import STATE_CODES, read_external
from pipelines.ingest.rossmann import (
    check_stores,
    read_store,
    read_test,
    read_train,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rossmann"
needs_data = pytest.mark.skipif(not (DATA / "train.csv").exists(), reason="real data not present")

HEADER = '"Store","DayOfWeek","Date","Sales","Customers","Open","Promo","StateHoliday","SchoolHoliday"'
GOOD_ROWS = [
    '1,5,2015-07-31,5263,555,1,1,"0","1"',
    '2,5,2015-07-31,6064,625,1,1,"0","1"',
    '1,4,2015-07-30,5020,546,1,1,"0","1"',
    '2,4,2015-07-30,5567,650,1,1,"a","1"',
]
STORE_CSV = (
    '"Store","StoreType","Assortment","CompetitionDistance","CompetitionOpenSinceMonth",'
    '"CompetitionOpenSinceYear","Promo2","Promo2SinceWeek","Promo2SinceYear","PromoInterval"\n'
    '1,"c","a",1270,9,2008,0,,,""\n'
    '2,"a","a",570,11,2007,1,13,2010,"Jan,Apr,Jul,Oct"\n'
)


def _write(tmp_path: Path, rows: list[str], header: str = HEADER, name: str = "train.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# ---------------------------------------------------------------------------- happy paths


@needs_data
def test_real_train_head_types_and_values() -> None:
    df = read_train(DATA / "train.csv", nrows=2000)
    assert len(df) == 2000
    assert df["Date"].dtype == "datetime64[ns]" and df["Store"].dtype == np.int64
    assert df["StateHoliday"].map(type).eq(str).all()
    assert set(df["StateHoliday"]) <= {"0", "a", "b", "c"}
    assert df["SchoolHoliday"].dtype == np.int64  # quoted "1" in the file
    first = df.iloc[0]
    assert (first["Store"], first["Date"], first["Sales"]) == (1, pd.Timestamp("2015-07-31"), 5263)


@needs_data
def test_real_store_and_test_files() -> None:
    store = read_store(DATA / "store.csv")
    assert len(store) == 1115 and store["Store"].is_unique
    # PromoInterval is given exactly for the stores that run Promo2
    assert (store["PromoInterval"].notna() == (store["Promo2"] == 1)).all()
    test = read_test(DATA / "test.csv", nrows=5000)
    assert test["Open"].dtype == np.float64
    full = read_test(DATA / "test.csv")
    assert len(full) == 41088 and full["Open"].isna().sum() > 0
    check_stores(full, store, DATA / "test.csv")
    check_stores(read_train(DATA / "train.csv", nrows=2000), store, DATA / "train.csv")


def test_r_style_quoting_and_numeric_state_holiday(tmp_path: Path) -> None:
    rows = GOOD_ROWS[:2] + ['1,4,2015-07-30,5020,546,1,1,0,1', '2,4,2015-07-30,0,0,0,0,a,0']
    path = _write(tmp_path, rows)
    for nrows in (None, 4):  # pyarrow engine and C engine
        df = read_train(path, nrows=nrows)
        assert df["StateHoliday"].tolist() == ["0", "0", "0", "a"]
        assert df["SchoolHoliday"].tolist() == [1, 1, 1, 0]
    zeros = _write(tmp_path, ['1,5,2015-07-31,1,1,1,1,0,1'], name="zeros.csv")
    assert read_train(zeros)["StateHoliday"].tolist() == ["0"]  # inferred int -> "0"


def test_gzip_and_parquet_give_the_same_frame(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD_ROWS)
    expected = read_train(path)
    gz = tmp_path / "train.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    pd.testing.assert_frame_equal(read_train(gz), expected)
    pq = tmp_path / "train.parquet"
    pd.read_csv(path, dtype={"StateHoliday": str}).to_parquet(pq)
    pd.testing.assert_frame_equal(read_train(pq), expected)
    numeric = tmp_path / "numeric.parquet"  # StateHoliday stored as integers
    pd.read_csv(path).head(3).assign(StateHoliday=0).to_parquet(numeric)
    assert read_train(numeric)["StateHoliday"].tolist() == ["0", "0", "0"]


# ---------------------------------------------------------------------------- error messages


def _error(path: Path, reader=read_train) -> str:
    with pytest.raises(DataError) as info:
        reader(path)
    return str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "not found" in msg
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty.csv" in _error(empty) and "empty" in _error(empty)
    header_only = _write(tmp_path, [], name="header.csv")
    assert "no data rows" in _error(header_only) and "header.csv" in _error(header_only)


def test_misspelled_column_names_missing_and_found(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD_ROWS, header=HEADER.replace('"Sales"', '"Sale"'))
    msg = _error(path)
    assert "train.csv" in msg and "'Sales'" in msg and "did you mean 'Sale'" in msg
    assert "found columns: Store, DayOfWeek, Date, Sale" in msg


def test_unparseable_date_names_line_and_value(tmp_path: Path) -> None:
    rows = GOOD_ROWS[:2] + ['3,4,2015-13-45,5020,546,1,1,"0","1"']
    msg = _error(_write(tmp_path, rows))
    assert "train.csv" in msg and "column 'Date'" in msg and "date" in msg
    assert "line 4: '2015-13-45'" in msg


def test_bad_state_holiday_code(tmp_path: Path) -> None:
    rows = GOOD_ROWS + ['3,4,2015-07-30,5020,546,1,1,"x","1"']
    msg = _error(_write(tmp_path, rows))
    assert "column 'StateHoliday'" in msg and "isin" in msg and "line 6: 'x'" in msg


def test_negative_sales_and_non_integer(tmp_path: Path) -> None:
    rows = GOOD_ROWS + ['3,4,2015-07-30,-5,546,1,1,"0","1"']
    msg = _error(_write(tmp_path, rows))
    assert "column 'Sales'" in msg and "greater_than_or_equal_to(0)" in msg and "line 6: -5" in msg
    rows = GOOD_ROWS + ['3,4,2015-07-30,abc,546,1,1,"0","1"', '4,4,2015-07-30,1,1,7,1,"0","1"']
    msg = _error(_write(tmp_path, rows, name="t2.csv"))
    assert "t2.csv" in msg and "column 'Sales'" in msg and "an integer" in msg
    assert "line 6: 'abc'" in msg
    assert "column 'Open'" in msg and "line 7: 7" in msg  # every problem, in one error


def test_duplicate_store_date(tmp_path: Path) -> None:
    rows = GOOD_ROWS + ['2,4,2015-07-30,1,1,1,1,"0","1"']
    msg = _error(_write(tmp_path, rows))
    assert "columns 'Store', 'Date'" in msg and "unique" in msg
    assert "line 5: Store=2, Date=2015-07-30" in msg and "line 6: Store=2, Date=2015-07-30" in msg


def test_day_of_week_must_match_date(tmp_path: Path) -> None:
    rows = GOOD_ROWS + ['3,2,2015-07-30,1,1,1,1,"0","1"']  # a Thursday, DayOfWeek 4
    msg = _error(_write(tmp_path, rows))
    assert "DayOfWeek_matches_Date" in msg and "line 6: Date=2015-07-30, DayOfWeek=2" in msg


def test_store_missing_from_store_csv(tmp_path: Path) -> None:
    store_path = tmp_path / "store.csv"
    store_path.write_text(STORE_CSV)
    store = read_store(store_path)
    assert store["PromoInterval"].isna().tolist() == [True, False]
    rows = GOOD_ROWS + ['7,4,2015-07-30,1,1,1,1,"0","1"']
    path = _write(tmp_path, rows)
    with pytest.raises(DataError) as info:
        check_stores(read_train(path), store, path)
    msg = str(info.value)
    assert "train.csv" in msg and "column 'Store'" in msg and "present in store.csv" in msg
    assert "line 6: 7" in msg


def test_bad_store_values(tmp_path: Path) -> None:
    path = tmp_path / "store.csv"
    path.write_text(STORE_CSV.replace('2,"a","a"', '2,"e","a"').replace('"Jan,Apr', '"Jan,May'))
    msg = _error(path, read_store)
    assert "column 'StoreType'" in msg and "line 3: 'e'" in msg
    assert "column 'PromoInterval'" in msg and "'Jan,May,Jul,Oct'" in msg


# ---------------------------------------------------------------------------- external tables


@needs_data
def test_real_external_tables_cover_every_store_state_and_day() -> None:
    ext = read_external(DATA / "external")
    states = ext.store_states
    assert len(states) == 1115 and "HB,NI" in set(states["State"])
    days = pd.date_range("2013-01-01", "2015-09-17", freq="D")
    grid = pd.MultiIndex.from_product([sorted(states["State"].unique()), days])
    weather = ext.weather.set_index(["State", "Date"])
    assert grid.isin(weather.index).all()  # weather for every store state, every day
    assert {"max_temperature_c", "mean_humidity", "events", "cloud_cover"} <= set(weather.columns)
    assert weather["mean_temperature_c"].dtype == np.float64
    ni = ext.weather[ext.weather["State"] == "NI"].drop(columns="State").reset_index(drop=True)
    hbni = ext.weather[ext.weather["State"] == "HB,NI"].drop(columns="State")
    pd.testing.assert_frame_equal(hbni.reset_index(drop=True), ni)
    assert set(states["State"]) <= set(ext.trends_state["State"])
    de = ext.trends_de
    assert (de["week_end"] - de["week_start"]).dt.days.eq(6).all()
    assert de["week_start"].min() <= pd.Timestamp("2013-01-01")
    assert de["week_end"].max() >= pd.Timestamp("2015-09-17")


@needs_data
def test_fastai_combined_layout_reads_the_same(tmp_path: Path) -> None:
    src = DATA / "external"
    ext = read_external(src)
    (tmp_path / "store_states.csv").write_text((src / "store_states.csv").read_text())
    frames = []
    for path in sorted((src / "weather").glob("*.csv")):
        frames.append(pd.read_csv(path, sep=";").assign(file=path.stem))
    pd.concat(frames).to_csv(tmp_path / "weather.csv", index=False)
    pd.DataFrame({"StateName": list(STATE_CODES), "State": list(STATE_CODES.values())}).to_csv(
        tmp_path / "state_names.csv", index=False)
    trends = []
    for path in sorted((src / "googletrend").glob("*.csv")):
        t = pd.read_csv(path)
        trends.append(pd.DataFrame({"file": path.stem, "week": t.iloc[:, 0],
                                    "trend": t.iloc[:, 1]}))
    pd.concat(trends).to_csv(tmp_path / "googletrend.csv", index=False)
    combined = read_external(tmp_path)
    for name in ("weather", "trends_state"):
        a = getattr(ext, name).sort_values(["State", getattr(ext, name).columns[1]])
        b = getattr(combined, name).sort_values(["State", getattr(combined, name).columns[1]])
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True),
                                      check_like=True)
    pd.testing.assert_frame_equal(ext.trends_de, combined.trends_de)


def test_external_missing_tables_are_none_and_malformed_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "store_states.csv").write_text("Store,State\n1,BY\n2,\"HB,NI\"\n")
    ext = read_external(tmp_path)
    assert ext.weather is None and ext.trends_state is None and ext.trends_de is None
    assert ext.store_states["State"].tolist() == ["BY", "HB,NI"]
    (tmp_path / "weather").mkdir()
    (tmp_path / "weather" / "Bayern.csv").write_text(
        '"Date";"Max_TemperatureC";"Events"\n2013-01-01;7;"Rain"\n2013-01-0x;8;""\n')
    with pytest.raises(DataError, match=r"Bayern\.csv.*\n.*column 'Date'.*line 3: '2013-01-0x'"):
        read_external(tmp_path)
    (tmp_path / "weather" / "Bayern.csv").write_text(
        '"Date";"Max_TemperatureC";"Events"\n2013-01-01;7;"Rain"\n2013-01-02;NA;""\n')
    (tmp_path / "googletrend").mkdir()
    (tmp_path / "googletrend" / "Rossmann_DE_NI.csv").write_text(
        "Woche,x\n2012-12-02 - 2012-12-08,77\n2012-12-09 to 2012-12-15,70\n")
    with pytest.raises(DataError, match=r"Rossmann_DE_NI\.csv.*\n.*column 'week'.*line 3"):
        read_external(tmp_path)
    (tmp_path / "googletrend" / "Rossmann_DE_NI.csv").write_text(
        "Woche,x\n2012-12-02 - 2012-12-08,77\n")
    ext = read_external(tmp_path)
    assert ext.weather["max_temperature_c"].isna().tolist() == [False, True]
    assert ext.weather["events"].isna().tolist() == [False, True]
    # "HB,NI" takes NI's trend; there is no NI weather, so it has none
    assert set(ext.trends_state["State"]) == {"NI", "HB,NI"}
    assert set(ext.weather["State"]) == {"BY"}
    with pytest.raises(DataError, match="not found"):
        read_external(tmp_path / "missing")
