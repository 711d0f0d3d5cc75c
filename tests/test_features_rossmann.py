"""Rossmann features on the serving path: the features serving computes equal the features training
computed (no training/serving skew), HTTP and batch scoring give the same predictions, and the
pipeline describes its time-relative columns to the drift check.

Serving (HTTP and `tabrec score`) runs `load_predictor(bundle).engineer(rows)`: the bundle's input
schema validates the raw rows, then the fitted feature pipeline saved in the bundle transforms them.
Every test here goes through that path.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modeling.bundle import ModelSpec, TabularSpec, Target, ZeroRule, save_bundle
from modeling.embeddings import get_emb_szs
from modeling.predictors import TabularPredictor, load_predictor
from modeling.processor import TabularProcessor
from modeling.schema import RecordError, RecordsError
from modeling.tabular import TabularModel
from pipelines.batch import drift_exclusions, group_columns, key_columns, open_inputs
from pipelines.features.rossmann import (
    EVENT_CAP,
    EVENT_WINDOW,
    EVENTS,
    WEATHER_COLS,
    build_feature_pipeline,
    engineer_training,
    feature_columns,
    input_schema,
    log_target,
    split_by_days,
    training_rows,
)
from pipelines.ingest.external import ExternalTables, read_external
from pipelines.ingest.rossmann import (
    read_store,
    read_test,
    read_train,
)
from service import Settings, create_app

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rossmann"
needs_data = pytest.mark.skipif(not (DATA / "train.csv").exists(), reason="real data not present")

DATE_COLS = ["Year", "Month", "Week", "Day", "Dayofweek", "Dayofyear", "Elapsed"]
STORE_COLS = ["StoreType", "Assortment", "CompetitionDistance", "PromoInterval",
              "CompetitionOpenSinceYear", "Promo2SinceYear", "Promo2"]
DERIVED = ["CompetitionMonthsOpen", "Promo2Weeks", "Promo2Active"]
SINCE = [f"After{e}" for e in EVENTS] + [f"{e}_bw" for e in EVENTS]
NOT_SENT = ["Sales", "Customers"]  # training columns a request does not carry


def serving_predictor(pipe, fit_rows: pd.DataFrame, folder: Path) -> TabularPredictor:
    """A bundle around the fitted pipeline `pipe`, written as the training job writes one (input
    schema, processor, features, zero_when rule) but with an untrained network, loaded back as
    serving loads it: the serving feature path without training a model."""
    proc = TabularProcessor(pipe.meta["cat_cols"], pipe.meta["cont_cols"]).fit(fit_rows)
    model = TabularModel(get_emb_szs(proc.cardinalities), len(proc.cont_names), layers=[8], ps=[0.0],
                         y_range=(0.0, 12.0))
    spec = TabularSpec(model=ModelSpec.of(model), inputs=input_schema(), processor=proc.to_dict(),
                       target=Target("Sales", "log"), zero_when=[ZeroRule("Open", 0)], key_columns=["Id"])
    save_bundle(folder, spec, [model], features=pipe)
    predictor = load_predictor(str(folder))
    assert isinstance(predictor, TabularPredictor)
    return predictor


def as_records(df: pd.DataFrame) -> list[dict]:
    """Rows as a client sends them: JSON objects, dates as ISO strings, missing values as null."""
    return json.loads(df.to_json(orient="records", date_format="iso"))


# ---------------------------------------------------------------- the trained demo model (synthetic data)


@pytest.fixture(scope="module")
def trained(model_store: dict, bundles: dict) -> dict:
    """The session's Rossmann bundle, and the features its training computed over train.csv."""
    data = model_store["rossmann_data"]
    train = read_train(data["train.csv"])
    pipe, feats = engineer_training(train, read_store(data["store.csv"]))  # what the training job runs
    return {"bundle": bundles["rossmann"], "predictor": load_predictor(bundles["rossmann"]), "pipe": pipe,
            "feats": feats, "train_csv": Path(data["train.csv"]), "test_csv": Path(data["test.csv"])}


