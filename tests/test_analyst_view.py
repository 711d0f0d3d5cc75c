"""What an analyst finds in the MLflow UI, read back through MLflow's own client on real sqlite
stores: the experiment kind, the datasets, the run description, metric names, the analyst's
plots and tables, model version descriptions, batch inputs, and the sources that can't be hashed."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipelines import tracking
from pipelines.datasets import DataInput, describe_source
from pipelines.jobs.ratings import RatingsConfig, train_ratings
from pipelines.synth import write_ratings
from pipelines.tracking import TrackingUnavailableError


def _run(result: dict):
    return MlflowClient().get_run(result["run_id"])


def _inputs(run) -> dict[str, dict]:
    """context -> {name, digest, source, profile, schema} of the run's dataset inputs."""
    out = {}
    for di in run.inputs.dataset_inputs:
        ctx = {t.key: t.value for t in di.tags}["mlflow.data.context"]
        ds = di.dataset
        out[ctx] = {"name": ds.name, "digest": ds.digest, "source": json.loads(ds.source),
                    "source_type": ds.source_type, "profile": json.loads(ds.profile),
                    "schema": json.loads(ds.schema)["mlflow_colspec"] if ds.schema else [],
                    "tags": {t.key: t.value for t in di.tags}}
    return out


def _csv(run_id: str, path: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")))


# ---------------------------------------------------------------- training runs (session store)


def test_experiments_open_in_the_model_training_view(use_model_store):
    client = MlflowClient()
    for name in ("rossmann", "ratings"):
        exp = client.get_experiment_by_name(name)
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_runs_log_train_and_valid_datasets(use_model_store):
    for domain, target, count in (("rossmann", "Sales", "n_stores"), ("ratings", "rating", "n_users")):
        result = use_model_store[domain]
        run = _run(result)
        inputs = _inputs(run)
        assert set(inputs) == {"training", "validation"}
        train, valid = inputs["training"], inputs["validation"]
        assert train["digest"] != valid["digest"] and len(train["digest"]) == 10
        assert train["source_type"] == "local"
        data = use_model_store[f"{domain}_data"]
        first = data["train.csv"] if domain == "rossmann" else data["u.data"]
        assert train["source"]["uri"] == str(Path(first).absolute())
        assert train["profile"]["num_rows"] == int(run.data.params["n_train"])
        assert valid["profile"]["num_rows"] == int(run.data.params["n_valid"])
        assert train["profile"][count] > 0 and train["profile"]["target"] == target
        assert target in {c["name"] for c in train["schema"]}
        size = Path(first).stat().st_size
        assert train["profile"]["sources"].startswith(f"{Path(first).name} ({size:,} bytes)")
        assert train["profile"]["sha256"].split(", ")[0] == describe_source(first).sha256
    ross = _inputs(_run(use_model_store["rossmann"]))
    assert ross["training"]["profile"]["date_max"] < ross["validation"]["profile"]["date_min"]
    assert "last 42 days" in ross["validation"]["profile"]["selection"]


def test_run_description_states_headline_decision_data_and_plots(use_model_store):
    result = use_model_store["rossmann"]
    note = _run(result).data.tags["mlflow.note.content"]
    m = result["metrics"]
    assert f"`valid_rmspe` = {m['valid_rmspe']:.4f}" in note
    assert f"`rf_valid_rmspe` {m['rf_valid_rmspe']:.4f}" in note
    assert "Registered as **rossmann version 1**" in note and "Promoted to `champion`" in note
    assert "training:" in note and "validation:" in note and "stores" in note
    assert "`plots/error_breakdown.png`" in note and "`plots/partial_dependence.png`" in note
    assert "worst store" in note
    ratings = use_model_store["ratings"]
    note = _run(ratings).data.tags["mlflow.note.content"]
    assert f"`valid_rmse` = {ratings['metrics']['valid_rmse']:.4f}" in note
    assert f"`baseline_rmse` {ratings['metrics']['baseline_rmse']:.4f}" in note and "users" in note


def test_history_is_epoch_prefixed_and_final_metrics_keep_their_names(use_model_store):
    client = MlflowClient()
    result = use_model_store["rossmann"]
    run_id = result["run_id"]
    metrics = _run(result).data.metrics
    for key in ("train_loss", "valid_loss", "valid_rmspe", "lr", "seconds"):
        hist = client.get_metric_history(run_id, f"epoch/{key}")
        assert [h.step for h in hist] == [0, 1], key
    assert [h.step for h in client.get_metric_history(run_id, "valid_rmspe")] == [0]  # one final value
    assert metrics["valid_rmspe"] == pytest.approx(result["metrics"]["valid_rmspe"])
    assert not {"rmspe", "lr", "seconds", "train_loss", "valid_loss"} & set(metrics)
    assert "time/train_seconds" in metrics and "train_seconds" not in metrics
    params = _run(result).data.params
    assert float(params["lr_used"]) == pytest.approx(3e-3)
    assert "lr" in result["metrics"] and "train_seconds" in result["metrics"]  # --json keys unchanged
    ratings = use_model_store["ratings"]["run_id"]
    assert len(client.get_metric_history(ratings, "epoch/valid_rmse")) == 3
    assert len(client.get_metric_history(ratings, "epoch/valid_mae")) == 3


def test_analyst_plots_and_tables(use_model_store):
    client = MlflowClient()
    ross = use_model_store["rossmann"]["run_id"]
    plots = {a.path for a in client.list_artifacts(ross, "plots")}
    assert {"plots/partial_dependence.png", "plots/error_breakdown.png", "plots/worst_stores.png"} <= plots
    breakdown = _csv(ross, "analysis/error_breakdown.csv")
    assert {"StoreType", "Assortment", "DayOfWeek", "Promo"} <= set(breakdown["segment"])
    per_seg = breakdown.groupby("segment")["rows"].sum()
    assert (per_seg == int(_run(use_model_store["rossmann"]).data.params["n_valid"])).all()
    worst = _csv(ross, "analysis/worst_stores.csv")
    assert 0 < len(worst) <= 20 and list(worst["rmspe"]) == sorted(worst["rmspe"], reverse=True)
    pdp = _csv(ross, "analysis/partial_dependence.csv")
    assert 1 <= pdp["feature"].nunique() <= 6 and "Store" not in set(pdp["feature"])
    assert (pdp["average_prediction"] > 0).all()  # predicted Sales, not log(Sales)

    rat = use_model_store["ratings"]["run_id"]
    plots = {a.path for a in client.list_artifacts(rat, "plots")}
    assert {"plots/error_breakdown.png", "plots/ranking_by_activity.png"} <= plots
    breakdown = _csv(rat, "analysis/error_breakdown.csv")
    assert {"user activity", "item activity", "known ids", "rating"} <= set(breakdown["segment"])
    ranking = _csv(rat, "analysis/ranking_by_activity.csv")
    assert {"group", "users", "precision_at_10", "recall_at_10", "ndcg_at_10"} <= set(ranking.columns)


def test_registered_champion_version_says_why(use_model_store):
    client = MlflowClient()
    mv = client.get_model_version("rossmann", "1")
    assert "Promoted to `champion`" in mv.description and "no champion to beat" in mv.description
    assert f"#/experiments/{_run(use_model_store['rossmann']).info.experiment_id}/runs/" in mv.description
    assert mv.tags["tabrec.promoted"] == "true" and mv.tags["tabrec.metric"] == "valid_rmspe"


def test_no_run_is_left_running(use_model_store):
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(exps, "attributes.status = 'RUNNING'") == []


# ---------------------------------------------------------------- registration decisions (own store)


def test_version_description_after_promotion_refusal_and_force(mlflow_store, tmp_path):
    files = write_ratings(tmp_path / "r", users=120, items=150, ratings=4000, seed=3)

    def train(**kw):
        cfg = dict(ratings=str(files["u.data"]), epochs=3, lr="1e-2", batch_size=256, seed=0, quiet=True,
                   register="recs")
        return train_ratings(RatingsConfig(**{**cfg, **kw}))

    good = train()
    bad = train(epochs=1, lr="1e-5")  # barely trained: worse than version 1
    forced = train(epochs=1, lr="1e-5", force=True)
    assert good["registered"]["alias"] == "champion"
    assert bad["registered"]["alias"] is None and forced["registered"]["alias"] == "champion"
    assert bad["registered"]["champion_metric"] == pytest.approx(good["metrics"]["valid_rmse"])

    client = MlflowClient()
    v2 = client.get_model_version("recs", "2")
    assert v2.description.startswith("**Not promoted**")
    assert "does not beat champion version 1" in v2.description and "stays on version 1" in v2.description
    assert f"{good['metrics']['valid_rmse']:.4f}" in v2.description and "% worse" in v2.description
    assert "bias baseline" in v2.description and f"/runs/{bad['run_id']}" in v2.description
    assert v2.tags["tabrec.promoted"] == "false" and v2.tags["tabrec.previous_champion"] == "1"
    note = client.get_run(bad["run_id"]).data.tags["mlflow.note.content"]
    assert "Registered as **recs version 2**" in note and "**Not promoted**" in note
    assert "vs current champion recs version 1" in note

    v3 = client.get_model_version("recs", "3")
    assert v3.description.startswith("**Promoted to `champion` with `--force`**")
    assert v3.tags["tabrec.forced"] == "true" and v3.tags["tabrec.promoted"] == "true"
    assert str(client.get_model_version_by_alias("recs", "champion").version) == "3"
    assert client.get_run(forced["run_id"]).info.status == "FINISHED"


# ---------------------------------------------------------------- batch runs


def _batch_run(run_id: str):
    return MlflowClient().get_run(run_id)


def test_batch_runs_log_their_input(use_model_store, bundles, tmp_path, monkeypatch):
    from pipelines.batch import recommend_file, score_file

    monkeypatch.chdir(tmp_path)
    test_csv = Path(use_model_store["rossmann_data"]["test.csv"])
    res = score_file(bundles["rossmann"], test_csv, tmp_path / "pred.parquet", quiet=True)
    [inp] = _inputs(_batch_run(res["run_id"])).values()
    assert inp["tags"]["mlflow.data.context"] == "scoring"
    assert inp["source"]["uri"] == str(test_csv.absolute()) and inp["name"] == "test.csv"
    assert inp["profile"]["num_rows"] == res["rows_in"]
    assert inp["profile"]["sha256"] == describe_source(test_csv).sha256
    assert {"Store", "Date", "Promo"} <= {c["name"] for c in inp["schema"]}
    exp = MlflowClient().get_experiment(_batch_run(res["run_id"]).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    parts = tmp_path / "parts"  # a directory of parts: described, not hashed, with a note
    parts.mkdir()
    test = pd.read_csv(test_csv, dtype={"StateHoliday": str})
    for i, start in enumerate(range(0, len(test), 300)):
        test.iloc[start:start + 300].to_parquet(parts / f"part-{i}.parquet", index=False)
    res = score_file(bundles["rossmann"], parts, tmp_path / "pred2.parquet", quiet=True)
    [inp] = _inputs(_batch_run(res["run_id"])).values()
    assert inp["profile"]["num_rows"] == len(test) and inp["profile"]["n_files"] == i + 1
    assert "directory of" in inp["profile"]["note"] and "not their content" in inp["tags"]["tabrec.note"]

    users = tmp_path / "users.txt"
    users.write_text("1\n2\nnobody\n")
    res = recommend_file(bundles["ratings"], tmp_path / "rec.parquet", users=users, k=3, quiet=True)
    [inp] = _inputs(_batch_run(res["run_id"])).values()
    assert inp["name"] == "users.txt" and inp["profile"]["num_rows"] == 3


# ---------------------------------------------------------------- bad input


def test_sources_that_cant_be_fingerprinted_still_log_a_dataset(mlflow_store, tmp_path):
    fifo = tmp_path / "ratings.pipe"
    os.mkfifo(fifo)
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.csv").write_text("x\n1\n")
    (parts / "b.csv").write_text("x\n2\n")
    (parts / "_SUCCESS").write_text("")

    done: dict = {}

    def log() -> None:
        with tracking.tracked_run("bad-sources") as run:
            done["run_id"] = run.info.run_id
            done["logged"] = tracking.log_datasets([
                DataInput("piped", "training", [str(fifo)], 10, {"x": "long"}),
                DataInput("parts", "validation", [str(parts)], 2, {"x": "long"}),
            ])
            done["fingerprint"] = tracking.file_fingerprint([fifo, parts])

    t = threading.Thread(target=log, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "logging a pipe blocked (it must never be opened)"
    inputs = _inputs(MlflowClient().get_run(done["run_id"]))
    piped, dirs = inputs["training"], inputs["validation"]
    assert "pipe can't be fingerprinted" in piped["profile"]["note"]
    assert piped["profile"]["sources"] == "ratings.pipe (pipe)" and piped["profile"]["num_rows"] == 10
    assert dirs["profile"]["sources"] == "parts/ (directory, 8 bytes)"
    assert "directory of 2 files" in dirs["profile"]["note"] and "not their content" in dirs["tags"]["tabrec.note"]
    assert len(done["fingerprint"]) == 64
    (parts / "b.csv").write_text("x\n3\n")  # same size, later mtime: a different digest
    os.utime(parts / "b.csv", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert describe_source(parts).sha256 != dirs["profile"]["sha256"]
    missing = describe_source(tmp_path / "gone.csv")
    assert missing.kind == "missing" and "not readable" in missing.note


def test_unreachable_tracking_server_fails_training_fast(tmp_path, monkeypatch):
    files = write_ratings(tmp_path / "r", users=50, items=60, ratings=1000, seed=0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(TrackingUnavailableError, match="127.0.0.1:9.*unreachable"):
        train_ratings(RatingsConfig(ratings=str(files["u.data"]), epochs=1, lr="1e-2", quiet=True))
    assert time.perf_counter() - t0 < 10
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["train", "ratings", "--ratings", str(files["u.data"]), "--epochs", "1",
                                      "--lr", "1e-2", "--quiet"])
    assert result.exit_code == 2 and "unreachable" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def test_epoch_names_and_final_names():
    assert tracking.epoch_metric_name("rmspe") == "epoch/valid_rmspe"
    assert tracking.epoch_metric_name("valid_loss") == "epoch/valid_loss"
    assert tracking.epoch_metric_name("lr") == "epoch/lr"
    named, params = tracking.mlflow_metric_names({"valid_rmse": 1.0, "lr": 0.01, "train_seconds": 3.0,
                                                  "seconds_per_epoch": 1.0, "precision_at_10": 0.2})
    assert named == {"valid_rmse": 1.0, "time/train_seconds": 3.0, "time/seconds_per_epoch": 1.0,
                     "precision_at_10": 0.2}
    assert params == {"lr_used": 0.01}
    assert np.isfinite(named["valid_rmse"])


def test_decision_and_headline_wording():
    from pipelines.run_notes import Champion, Decision, Headline, change, run_description

    champ = Champion("m", "3", 0.20, "r")
    assert change(0.19, 0.20) == "5.0 % better (−0.0100)" and change(0.22, 0.20) == "10.0 % worse (+0.0200)"
    better = Decision("m", "4", "valid_rmse", 0.19, champ, better=True, forced=False)
    assert better.sentence().startswith("**Promoted to `champion`**: `valid_rmse` 0.1900 beats champion version 3")
    assert better.result() == {"name": "m", "version": "4", "alias": "champion", "champion_metric": 0.20,
                               "metric": "valid_rmse"}
    worse = Decision("m", "4", "valid_rmse", 0.22, champ, better=False, forced=False)
    assert worse.sentence().endswith("alias `champion` stays on version 3.") and worse.result()["alias"] is None
    forced = Decision("m", "4", "valid_rmse", 0.22, champ, better=False, forced=True)
    assert forced.sentence().startswith("**Promoted to `champion` with `--force`**")
    assert forced.tags()["tabrec.forced"] == "true"
    h = Headline("valid_rmse", 0.22, [("bias baseline", "baseline_rmse", 0.25)], champion=champ, register="m")
    text = run_description(h, [], ["plots/a.png"], decision=worse, link=lambda p: f"#/x/{p}")
    assert "vs current champion m version 3 (0.2000): 10.0 % worse" in text
    assert "[`plots/a.png`](#/x/plots/a.png)" in text and "Registered as **m version 4**" in text
    pending = run_description(Headline("valid_rmse", 0.2, register="m"), [], [], pending=True)
    assert "follows when the run has ended" in pending and "no champion of m yet" in pending


def test_day_of_week_reads_as_day_names_on_the_partial_dependence_axis():
    from modeling.inspection import FeatureGrid
    from pipelines.jobs.analysis import _day_names

    pipeline = _day_names(FeatureGrid("Dayofweek", "cat", 0, np.arange(4), ["#na#", "0", "5", "6"]))
    assert pipeline.labels == ["#na#", "1 Mon", "6 Sat", "7 Sun"]  # the pipeline's Monday = 0
    kaggle = _day_names(FeatureGrid("DayOfWeek", "cat", 0, np.arange(2), ["1", "7"]))
    assert kaggle.labels == ["1 Mon", "7 Sun"]  # Kaggle's Monday = 1
    other = FeatureGrid("Promo", "cat", 0, np.arange(2), ["0", "1"])
    assert _day_names(other).labels == ["0", "1"]


def test_a_failure_in_the_analyst_stage_ends_the_run_failed(mlflow_store, tmp_path, monkeypatch):
    """Fault injection: the analyst's plots raise after the run has started; the run must end
    FAILED with the error, not stay RUNNING, and nothing is registered."""
    from pipelines.jobs import analysis

    def broken(*args, **kwargs):
        raise RuntimeError("analyst stage broke")

    monkeypatch.setattr(analysis, "ratings_analysis", broken)
    files = write_ratings(tmp_path / "r", users=60, items=80, ratings=1500, seed=1)
    with pytest.raises(RuntimeError, match="analyst stage broke"):
        train_ratings(RatingsConfig(ratings=str(files["u.data"]), epochs=1, lr="1e-2", quiet=True, register="x"))
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("ratings").experiment_id])
    assert run.info.status == "FAILED" and "analyst stage broke" in run.data.tags["error"]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"ratings-train", "ratings-valid"}
    assert client.search_registered_models() == []
