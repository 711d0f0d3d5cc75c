"""The ratings job with its ranking head, end to end: metrics in `train --json`, the bundle's two
heads, cold-start ratings for new users (predict, batch, HTTP), interaction data without ratings
(exit 2 / 422 for rating predictions), and the edges of top-k."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from modeling.bundle import resolve_bundle_dir
from modeling.errors import DataError
from modeling.predictors import RatingsPredictor, load_predictor
from pipelines.batch import recommend_file, score_file
from pipelines.jobs.ratings import RatingsConfig, train_ratings
from pipelines.synth import write_ratings
from service import Settings, create_app

_PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
RANKING_KEYS = ("precision_at_10", "recall_at_10", "ndcg_at_10", "map_at_10", "coverage_at_10")


@pytest.fixture(scope="module")
def store(fresh_module_store: Path) -> Path:
    """A module-wide sqlite MLflow store as the working directory and tracking URI."""
    return fresh_module_store


@pytest.fixture(scope="module")
def files(store: Path) -> dict[str, Path]:
    return write_ratings(store / "data", users=300, items=400, ratings=20_000, seed=1, choice=4.0)


def _cfg(ratings: Path | str, **kw: object) -> RatingsConfig:
    base = dict(ratings=str(ratings), epochs=3, lr="1e-2", batch_size=512, ranking_epochs=8, seed=0, quiet=True)
    base.update(kw)
    return RatingsConfig(**base)  # type: ignore[arg-type]


@contextlib.contextmanager
def _serve(models: dict[str, str]) -> Iterator[TestClient]:
    """The service over `models` in-process, once every model has loaded."""
    with TestClient(create_app(Settings(models=models, tracking_uri=os.environ["MLFLOW_TRACKING_URI"]))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.1)
        yield client


def _env(store: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"], "PATH": str(Path(sys.executable).parent),
            **_PYTHONPATH}


# ---------------------------------------------------------------- metrics and the two heads
def test_train_json_reports_ranking_metrics_beside_popularity(files, store):
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "ratings", "--ratings", str(files["u.data"]),
           "--split", "user-stratified", "--valid-frac", "0.25", "--epochs", "2", "--ranking-epochs", "10",
           "--json", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(store), cwd=store, timeout=600)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    m = doc["metrics"]
    for key in ("valid_rmse", "valid_mae", "baseline_rmse", "adversarial_auc", "rf_valid_rmse", *RANKING_KEYS,
                *(f"pop_{k}" for k in RANKING_KEYS), "rating_model_precision_at_10", "ranking_train_seconds",
                "valid_rmse_known_user", "baseline_rmse_known_user", "valid_rows_unknown_user",
                "valid_rows_known_item"):
        assert key in m and np.isfinite(m[key]), key
    assert m["valid_rows_unknown_user"] == 0  # user-stratified: every validation user is known
    assert m["ranking_eval_users"] == 300
    assert m["precision_at_10"] > m["pop_precision_at_10"]  # taste decides part of the choices
    assert m["precision_at_10"] > m["rating_model_precision_at_10"]
    assert doc["config"]["split"] == "user-stratified" and doc["config"]["ranking_loss"] == "softmax"
    assert doc["config"]["ranking_epochs"] == 10 and doc["config"]["ranking"] is True
    assert doc["train_seconds"] >= m["ranking_train_seconds"] > 0
    bundle = resolve_bundle_dir(doc["model_uri"])
    pred = load_predictor(str(bundle))
    assert isinstance(pred, RatingsPredictor)
    assert pred.spec.ranking is not None and pred.ranker is not pred.model
    assert pred.spec.training["ranking_loss"] == "softmax"
    # seen items: everything each user rated in train and valid, so nothing rated is recommended
    ratings = pd.read_csv(files["u.data"], sep="\t", names=["user", "item", "rating", "ts"]).astype(str)
    users = ratings["user"].unique()[:40].tolist()
    rated = set(zip(ratings["user"], ratings["item"], strict=True))
    for answer in pred.recommend(users, k=10):
        assert len(answer["items"]) == 10
        assert not any((answer["user"], i["item"]) in rated for i in answer["items"])
    # the ranking head answers top-k and similar items; the rating model the ratings
    from modeling.collab import top_k_for_users

    idx, _, _ = pred.top_k(users[:5], k=10)
    own, _ = top_k_for_users(pred.ranker, pred.user_index(users[:5]), 10, (pred.seen_indptr, pred.seen_indices))
    assert np.array_equal(idx, own)


def test_no_ranking_and_bpr_flags(files, store):
    off = train_ratings(_cfg(files["u.data"], ranking=False))
    pred = load_predictor(str(resolve_bundle_dir(off["model_uri"])))
    assert pred.spec.ranking is None and pred.ranker is pred.model
    assert "ranking_train_seconds" not in off["metrics"] and "rating_model_precision_at_10" not in off["metrics"]
    assert {*RANKING_KEYS, "pop_precision_at_10"} <= off["metrics"].keys()  # the rating model ranks
    bpr = train_ratings(_cfg(files["u.data"], ranking_loss="bpr", ranking_epochs=3))
    assert bpr["config"]["ranking_batch_size"] == 1024  # the bpr default, in pairs
    pred = load_predictor(str(resolve_bundle_dir(bpr["model_uri"])))
    assert pred.spec.ranking is not None and pred.spec.training["ranking_loss"] == "bpr"
    with pytest.raises(DataError, match="--ranking-loss"):
        train_ratings(_cfg(files["u.data"], ranking_loss="warp"))


# ---------------------------------------------------------------- new users
@pytest.fixture(scope="module")
def new_user_split(files: dict[str, Path], store: Path) -> dict[str, Path]:
    """Hold out whole users: 40% of the users are in validation only (plus 10% of the others' rows)."""
    df = pd.read_csv(files["u.data"], sep="\t", names=["user", "item", "rating", "timestamp"])
    rng = np.random.default_rng(0)
    new = rng.choice(df["user"].unique(), size=120, replace=False)
    valid = df["user"].isin(new).to_numpy() | (rng.random(len(df)) < 0.1)
    out = {"train": store / "nu_train.csv", "valid": store / "nu_valid.csv"}
    df[~valid].to_csv(out["train"], index=False)
    df[valid].to_csv(out["valid"], index=False)
    return out


@pytest.mark.parametrize("model", ["dot", "nn"])
def test_unknown_users_get_the_bias_baseline_never_worse(new_user_split, store, model):
    res = train_ratings(_cfg(new_user_split["train"], valid=str(new_user_split["valid"]), model=model,
                             ranking_epochs=2))
    m = res["metrics"]
    assert m["valid_rows_unknown_user"] > 0.5 * (m["valid_rows_unknown_user"] + m["valid_rows_known_user"])
    assert m["valid_rmse_unknown_user"] <= m["baseline_rmse_unknown_user"] + 1e-9
    assert m["valid_rmse_unknown_user"] < m["global_mean_rmse"]
    pred = load_predictor(str(resolve_bundle_dir(res["model_uri"])))
    base = pred.baseline
    assert base is not None and base.mu == pytest.approx(pred.spec.global_mean)
    known_u, known_i = pred.users[3], pred.items[5]
    rows = pd.DataFrame({"user": ["nobody", known_u, "nobody", known_u],
                         "item": [known_i, "no-such-item", "no-such-item", known_i]})
    out = pred.predict(rows)
    u, i = pred.user_index([known_u])[0], pred.item_index([known_i])[0]
    assert out[:3].tolist() == pytest.approx([np.clip(base.mu + base.item_bias[i], 1, 5),
                                              np.clip(base.mu + base.user_bias[u], 1, 5), base.mu], abs=1e-9)
    assert out[3] != pytest.approx(base.mu + base.user_bias[u] + base.item_bias[i])  # known pair: the model
    if model == "dot":  # the batch job and HTTP answer through the same predictor
        rows.to_csv(store / "pairs.csv", index=False)
        score_file(res["model_uri"], store / "pairs.csv", store / "pairs_out.parquet", quiet=True, track=False)
        got = pq.read_table(store / "pairs_out.parquet").to_pandas()
        np.testing.assert_allclose(got["prediction"], out, rtol=1e-6)
        with _serve({"r": res["model_uri"]}) as client:
            body = client.post("/v1/models/r/predict", json={"records": rows.to_dict("records")}).json()
        np.testing.assert_allclose(body["predictions"], out, rtol=1e-6)


# ---------------------------------------------------------------- interactions without ratings
@pytest.fixture(scope="module")
def clicks(store: Path) -> dict:
    # Its own, larger taste data: the head's epochs and popularity prior are chosen on an inner
    # split of the training pairs, and on the 300-user file above the head's edge over
    # popularity at 6 epochs is within that split's noise (it then serves popularity: equal).
    files = write_ratings(store / "clicks_data", users=600, items=600, ratings=30_000, seed=1, choice=4.0)
    df = pd.read_csv(files["u.data"], sep="\t", names=["user", "item", "rating", "timestamp"])
    clicks = df[["user", "item", "timestamp"]].rename(columns={"user": "visitor_id", "item": "product_id"})
    clicks = pd.concat([clicks, clicks.iloc[::7]])  # repeated clicks count once
    path = store / "clicks.csv"
    clicks.to_csv(path, index=False)
    res = train_ratings(_cfg(path, split="user-stratified", valid_frac=0.25, ranking_epochs=6, register="clicks"))
    return {"path": path, "result": res, "frame": clicks}


def test_interactions_only_trains_the_ranking_head_and_refuses_ratings(clicks, store):
    res, m = clicks["result"], clicks["result"]["metrics"]
    assert "valid_rmse" not in m and "rf_valid_rmse" not in m
    assert {*RANKING_KEYS, *(f"pop_{k}" for k in RANKING_KEYS), "adversarial_auc"} <= m.keys()
    assert m["precision_at_10"] > m["pop_precision_at_10"]
    assert res["registered"]["metric"] == "ndcg_at_10"
    assert res["config"]["epochs"] == 6 and res["config"]["batch_size"] == res["config"]["ranking_batch_size"]
    pred = load_predictor("models:/clicks@champion")
    assert pred.spec.interactions_only and not pred.predicts_ratings and pred.spec.ranking is None
    pairs = pd.DataFrame({"user": ["1", "2"], "item": ["3", "4"]})
    with pytest.raises(DataError, match="interactions without ratings"):
        pred.predict(pairs)
    [rec] = pred.recommend(["1"], k=5)
    assert len(rec["items"]) == 5 and not rec["cold_start"]
    assert len(pred.similar(pred.items[0], k=3)) == 3
    # CLI: score exits 2 naming the model; recommend works
    pairs.to_csv(store / "click_pairs.csv", index=False)
    cli = [sys.executable, "-m", "pipelines.cli"]
    bad = subprocess.run([*cli, "score", "--model", "models:/clicks@champion", "--input", str(store / "click_pairs.csv"),
                          "--output", str(store / "click_scores.parquet"), "--no-track", "--json", "--quiet"],
                         capture_output=True, text=True, env=_env(store), cwd=store, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert "models:/clicks@champion" in bad.stderr and "interactions without ratings" in bad.stderr
    assert not (store / "click_scores.parquet").exists()
    ok = subprocess.run([*cli, "recommend", "--model", "models:/clicks@champion", "--output",
                         str(store / "click_top.parquet"), "--k", "3", "--no-track", "--json", "--quiet"],
                        capture_output=True, text=True, env=_env(store), cwd=store, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert len(pq.read_table(store / "click_top.parquet")) == 3 * len(pred.users)
    # HTTP: 422 naming the model for predictions, recommendations as usual
    with _serve({"clicks": "models:/clicks@champion"}) as client:
        r = client.post("/v1/models/clicks/predict", json={"records": pairs.to_dict("records")})
        assert r.status_code == 422
        assert "models:/clicks@champion" in r.json()["detail"][0]["msg"]
        assert client.post("/invocations", json={"dataframe_records": pairs.to_dict("records")}).status_code == 422
        rec = client.get("/v1/models/clicks/users/1/recommendations", params={"k": 4})
        assert rec.status_code == 200 and len(rec.json()["items"]) == 4


def test_interactions_need_known_validation_users(store):
    train, valid = store / "few.csv", store / "few_valid.csv"
    pd.DataFrame({"user": ["a", "a", "b", "b"], "item": ["x", "y", "x", "z"]}).to_csv(train, index=False)
    pd.DataFrame({"user": ["c", "d"], "item": ["x", "y"]}).to_csv(valid, index=False)
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(DataError, match="no validation user is known"):
        train_ratings(_cfg(train, valid=str(valid)))
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before  # failed before any run


# ---------------------------------------------------------------- top-k edges
def test_user_who_rated_everything_gets_an_empty_list_and_k_beyond_the_catalogue(files, store):
    df = pd.read_csv(files["u.data"], sep="\t", names=["user", "item", "rating", "timestamp"])
    items = np.sort(df["item"].unique())
    everything = pd.DataFrame({"user": 9999, "item": items, "rating": 4, "timestamp": 1})
    path = store / "with_completist.data"
    pd.concat([df, everything]).to_csv(path, sep="\t", header=False, index=False)
    res = train_ratings(_cfg(path, ranking_epochs=2))
    pred = load_predictor(str(resolve_bundle_dir(res["model_uri"])))
    [done] = pred.recommend([9999], k=10)
    assert done == {"user": "9999", "cold_start": False, "items": []}
    other = str(df["user"].iloc[0])
    n_seen = int(pred.seen_indptr[pred.user_index([other])[0] + 1] - pred.seen_indptr[pred.user_index([other])[0]])
    [many] = pred.recommend([other], k=5000)
    assert len(many["items"]) == len(pred.items) - n_seen
    assert len({i["item"] for i in many["items"]}) == len(many["items"])
    [cold] = pred.recommend(["stranger"], k=5000)
    assert cold["cold_start"] and 0 < len(cold["items"]) <= len(pred.items)
    out = recommend_file(res["model_uri"], store / "edge.parquet", users=None, k=len(pred.items) + 50,
                         quiet=True, track=False)
    table = pq.read_table(store / "edge.parquet").to_pandas()
    assert out["rows_out"] == len(table) and (table["user"] != "9999").all()
