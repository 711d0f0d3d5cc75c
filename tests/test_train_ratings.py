"""Ratings pipeline end to end: synthetic data → tracked run → registry → predictor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from modeling.errors import DataError
from modeling.predictors import RatingsPredictor, load_predictor
from pipelines.jobs.ratings import MODEL_DEFAULTS, RatingsConfig, split_ratings, train_ratings
from pipelines.synth import write_ratings

# the CLI subprocesses import this checkout's code, like the tests do (not an installed copy)
_PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


@pytest.fixture(scope="module")
def ratings_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_ratings(tmp_path_factory.mktemp("ratings"), users=300, items=400, ratings=20_000, seed=1)


def _cfg(files: dict[str, Path], **kw: object) -> RatingsConfig:
    base = dict(ratings=str(files["u.data"]), items=str(files["movies.csv"]), epochs=5, lr="1e-2", batch_size=256,
                seed=0, quiet=True)
    base.update(kw)
    return RatingsConfig(**base)  # type: ignore[arg-type]


def test_dot_model_run_is_tracked_registered_and_servable(ratings_files, mlflow_store):
    result = train_ratings(_cfg(ratings_files, register="ratings"))
    m = result["metrics"]
    for key in ("valid_rmse", "valid_mae", "baseline_rmse", "precision_at_10", "recall_at_10",
                "ndcg_at_10", "adversarial_auc"):
        assert key in m and np.isfinite(m[key]), key
    # the synthetic data has factor structure: the model must beat the bias-only baseline
    assert m["valid_rmse"] < m["baseline_rmse"] - 0.02
    assert m["baseline_rmse"] < m["global_mean_rmse"]
    assert 0.4 < m["adversarial_auc"] < 0.65  # random split: forest cannot tell valid from train
    assert result["registered"] == {"name": "ratings", "version": "1", "alias": "champion",
                                    "champion_metric": None, "metric": "valid_rmse"}

    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "dot"
    assert len(client.get_metric_history(result["run_id"], "epoch/valid_loss")) == 5
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert {"plots/learning_curves.png", "plots/item_bias.png", "plots/item_embeddings.png"} <= artifacts

    pred = load_predictor("models:/ratings@champion")
    assert isinstance(pred, RatingsPredictor)
    assert pred.source.version == "1"
    ratings = pd.read_csv(ratings_files["u.data"], sep="\t", names=["user", "item", "rating", "ts"])
    user = int(ratings["user"].iloc[0])
    seen = set(ratings.loc[ratings["user"] == user, "item"].astype(str))
    [rec] = pred.recommend([user], k=10)
    assert not rec["cold_start"]
    assert len(rec["items"]) == 10
    # seen items excluded only for training ratings; the validation part may overlap, so check a bound
    assert len({r["item"] for r in rec["items"]} & seen) <= 3
    assert all("title" in r for r in rec["items"])
    [cold] = pred.recommend(["no-such-user"], k=5)
    assert cold["cold_start"] and len(cold["items"]) == 5
    scores = [r["score"] for r in rec["items"]]
    assert scores == sorted(scores, reverse=True)
    sim = pred.similar(str(ratings["item"].iloc[0]), k=5)
    assert len(sim) == 5 and all(-1.0 <= s["similarity"] <= 1.0 for s in sim)
    # unknown item in a predict request maps to the unknown token, not an error
    out = pred.predict(pd.DataFrame({"user": [user, user], "item": [ratings["item"].iloc[0], "zzz"]}))
    assert out.shape == (2,) and np.isfinite(out).all()

    # the pyfunc flavour (models-from-code) gives the same numbers
    pyfunc = mlflow.pyfunc.load_model("models:/ratings@champion")
    frame = pd.DataFrame({"user": [str(user)] * 3, "item": ratings["item"].iloc[:3].astype(str).tolist()})
    np.testing.assert_allclose(np.asarray(pyfunc.predict(frame)), pred.predict(frame), rtol=1e-6)


def test_champion_moves_only_when_better(ratings_files, mlflow_store):
    first = train_ratings(_cfg(ratings_files, register="r"))
    worse = train_ratings(_cfg(ratings_files, register="r", epochs=1, lr="1e-5"))
    assert worse["metrics"]["valid_rmse"] > first["metrics"]["valid_rmse"]
    assert worse["registered"]["alias"] is None
    assert str(MlflowClient().get_model_version_by_alias("r", "champion").version) == "1"
    forced = train_ratings(_cfg(ratings_files, register="r", epochs=1, lr="1e-5", force=True))
    assert forced["registered"]["alias"] == "champion"
    assert str(MlflowClient().get_model_version_by_alias("r", "champion").version) == "3"


def test_nn_model_learns(ratings_files, mlflow_store):
    result = train_ratings(_cfg(ratings_files, model="nn", epochs=5, lr="3e-3"))
    assert result["metrics"]["valid_rmse"] < result["metrics"]["global_mean_rmse"] - 0.05


@pytest.mark.parametrize("how", ["random", "time", "user-last"])
def test_splits_partition_the_data(how):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user": rng.integers(0, 30, 600).astype(str), "item": rng.integers(0, 50, 600).astype(str),
                       "rating": rng.integers(1, 6, 600).astype(np.float32), "timestamp": np.arange(600)})
    tr, va = split_ratings(df, 0.2, how, seed=3)
    assert len(tr) + len(va) == len(df)
    if how == "time":
        assert tr["timestamp"].max() <= va["timestamp"].min()
    if how == "user-last":
        last = df.sort_values("timestamp").groupby("user")["timestamp"].max()
        assert set(va["timestamp"]) <= set(last)
        assert va["user"].is_unique
    if how == "random":
        tr2, va2 = split_ratings(df, 0.2, how, seed=3)
        pd.testing.assert_frame_equal(va, va2)


def test_bad_options_fail_before_any_run(ratings_files, mlflow_store):
    with pytest.raises(DataError, match="--model"):
        train_ratings(_cfg(ratings_files, model="svd"))
    assert MlflowClient().search_experiments(filter_string="name = 'ratings'") == []


def test_failed_run_ends_failed_and_registers_nothing(ratings_files, mlflow_store, monkeypatch):
    import pipelines.jobs.ratings as job

    def boom(*a, **k):
        raise RuntimeError("forest exploded")

    monkeypatch.setattr(job, "adversarial_validation", boom)
    with pytest.raises(RuntimeError, match="forest exploded"):
        train_ratings(_cfg(ratings_files, register="never"))
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("ratings").experiment_id])
    assert run.info.status == "FAILED"
    assert "forest exploded" in run.data.tags["error"]
    assert client.search_registered_models(filter_string="name = 'never'") == []


def test_cli_json_contract_and_exit_codes(ratings_files, tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}", "PATH": str(Path(sys.executable).parent), **_PYTHONPATH}
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "ratings", "--ratings", str(ratings_files["u.data"]),
           "--epochs", "2", "--lr", "5e-3", "--json", "--quiet"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout.strip().splitlines()[-1])
    assert {"run_id", "model_uri", "registered", "train_seconds", "metrics"} <= doc.keys()
    assert doc["model_uri"].startswith("runs:/")
    # the effective config, defaults included, so a script sees what was used
    assert doc["config"]["epochs"] == 2 and doc["config"]["lr"] == "5e-3" and doc["config"]["model"] == "dot"
    assert doc["config"]["wd"] == MODEL_DEFAULTS["dot"]["wd"]
    assert doc["config"]["batch_size"] == MODEL_DEFAULTS["dot"]["batch_size"]
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,rating\n1,2,4\n3,4,oops\n")
    res = subprocess.run([*cmd[:5], "--ratings", str(bad), "--json"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "bad.csv" in res.stderr and "rating" in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["exit_code"] == 2
