"""Rossmann feature pipeline: predict-time features equal training-time features (no skew)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modeling.errors import DataError
from modeling.transforms import FeaturePipeline
from pipelines.features.rossmann import (
    EVENT_CAP,
    EVENT_WINDOW,
    EVENTS,
    build_feature_pipeline,
    engineer_training,
    feature_columns,
    features_for_request,
    input_schema,
    log_target,
    split_by_days,
    training_rows,
)
from pipelines.ingest.rossmann import read_external, read_store, read_test, read_train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rossmann"
needs_data = pytest.mark.skipif(not (DATA / "train.csv").exists(), reason="real data not present")

DATE_COLS = ["Year", "Month", "Week", "Day", "Dayofweek", "Dayofyear", "Elapsed"]
STORE_COLS = ["StoreType", "Assortment", "CompetitionDistance", "PromoInterval",
              "CompetitionOpenSinceYear", "Promo2SinceYear", "Promo2"]
DERIVED = ["CompetitionMonthsOpen", "Promo2Weeks", "Promo2Active"]
SINCE = [f"After{e}" for e in EVENTS] + [f"{e}_bw" for e in EVENTS]


@pytest.fixture(scope="module")
def real() -> dict:
    train = read_train(DATA / "train.csv")
    return {"train": train, "store": read_store(DATA / "store.csv"),
            "external": read_external(DATA / "external")}


def _gap_stores(train: pd.DataFrame) -> list[int]:
    """Stores with no rows in 2014-07-01..2014-12-31 (the gap in the Kaggle data)."""
    in_gap = train.loc[train["Date"].between("2014-07-01", "2014-12-31"), "Store"].unique()
    return sorted(set(train["Store"]) - set(in_gap))


def _as_request(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Raw Kaggle-schema request rows: no target, no DayOfWeek, shuffled, Id = source index."""
    req = rows.drop(columns=["Sales", "Customers", "DayOfWeek"]).assign(Id=rows.index)
    return req.sample(frac=1, random_state=seed)


@needs_data
def test_request_features_equal_training_features(real: dict) -> None:
    """THE KEY TEST: fit on all but the last 6 weeks, then engineer those weeks as a shuffled
    request batch; the result must equal one fit_transform over the whole series."""
    train = real["train"]
    gap = _gap_stores(train)
    assert len(gap) == 180
    stores = sorted(set(range(1, 41)) | set(gap[:10]))
    sub = train[train["Store"].isin(stores)]
    cut = sub["Date"].max() - pd.Timedelta(days=42)
    full = build_feature_pipeline(real["store"], real["external"]).fit_transform(sub)
    pipe = build_feature_pipeline(real["store"], real["external"]).fit(sub[sub["Date"] <= cut])
    later = sub[sub["Date"] > cut]
    got = features_for_request(pipe, _as_request(later, seed=7)).set_index("Id").loc[later.index]
    ref = full.loc[later.index]
    cats, conts = pipe.meta["cat_cols"], pipe.meta["cont_cols"]
    assert "State" in cats and "trend_DE" in conts and "max_temperature_c" in conts
    exact = DATE_COLS + STORE_COLS + DERIVED + SINCE + ["DayOfWeek", "State", "events",
                                                        "max_temperature_c", "trend", "trend_DE"]
    pd.testing.assert_frame_equal(got[exact], ref[exact], check_names=False)
    end = later["Date"].max()
    for e in EVENTS:
        before = ref[f"Before{e}"]
        in_batch = (before < EVENT_CAP) & (ref["Date"] + pd.to_timedelta(before, "D") <= end)
        assert in_batch.any() or e == "StateHoliday"  # no state holiday in these six weeks
        np.testing.assert_array_equal(got.loc[in_batch, f"Before{e}"], before[in_batch])
        assert (got.loc[~in_batch, f"Before{e}"] == EVENT_CAP).all()  # documented cap
        inside = ref["Date"] + pd.Timedelta(days=EVENT_WINDOW - 1) <= end
        np.testing.assert_array_equal(got.loc[inside, f"{e}_fw"], ref.loc[inside, f"{e}_fw"])
    # history matters: promo/holiday distances reach back before the batch for some rows
    assert (got["AfterStateHoliday"] > (got["Date"] - cut).dt.days).any()


@needs_data
def test_full_train_rows_split_and_test_features(real: dict, tmp_path: Path) -> None:
    pipe, feats = engineer_training(real["train"], real["store"], real["external"])
    assert len(feats) == len(real["train"])
    rows = training_rows(feats)
    assert len(rows) == 844_338 and (rows["Open"] == 1).all()
    fit_part, valid = split_by_days(rows, 42)
    assert (len(fit_part), len(valid)) == (804_056, 40_282)
    assert valid["Date"].min() == pd.Timestamp("2015-06-20")
    y = log_target(valid)
    assert y.dtype == np.float32 and np.allclose(np.exp(y), valid["Sales"], rtol=1e-5)
    cats, conts = feature_columns(external=True)
    assert set(cats + conts) <= set(feats.columns)
    # a store that was open on some Sunday in train.csv
    sunday_open = real["train"].query("DayOfWeek == 7 and Open == 1")["Store"].unique()
    assert set(feats.loc[feats["OpensSundays"] == 1, "Store"]) == set(sunday_open)
    test = read_test(DATA / "test.csv")
    got = features_for_request(pipe, test)
    assert got[["State", "max_temperature_c", "trend", "trend_DE", "StoreType"]].notna().all().all()
    pipe.save(tmp_path / "features")
    again = features_for_request(FeaturePipeline.load(tmp_path / "features"), test)
    pd.testing.assert_frame_equal(got, again)


