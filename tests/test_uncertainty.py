"""Per-row uncertainty: the Rossmann bundle's spread forest, `score --uncertainty`, and old bundles."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modeling.errors import DataError
from modeling.forest import error_by_confidence
from modeling.forest_arrays import FIELDS
from modeling.predictors import load_predictor
from pipelines.batch import score_file


@pytest.fixture(scope="module")
def old_bundle(bundles: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Rossmann bundle as training wrote it before the spread forest: no forest_* tensors,
    no `uncertainty` entry."""
    path = tmp_path_factory.mktemp("old") / "bundle"
    shutil.copytree(bundles["rossmann"], path)
    weights = path / "weights.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("extra.forest_")}, str(weights))
    doc = json.loads((path / "bundle.json").read_text())
    doc.pop("uncertainty")
    doc["extras"] = [e for e in doc["extras"] if not e.startswith("forest_")]
    (path / "bundle.json").write_text(json.dumps(doc))
    return path


def _test_csv(model_store: dict) -> Path:
    return Path(model_store["rossmann_data"]["test.csv"])


def _sizes(bundle: str | Path) -> dict[str, int]:
    tensors = load_file(str(Path(bundle) / "weights.safetensors"))
    forest = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("extra.forest_"))
    return {"weights_file": (Path(bundle) / "weights.safetensors").stat().st_size, "forest": forest}


def test_bundle_carries_a_capped_forest_over_the_processor_columns(bundles, old_bundle):
    raw = json.loads((Path(bundles["rossmann"]) / "bundle.json").read_text())
    info = raw["uncertainty"]
    proc = load_predictor(bundles["rossmann"]).processor
    assert info["method"] == "forest_tree_std" and info["target"] == "log(Sales)"
    assert info["features"] == [*proc.cat_names_out, *proc.cont_names]
    assert info["n_trees"] == raw["training"]["spread_trees"] == 20
    assert info["n_nodes"] <= info["n_trees"] * (2 * raw["training"]["spread_leaves"] - 1)
    assert sum(b["n"] for b in info["valid_bins"]) > 0
    tensors = load_file(str(Path(bundles["rossmann"]) / "weights.safetensors"))
    assert {f"extra.forest_{k}" for k in FIELDS} <= set(tensors)
    new, old = _sizes(bundles["rossmann"]), _sizes(old_bundle)
    assert new["forest"] == info["bytes"]
    assert new["weights_file"] - old["weights_file"] < info["bytes"] + 4096  # tensors plus header entries


def test_score_with_uncertainty_adds_spread_zero_for_closed_stores(model_store, bundles, tmp_path):
    test = pd.read_csv(_test_csv(model_store))
    plain = score_file(bundles["rossmann"], _test_csv(model_store), tmp_path / "plain.parquet", quiet=True,
                       track=False)
    res = score_file(bundles["rossmann"], _test_csv(model_store), tmp_path / "unc.parquet", quiet=True,
                     track=False, uncertainty=True, submission_csv=tmp_path / "sub.csv")
    got = pq.read_table(tmp_path / "unc.parquet").to_pandas()
    assert list(got.columns) == ["Id", "prediction", "spread"] and res["uncertainty"] is True
    base = pq.read_table(tmp_path / "plain.parquet").to_pandas()
    np.testing.assert_array_equal(got["prediction"].to_numpy(), base["prediction"].to_numpy())
    assert plain["rows_out"] == res["rows_out"] == len(test)
    closed = (test["Open"] == 0).to_numpy()
    assert closed.any() and (got["spread"][closed] == 0).all()
    assert (got["spread"][~closed] > 0).all() and got["spread"].lt(2.0).all()
    assert res["spread_mean"] == pytest.approx(got["spread"][~closed].mean(), abs=1e-3)  # rounded
    assert pd.read_csv(tmp_path / "sub.csv").columns.tolist() == ["Id", "Sales"]  # submission unchanged

    pred, spread = load_predictor(bundles["rossmann"]).predict_with_spread(test)
    np.testing.assert_array_equal(got["spread"].to_numpy(), spread)
    np.testing.assert_array_equal(got["prediction"].to_numpy(), pred)

    # small chunks (stores split across them) give the same spread row for row
    chunked = score_file(bundles["rossmann"], _test_csv(model_store), tmp_path / "chunked.parquet", quiet=True,
                         track=False, uncertainty=True, batch_rows=100)
    assert chunked["chunk_mode"] == "stream"
    small = pq.read_table(tmp_path / "chunked.parquet").to_pandas().sort_values("Id").reset_index(drop=True)
    np.testing.assert_allclose(small["spread"].to_numpy(), got.sort_values("Id")["spread"].to_numpy(),
                               rtol=1e-12, atol=0)