def test_serving_features_equal_training_features(trained: dict) -> None:
    """THE KEY TEST: raw train.csv rows sent to the served model give, column by column (values and
    dtypes), the features training computed for them, and so the same model inputs.

    The request holds the whole training file (every store, every day), shuffled: the days-until
    features read the events in the request, and the bundle keeps only the events at the end of
    training (enough for rows dated after training), so the same rows must be in both passes for
    the comparison to be independent of request neighbours."""
    predictor, feats = trained["predictor"], trained["feats"]
    # the pipeline in the bundle is the one fitted here, tables and all
    assert predictor.features is not None
    for ours, served in zip(trained["pipe"].steps, predictor.features.steps, strict=True):
        assert (served.name, served.params()) == (ours.name, ours.params())
        for name, table in ours.tables().items():
            pd.testing.assert_frame_equal(served.tables()[name], table)
    raw = pd.read_csv(trained["train_csv"]).drop(columns=NOT_SENT)
    assert len(raw) == len(feats) and raw["Store"].nunique() == 12
    order = np.random.default_rng(3).permutation(len(raw))
    request = pd.DataFrame.from_records(as_records(raw.iloc[order]))
    got = predictor.engineer(request)
    ref = feats.iloc[order].reset_index(drop=True)
    assert list(got.index) == list(range(len(raw)))  # one row per record, in request order
    columns = [c for c in feats.columns if c not in NOT_SENT]
    assert set(columns) <= set(got.columns)
    for c in columns:
        pd.testing.assert_series_equal(got[c], ref[c], check_names=False, obj=f"feature {c!r}")
    cats, conts = predictor.processor.cat_names, predictor.processor.cont_names
    assert set(cats + conts) <= set(columns) and "AfterPromo" in cats and "Promo_fw" in conts
    for served_x, train_x in zip(predictor.processor.transform(got), predictor.processor.transform(ref),
                                 strict=True):
        np.testing.assert_array_equal(served_x, train_x)


def _wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)