def _tiny() -> tuple[pd.DataFrame, pd.DataFrame]:
    store = pd.DataFrame({
        "Store": [1, 2], "StoreType": ["a", "c"], "Assortment": ["a", "c"],
        "CompetitionDistance": [100.0, np.nan], "CompetitionOpenSinceMonth": [3.0, np.nan],
        "CompetitionOpenSinceYear": [2014.0, np.nan], "Promo2": [1, 0],
        "Promo2SinceWeek": [50.0, np.nan], "Promo2SinceYear": [2014.0, np.nan],
        "PromoInterval": ["Jan,Apr,Jul,Oct", np.nan],
    })
    days = pd.date_range("2015-01-01", "2015-03-31", freq="D")
    train = pd.concat([pd.DataFrame({
        "Store": s, "DayOfWeek": days.dayofweek + 1, "Date": days,
        "Sales": np.where(days.dayofweek == 6, 0, 5000 + s), "Customers": 500,
        "Open": (days.dayofweek != 6).astype(int), "Promo": (days.day < 8).astype(int),
        "StateHoliday": np.where(days.day == 15, "a", "0"),
        "SchoolHoliday": (days.month == 2).astype(int)}) for s in (1, 2)], ignore_index=True)
    return train, store


def test_pipeline_without_external_has_all_columns() -> None:
    train, store = _tiny()
    pipe, feats = engineer_training(train, store)
    cats, conts = feature_columns(external=False)
    assert pipe.meta["cat_cols"] == cats and pipe.meta["cont_cols"] == conts
    assert set(cats + conts) <= set(feats.columns)
    assert "State" not in feats.columns
    row = feats[(feats["Store"] == 1) & (feats["Date"] == "2015-01-20")].iloc[0]
    promo2_start = pd.Timestamp(dt.date.fromisocalendar(2014, 50, 1))
    assert row["CompetitionMonthsOpen"] == 10  # 2014-03 -> 2015-01
    assert row["Promo2Weeks"] == (row["Date"] - promo2_start).days // 7 == 6
    assert row["Promo2Active"] == 1 and row["AfterStateHoliday"] == 5
    assert row["BeforeStateHoliday"] == 26  # next holiday 2015-02-15
    other = feats[(feats["Store"] == 2) & (feats["Date"] == "2015-02-20")].iloc[0]
    assert other["CompetitionMonthsOpen"] == -1 and other["Promo2Active"] == 0
    assert len(training_rows(feats)) == int(((train["Open"] == 1) & (train["Sales"] > 0)).sum())


def test_request_validation_names_record_and_field() -> None:
    train, store = _tiny()
    pipe, _ = engineer_training(train, store)
    good = {"Store": 1, "Date": "2015-04-02", "Open": 1, "Promo": 1, "StateHoliday": 0,
            "SchoolHoliday": "0"}
    out = features_for_request(pipe, [good, {**good, "Store": 2, "StateHoliday": "a"}])
    assert out["DayOfWeek"].tolist() == [4, 4] and out["StateHoliday"].tolist() == ["0", "a"]
    assert list(out.index) == [0, 1]
    bad = [good, {**good, "Store": 2, "StateHoliday": "z"}, {**good, "Store": 3, "Date": "soon"}]
    with pytest.raises(DataError) as info:
        features_for_request(pipe, bad)
    msg, details = str(info.value), info.value.details
    assert "record 1: 'z'" in msg and "column 'StateHoliday'" in msg and "record 2" in msg
    assert {(d["record"], d["field"]) for d in details} == {(1, "StateHoliday"), (2, "Date")}
    with pytest.raises(DataError) as info:
        features_for_request(pipe, [{k: v for k, v in good.items() if k != "Promo"}])
    assert info.value.details == [{"record": None, "field": "Promo", "msg": "field required"}]
    with pytest.raises(DataError, match="DayOfWeek_matches_Date"):
        features_for_request(pipe, [{**good, "DayOfWeek": 1}])
    with pytest.raises(DataError, match="no records"):
        features_for_request(pipe, [])


def test_serving_schema_path_gives_the_same_features() -> None:
    """The bundle's InputSchema (modeling.schema) + pipeline.transform = features_for_request."""
    train, store = _tiny()
    pipe, _ = engineer_training(train, store)
    records = pd.DataFrame({"Store": ["1", "2", "2"], "Date": ["2015-04-01", "2015-04-01",
                                                                "2015-04-05"],
                            "Open": [1, None, 0], "Promo": [1, 1, 0],
                            "StateHoliday": [0, "a", "0"], "SchoolHoliday": [0, 0, 1]})
    cats, conts = pipe.meta["cat_cols"], pipe.meta["cont_cols"]
    via_schema = pipe.transform(input_schema().validate(records))
    via_pandera = features_for_request(pipe, records)
    pd.testing.assert_frame_equal(via_schema[cats + conts], via_pandera[cats + conts])


def test_trend_columns_are_opt_in_model_inputs() -> None:
    from pipelines.train_rossmann import RossmannConfig

    cats, conts = feature_columns(external=True, trends=False)
    with_trends = feature_columns(external=True)[1]
    assert {"trend", "trend_DE"} <= set(with_trends) and not {"trend", "trend_DE"} & set(conts + cats)
    assert "mean_temperature_c" in conts and "State" in cats
    assert feature_columns(external=False, trends=True) == feature_columns(external=False)
    assert RossmannConfig(train="t", store="s").trends is False