def test_larger_spread_means_larger_error_on_held_out_days(model_store, bundles):
    """Like the forest check (d): on the last 42 days of train.csv (held out of every fit) the
    rows in the top spread bin have a larger error than those in the bottom bin."""
    predictor = load_predictor(bundles["rossmann"])
    train = pd.read_csv(model_store["rossmann_data"]["train.csv"], parse_dates=["Date"])
    raw = train.drop(columns=["Sales", "Customers"])
    pred, spread = predictor.predict_with_spread(raw)  # one pass: the features training saw
    x_cat, x_cont = predictor.processor.transform(predictor.engineer(raw))
    forest_mean = predictor.forest().predict(np.concatenate([x_cat, x_cont], axis=1))
    held = ((train["Date"] > train["Date"].max() - pd.Timedelta(days=42)) & (train["Sales"] > 0)).to_numpy()
    y = np.log(train["Sales"].to_numpy(np.float64)[held])
    bins = error_by_confidence(spread[held], y, forest_mean[held], bins=4)
    assert bins[-1]["rmse"] > 1.3 * bins[0]["rmse"]
    assert np.mean([b["rmse"] for b in bins[2:]]) > np.mean([b["rmse"] for b in bins[:2]])
    assert (spread[held] > 0).all() and (pred[held] > 0).all()


def test_ratings_model_with_uncertainty_is_a_data_error(model_store, bundles, tmp_path):
    from pipelines.cli import app

    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"user": ["1", "2"], "item": ["1", "2"]}).to_csv(pairs, index=False)
    with pytest.raises(DataError, match="a ratings model has no per-row spread"):
        score_file(bundles["ratings"], pairs, tmp_path / "p.parquet", uncertainty=True, track=False)
    assert not (tmp_path / "p.parquet").exists()
    result = CliRunner().invoke(app, ["score", "--model", bundles["ratings"], "--input", str(pairs), "--output",
                                      str(tmp_path / "p.parquet"), "--uncertainty", "--no-track", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "no per-row spread" in result.output


def test_old_bundle_still_scores_but_refuses_uncertainty_clearly(model_store, bundles, old_bundle, tmp_path):
    test = pd.read_csv(_test_csv(model_store))
    old = load_predictor(str(old_bundle))
    assert not old.has_spread and load_predictor(bundles["rossmann"]).has_spread
    np.testing.assert_array_equal(old.predict(test), load_predictor(bundles["rossmann"]).predict(test))
    with pytest.raises(DataError, match="carries no forest for a per-row spread.*retrain"):
        old.predict_with_spread(test)
    out = tmp_path / "p.parquet"
    with pytest.raises(DataError, match="carries no forest"):
        score_file(str(old_bundle), _test_csv(model_store), out, uncertainty=True, track=False)
    assert not out.exists()
    res = score_file(str(old_bundle), _test_csv(model_store), out, quiet=True, track=False)
    assert res["rows_out"] == len(test) and pq.read_table(out).column_names == ["Id", "prediction"]


def test_forest_fitted_on_other_columns_is_refused(bundles, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(bundles["rossmann"], path)
    doc = json.loads((path / "bundle.json").read_text())
    doc["uncertainty"]["features"] = list(reversed(doc["uncertainty"]["features"]))
    (path / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="fitted on columns"):
        load_predictor(str(path)).forest()


def test_http_service_serves_new_and_old_bundles_alike(model_store, bundles, old_bundle):
    from fastapi.testclient import TestClient

    from service import Settings, create_app

    rows = pd.read_csv(_test_csv(model_store), nrows=60)
    records = json.loads(rows.to_json(orient="records"))
    want = load_predictor(bundles["rossmann"]).predict(rows)
    app = create_app(Settings(models={"new": bundles["rossmann"], "old": str(old_bundle)}))
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert client.get("/readyz").status_code == 200
        for name in ("new", "old"):
            resp = client.post(f"/v1/models/{name}/predict", json={"records": records})
            assert resp.status_code == 200, resp.text
            np.testing.assert_allclose(np.asarray(resp.json()["predictions"], dtype=float), want, rtol=1e-6)