def test_http_predictions_equal_batch_scoring(trained: dict, tmp_path: Path) -> None:
    """test.csv (all stores, the 48 days after training) in one HTTP request and through `tabrec
    score` in one chunk: the same rows in one batch, so the same predictions to 1e-6."""
    rows = pd.read_csv(trained["test_csv"])
    assert rows["Store"].nunique() == 12 and rows["Open"].eq(0).any()
    app = create_app(Settings(models={"rossmann": trained["bundle"]}, max_records=len(rows)))
    with TestClient(app) as client:
        _wait_ready(client)
        resp = client.post("/v1/models/rossmann/predict", json={"records": as_records(rows)})
    assert resp.status_code == 200, resp.text
    http = np.asarray(resp.json()["predictions"], dtype=np.float64)
    from pipelines.cli import app as cli

    out = tmp_path / "scored.parquet"
    result = CliRunner().invoke(cli, ["score", "--model", trained["bundle"], "--input", str(trained["test_csv"]),
                                      "--output", str(out), "--no-track", "--drift-rows", "0", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["chunks"] == 1 and summary["key_columns"] == ["Id"]
    batch = pq.read_table(out).to_pandas().set_index("Id").loc[rows["Id"], "prediction"].to_numpy()
    assert len(http) == len(batch) == len(rows)
    np.testing.assert_allclose(http, batch, rtol=1e-6, atol=1e-6)
    closed = rows["Open"].eq(0).to_numpy()
    assert (http[closed] == 0).all() and (http[~closed] > 0).all()


def test_drift_exclusions_group_and_key_columns_of_the_trained_model(trained: dict, tmp_path: Path) -> None:
    """The batch job asks the bundle's pipeline (no step names): the date-derived inputs it leaves
    out of the drift check are exactly the set it left out before the description API existed."""
    predictor = trained["predictor"]
    assert drift_exclusions(predictor) == EXPECTED_PLAIN
    assert group_columns(predictor) == []  # the event calendar: no rows need to be scored together
    rows = pd.read_csv(trained["test_csv"]).drop(columns=["Id"])
    rows.to_csv(tmp_path / "no_id.csv", index=False)
    assert key_columns(predictor, open_inputs(tmp_path / "no_id.csv")) == ["Store", "Date"]  # no Id: fallback
    assert key_columns(predictor, open_inputs(trained["test_csv"])) == ["Id"]


# ---------------------------------------------------------------- drift exclusions: today's set, pinned

CAL = "calendar part of the date"
DURATION = "duration up to the row's date"
MONTH = "flag of the date's month"
EVENT = ("event distance/window read from the event calendar: moves with the season and with "
         "the events known ahead (cap or repeat beyond the calendar's horizon)")
# recorded from pipelines.score.drift_exclusions as it read step names, before the description API
# (the event reason reworded when the days-until features moved to the event calendar)
EXPECTED_PLAIN = {
    **{c: CAL for c in ["Year", "Month", "Week", "Day", "Dayofyear", "Elapsed"]},
    "CompetitionMonthsOpen": DURATION, "Promo2Weeks": DURATION, "Promo2Active": MONTH,
    **{f"{p}{e}": EVENT for e in EVENTS for p in ("After", "Before")},
    **{f"{e}_{s}": EVENT for e in EVENTS for s in ("bw", "fw")},
}
_WEATHER = [*WEATHER_COLS, "events"]
EXPECTED_EXTERNAL = {
    **EXPECTED_PLAIN,
    **{c: "joined on the date ('weather' table)" for c in _WEATHER + [c + "_right" for c in _WEATHER]},
    **{c: "joined on the date ('trends_state' table)" for c in ["trend", "trend_right"]},
    **{c: "joined on the date ('trends_de' table)" for c in ["trend_DE", "trend_DE_right"]},
}


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


def _tiny_external() -> ExternalTables:
    """Small external tables of the Kaggle-competition shape (states, weather, Google Trends)."""
    days = pd.date_range("2015-01-01", "2015-04-30", freq="D")
    weeks = pd.date_range("2014-12-28", "2015-04-26", freq="7D")
    weather = pd.concat([pd.DataFrame({"State": st, "Date": days, **{c: 1.0 + i for i, c in enumerate(WEATHER_COLS)},
                                       "events": "Rain"}) for st in ("BY", "NW")], ignore_index=True)
    trends = pd.DataFrame({"week_start": weeks, "week_end": weeks + pd.Timedelta(days=6),
                           "trend": np.arange(len(weeks), dtype=float)})
    return ExternalTables(store_states=pd.DataFrame({"Store": [1, 2], "State": ["BY", "NW"]}), weather=weather,
                          trends_state=pd.concat([trends.assign(State=st) for st in ("BY", "NW")]),
                          trends_de=trends)


def test_rossmann_pipeline_declares_todays_drift_exclusions(tmp_path: Path) -> None:
    train, store = _tiny()
    for external, expected in ((None, EXPECTED_PLAIN), (_tiny_external(), EXPECTED_EXTERNAL)):
        pipe, feats = engineer_training(train, store, external)
        predictor = serving_predictor(pipe, training_rows(feats), tmp_path / f"bundle{external is None}")
        assert predictor.features is not None
        assert drift_exclusions(predictor) == expected
        assert pipe.time_relative_columns() == expected
        assert pipe.group_columns() == [] and pipe.key_columns() == ["Store", "Date"]
        assert pipe.entity_columns() == ["Store"]
        assert pipe.date_columns() == ["Date"]
        # the store joins (on Store) add inputs that do not move with the date
        assert not {"StoreType", "CompetitionDistance", "State", "OpensSundays", "Dayofweek"} & set(expected)
    assert {"trend_DE", "max_temperature_c", "State"} <= set(feats.columns)


# ---------------------------------------------------------------- the feature values (tiny hand-made data)


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


@pytest.fixture
def tiny_predictor(tmp_path: Path) -> TabularPredictor:
    train, store = _tiny()
    pipe, feats = engineer_training(train, store)
    return serving_predictor(pipe, training_rows(feats), tmp_path / "bundle")


def test_serving_validation_names_record_and_field(tiny_predictor: TabularPredictor) -> None:
    good = {"Store": 1, "Date": "2015-04-02", "Open": 1, "Promo": 1, "StateHoliday": 0,
            "SchoolHoliday": "0"}
    out = tiny_predictor.engineer(pd.DataFrame([good, {**good, "Store": 2, "StateHoliday": "a"}]))
    assert out["StateHoliday"].tolist() == ["0", "a"] and out["Dayofweek"].tolist() == [3, 3]
    assert list(out.index) == [0, 1]
    bad = pd.DataFrame([good, {**good, "Store": 2, "StateHoliday": "z"}, {**good, "Store": 3, "Date": "soon"}])
    for call in (tiny_predictor.engineer, tiny_predictor.predict):
        with pytest.raises(RecordsError) as info:
            call(bad)
        msg, errors = str(info.value), info.value.errors
        assert "record 1 field 'StateHoliday'" in msg and "'z'" in msg and "record 2 field 'Date'" in msg
        assert {(e.record, e.field) for e in errors} == {(1, "StateHoliday"), (2, "Date")}
    missing = pd.DataFrame([{k: v for k, v in good.items() if k != "Promo"}])
    with pytest.raises(RecordsError) as info:
        tiny_predictor.predict(missing)
    assert info.value.errors == [RecordError(0, "Promo", "field required")]


def test_loosely_typed_records_give_the_same_features(tiny_predictor: TabularPredictor) -> None:
    """Ids as strings, a missing Open, StateHoliday as the number 0: the input schema coerces them
    to what typed rows give (as train.csv read by training gives)."""
    loose = pd.DataFrame({"Store": ["1", "2", "2"], "Date": ["2015-04-01", "2015-04-01", "2015-04-05"],
                          "Open": [1, None, 0], "Promo": [1, 1, 0], "StateHoliday": [0, "a", "0"],
                          "SchoolHoliday": [0, 0, 1]})
    typed = pd.DataFrame({"Store": [1, 2, 2], "Date": pd.to_datetime(["2015-04-01", "2015-04-01", "2015-04-05"]),
                          "Open": [1.0, np.nan, 0.0], "Promo": [1, 1, 0], "StateHoliday": ["0", "a", "0"],
                          "SchoolHoliday": [0, 0, 1]})
    cats, conts = tiny_predictor.processor.cat_names, tiny_predictor.processor.cont_names
    got, ref = tiny_predictor.engineer(loose), tiny_predictor.engineer(typed)
    pd.testing.assert_frame_equal(got[cats + conts], ref[cats + conts])
    np.testing.assert_array_equal(tiny_predictor.predict(loose), tiny_predictor.predict(typed))


def test_trend_columns_are_opt_in_model_inputs() -> None:
    from pipelines.jobs.rossmann import RossmannConfig

    cats, conts = feature_columns(external=True, trends=False)
    with_trends = feature_columns(external=True)[1]
    assert {"trend", "trend_DE"} <= set(with_trends) and not {"trend", "trend_DE"} & set(conts + cats)
    assert "mean_temperature_c" in conts and "State" in cats
    assert feature_columns(external=False, trends=True) == feature_columns(external=False)
    assert RossmannConfig(train="t", store="s").trends is False


# ---------------------------------------------------------------- the real Kaggle data


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
    req = rows.drop(columns=[*NOT_SENT, "DayOfWeek"]).assign(Id=rows.index)
    return pd.DataFrame.from_records(as_records(req.sample(frac=1, random_state=seed)))


@needs_data
def test_later_weeks_served_equal_one_pass_over_the_series(real: dict, tmp_path: Path) -> None:
    """Fit on all but the last 6 weeks, serve those weeks as one shuffled request of JSON records
    with those weeks' events as the calendar: the result equals one fit_transform over the whole
    series (days-until features wherever the next event lies inside the calendar, the documented
    cap otherwise)."""
    train = real["train"]
    gap = _gap_stores(train)
    assert len(gap) == 180
    stores = sorted(set(range(1, 41)) | set(gap[:10]))
    sub = train[train["Store"].isin(stores)]
    cut = sub["Date"].max() - pd.Timedelta(days=42)
    full = build_feature_pipeline(real["store"], real["external"]).fit_transform(sub)
    pipe = build_feature_pipeline(real["store"], real["external"]).fit(sub[sub["Date"] <= cut])
    predictor = serving_predictor(pipe, training_rows(full), tmp_path / "bundle")
    later = sub[sub["Date"] > cut]
    request = _as_request(later, seed=7)
    got = predictor.with_calendar(request).engineer(request).set_index("Id").loc[later.index]
    ref = full.loc[later.index]
    cats, conts = pipe.meta["cat_cols"], pipe.meta["cont_cols"]
    assert "State" in cats and "trend_DE" in conts and "max_temperature_c" in conts
    exact = DATE_COLS + STORE_COLS + DERIVED + SINCE + ["State", "events", "max_temperature_c", "trend",
                                                        "trend_DE"]
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
    assert drift_exclusions(predictor) == EXPECTED_EXTERNAL


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
    # test.csv through the served bundle (pipeline saved and loaded) = the in-memory pipeline
    test = read_test(DATA / "test.csv")
    predictor = serving_predictor(pipe, rows.iloc[::20], tmp_path / "bundle")
    got = predictor.engineer(test)
    assert got[["State", "max_temperature_c", "trend", "trend_DE", "StoreType"]].notna().all().all()
    pd.testing.assert_frame_equal(got, pipe.transform(input_schema().validate(test)))
    raw = pd.read_csv(DATA / "test.csv", dtype={"StateHoliday": str})
    pd.testing.assert_frame_equal(predictor.engineer(raw)[cats + conts], got[cats + conts])
