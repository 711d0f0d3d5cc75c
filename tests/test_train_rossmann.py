"""Rossmann pipeline end to end: tracked run, bundle, predictor on raw Kaggle rows, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from modeling.errors import DataError
from modeling.predictors import TabularPredictor, load_predictor
from modeling.schema import RecordsError
from pipelines.jobs.rossmann import RossmannConfig, train_rossmann

# the CLI subprocesses import this checkout's code, like the tests do (not an installed copy)
_PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def test_run_logs_contract_metrics_plots_and_registers(use_model_store):
    result = use_model_store["rossmann"]
    m = result["metrics"]
    for key in ("valid_rmspe", "rf_valid_rmspe", "adversarial_auc", "rf_oob_r2", "rf_embeddings_valid_rmspe"):
        assert np.isfinite(m[key]), key
    assert 0.0 <= m["adversarial_auc"] <= 1.0
    assert result["registered"]["alias"] == "champion"
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert "Store" in run.data.params["cat_columns"]
    assert run.data.tags["data_fingerprint"] and len(run.data.tags["data_fingerprint"]) == 64
    plots = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert {"plots/learning_curves.png", "plots/rf_importance.png", "plots/adversarial_validation.png",
            "plots/pred_vs_actual.png", "plots/embedding_store.png", "plots/rf_confidence.png"} <= plots
    assert len(client.get_metric_history(result["run_id"], "epoch/valid_loss")) == 2


def test_predictor_takes_raw_test_rows(use_model_store):
    pred = load_predictor("models:/rossmann@champion")
    assert isinstance(pred, TabularPredictor)
    test = pd.read_csv(use_model_store["rossmann_data"]["test.csv"], dtype={"StateHoliday": str})
    out = pred.predict(test)
    assert out.shape == (len(test),)
    closed = (test["Open"] == 0).to_numpy()
    assert closed.any() and (out[closed] == 0).all()
    assert (out[~closed] > 0).all() and np.isfinite(out).all()
    # DayOfWeek is optional (derived from Date); order of rows does not matter
    shuffled = test.drop(columns=["DayOfWeek"]).sample(frac=1.0, random_state=0)
    np.testing.assert_allclose(pred.predict(shuffled), out[shuffled.index.to_numpy()], rtol=1e-6)


def test_unknown_store_is_not_an_error(use_model_store):
    pred = load_predictor("models:/rossmann@champion")
    test = pd.read_csv(use_model_store["rossmann_data"]["test.csv"], dtype={"StateHoliday": str}).head(3)
    test["Store"] = 99_999
    test["Open"] = 1
    out = pred.predict(test)
    assert np.isfinite(out).all() and (out > 0).all()


def test_bad_records_name_record_and_field(use_model_store):
    pred = load_predictor("models:/rossmann@champion")
    rows = pd.DataFrame([
        {"Store": 1, "Date": "2015-08-01", "Open": 1, "Promo": 0, "StateHoliday": "0", "SchoolHoliday": 0},
        {"Store": 1, "Date": "not a date", "Open": 1, "Promo": 0, "StateHoliday": "z", "SchoolHoliday": 0},
    ])
    with pytest.raises(RecordsError) as err:
        pred.predict(rows)
    fields = {(e.record, e.field) for e in err.value.errors}
    assert (1, "Date") in fields and (1, "StateHoliday") in fields
    assert all(e.record == 1 for e in err.value.errors)


def test_bad_valid_days_is_a_data_error(use_model_store):
    data = use_model_store["rossmann_data"]
    with pytest.raises(DataError, match="valid-days"):
        train_rossmann(RossmannConfig(train=str(data["train.csv"]), store=str(data["store.csv"]),
                                      valid_days=10_000, lr="1e-3", quiet=True))


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda df: df.rename(columns={"Sales": "Sale"}), "Sales"),
        (lambda df: df.assign(StateHoliday=np.where(df.index == 3, "x", df["StateHoliday"])), "StateHoliday"),
        (lambda df: df.assign(Date=np.where(df.index == 5, "2015-13-45", df["Date"])), "Date"),
        (lambda df: df.assign(Sales=np.where(df.index == 7, -5, df["Sales"])), "Sales"),
    ],
)
def test_cli_rejects_bad_train_file_with_exit_2_and_no_run(model_store, tmp_path, mutate, expect):
    data = model_store["rossmann_data"]
    df = pd.read_csv(data["train.csv"], dtype={"StateHoliday": str}).head(500)
    bad = tmp_path / "train.csv"
    mutate(df).to_csv(bad, index=False)
    db = tmp_path / "m.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PATH": str(Path(sys.executable).parent), **_PYTHONPATH}
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "rossmann", "--train", str(bad), "--store",
         str(data["store.csv"]), "--json", "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "train.csv" in res.stderr and expect in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["exit_code"] == 2
    assert not db.exists() or not MlflowClient(f"sqlite:///{db}").search_experiments(
        filter_string="name = 'rossmann'")


def _cli_train(data: dict, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    db = tmp_path / "m.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PATH": str(Path(sys.executable).parent), **_PYTHONPATH}
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "rossmann", "--train", str(data["train.csv"]), "--store",
         str(data["store.csv"]), "--json", "--quiet", *extra],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    return res, db


@pytest.mark.parametrize("layers", ["500,x", "0,10", ""])
def test_cli_rejects_bad_layers_with_exit_2_and_no_run(model_store, tmp_path, layers):
    res, db = _cli_train(model_store["rossmann_data"], tmp_path, "--layers", layers)
    assert res.returncode == 2, res.stderr
    assert "--layers" in res.stderr
    assert not db.exists() or not MlflowClient(f"sqlite:///{db}").search_experiments(
        filter_string="name = 'rossmann'")


def test_cli_layers_and_wd_reach_the_model_and_the_run(model_store, tmp_path):
    res, db = _cli_train(model_store["rossmann_data"], tmp_path, "--layers", "24,12", "--wd", "0.05",
                         "--epochs", "1", "--lr", "3e-3")
    assert res.returncode == 0, res.stderr
    run_id = json.loads(res.stdout.strip().splitlines()[-1])["run_id"]
    params = MlflowClient(f"sqlite:///{db}").get_run(run_id).data.params
    assert params["layers"] == "(24, 12)" and float(params["wd"]) == 0.05
