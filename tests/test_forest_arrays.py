"""Forests as plain arrays (modeling.forest_arrays) and the bundle's spread forest (modeling.forest)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.ensemble import RandomForestRegressor

from modeling.errors import DataError
from modeling.forest import ForestConfig, error_by_confidence, fit_spread_forest, tree_confidence
from modeling.forest_arrays import FIELDS, ForestArrays


def _random_forest(nan_in_fit: bool, seed: int = 0, **kw) -> tuple[RandomForestRegressor, np.random.Generator]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3000, 6)).astype(np.float32)
    X[:, 5] = rng.integers(0, 7, 3000)  # an integer code column, as the processor gives
    if nan_in_fit:
        X[rng.random(X.shape) < 0.1] = np.nan
    y = np.nan_to_num(X[:, 0]) * 2 + np.nan_to_num(X[:, 1]) ** 2 + (X[:, 5] == 3) + rng.normal(0, 0.3, 3000)
    y = np.where(np.isnan(X[:, 2]), 4.0, y)  # missingness carries signal, so NaN routing matters
    params = dict(n_estimators=12, min_samples_leaf=2, max_features=0.5, random_state=seed) | kw
    return RandomForestRegressor(**params).fit(X, y), rng


def _query(rng: np.random.Generator, n: int = 5000) -> np.ndarray:
    X = rng.normal(size=(n, 6)) * 2.5  # float64 with values beyond the training range
    X[:, 5] = rng.integers(-1, 9, n)
    X[rng.random(X.shape) < 0.15] = np.nan
    return X


@pytest.mark.parametrize("nan_in_fit", [True, False])
def test_each_tree_matches_sklearn_exactly(nan_in_fit):
    model, rng = _random_forest(nan_in_fit)
    arrays = ForestArrays.from_sklearn(model)
    X = _query(rng)
    got = arrays.predict_trees(X)
    want = np.stack([t.predict(X) for t in model.estimators_])
    assert got.shape == (12, len(X))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(arrays.predict(X), model.predict(X), rtol=1e-12, atol=1e-12)
    # rows exactly on a threshold go left, as in sklearn (float32 value vs float64 threshold)
    internal = np.flatnonzero((arrays.feature >= 0) & np.isfinite(arrays.threshold))[:200]
    X_edge = np.zeros((len(internal), 6), dtype=np.float32)
    X_edge[np.arange(len(internal)), arrays.feature[internal]] = arrays.threshold[internal].astype(np.float32)
    np.testing.assert_allclose(arrays.predict_trees(X_edge), np.stack([t.predict(X_edge) for t in model.estimators_]),
                               rtol=0, atol=1e-9)


def test_chunked_walk_matches_one_pass(monkeypatch):
    import modeling.forest_arrays as fa

    model, rng = _random_forest(True, seed=3)
    X = _query(rng, 1000)
    one = ForestArrays.from_sklearn(model).predict_trees(X)
    monkeypatch.setattr(fa, "_PAIRS_PER_STEP", 12 * 37)  # 37 rows per step
    np.testing.assert_array_equal(ForestArrays.from_sklearn(model).predict_trees(X), one)


def test_single_leaf_trees_and_empty_input():
    X = np.zeros((50, 2))
    model = RandomForestRegressor(n_estimators=3, random_state=0).fit(X, np.full(50, 2.5))
    arrays = ForestArrays.from_sklearn(model)
    assert arrays.n_nodes == 3 and arrays.depths().max() == 0
    np.testing.assert_array_equal(arrays.predict_trees(np.ones((4, 2))), np.full((3, 4), 2.5))
    assert arrays.predict_trees(np.empty((0, 2))).shape == (3, 0)
    with pytest.raises(DataError, match="2 feature columns"):
        arrays.predict_trees(np.ones((4, 3)))


def test_safetensors_round_trip_is_exact(tmp_path):
    model, rng = _random_forest(True)
    arrays = ForestArrays.from_sklearn(model)
    flat = arrays.to_arrays()
    assert sorted(flat) == sorted(f"forest_{k}" for k in FIELDS)
    save_file({k: torch.from_numpy(v) for k, v in flat.items()}, str(tmp_path / "w.safetensors"))
    back = ForestArrays.from_arrays(load_file(str(tmp_path / "w.safetensors")), n_features=6)
    X = _query(rng, 500)
    np.testing.assert_array_equal(back.predict_trees(X), arrays.predict_trees(X))
    assert back.nbytes == arrays.nbytes == 29 * arrays.n_nodes + 8 * (arrays.n_trees + 1)


def test_corrupt_arrays_are_refused():
    model, _ = _random_forest(False)
    good = ForestArrays.from_sklearn(model).to_arrays()

    def broken(**changes: np.ndarray) -> dict[str, np.ndarray]:
        return {**{k: v.copy() for k, v in good.items()}, **changes}

    cl = good["forest_children_left"].copy()
    root_left = cl[0]
    cl[root_left if cl[root_left] >= 0 else 0] = 0  # a cycle back to the root
    with pytest.raises(DataError, match="ancestor"):
        ForestArrays.from_arrays(broken(forest_children_left=cl), n_features=6)
    with pytest.raises(DataError, match="offsets"):
        ForestArrays.from_arrays(broken(forest_offsets=good["forest_offsets"][:-1]), n_features=6)
    with pytest.raises(DataError, match="feature index"):
        ForestArrays.from_arrays(good, n_features=3)
    with pytest.raises(DataError, match="missing"):
        ForestArrays.from_arrays({k: v for k, v in good.items() if k != "forest_value"}, n_features=6)


def test_only_single_output_regressors_export():
    from sklearn.ensemble import RandomForestClassifier

    X = np.random.default_rng(0).normal(size=(100, 2))
    with pytest.raises(ValueError, match="regression"):
        ForestArrays.from_sklearn(RandomForestClassifier(n_estimators=2).fit(X, X[:, 0] > 0))
    with pytest.raises(ValueError, match="single-output"):
        ForestArrays.from_sklearn(RandomForestRegressor(n_estimators=2).fit(X, X))
    with pytest.raises(ValueError, match="fitted"):
        ForestArrays.from_sklearn(RandomForestRegressor())


# --------------------------------------------------------------------------- spread forest


def heteroscedastic(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Noise grows with x1; the code column carries a step."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"x0": rng.uniform(-2, 2, n).astype(np.float32),
                      "x1": rng.uniform(0, 2, n).astype(np.float32),
                      "code": rng.integers(0, 5, n).astype(np.int64)})
    y = np.sin(2 * X["x0"].to_numpy()) + 0.5 * (X["code"].to_numpy() == 3)
    return X, y + rng.normal(0, 1, n) * 0.05 * (1 + 4 * X["x1"].to_numpy() ** 2)


def test_spread_forest_is_capped_and_its_spread_tracks_the_error():
    X, y = heteroscedastic(6000, seed=1)
    cfg = ForestConfig(n_estimators=16, max_leaf_nodes=64, max_rows=4000, seed=0)
    sf = fit_spread_forest(X, y, cfg)
    info = sf.info()
    json.dumps(info)
    assert info["n_trees"] == 16 and info["n_nodes"] <= 16 * (2 * 64 - 1) and info["n_train_rows"] == 4000
    assert info["features"] == ["x0", "x1", "code"] and info["bytes"] == sf.arrays.nbytes

    X_new, y_new = heteroscedastic(4000, seed=2)
    mean, spread = sf.arrays.spread(X_new)
    assert (spread >= 0).all()
    bins = error_by_confidence(spread, y_new, mean, bins=4)
    rmses = [b["rmse"] for b in bins]
    assert rmses[-1] > 1.5 * rmses[0]
    assert rmses == sorted(rmses)
    # out of distribution (x1 far outside [0, 2] is still in the last leaf; an unseen code is not)
    far = X_new.assign(code=np.int64(9), x0=np.float32(-7))
    assert sf.arrays.spread(far)[1].mean() >= spread.mean()


def test_spread_forest_agrees_with_tree_confidence_on_the_same_model():
    from modeling.forest import fit_forest_regressor

    X, y = heteroscedastic(2000, seed=4)
    cfg = ForestConfig(n_estimators=8, max_leaf_nodes=32, seed=0)
    model = fit_forest_regressor(X, y, cfg, oob=False)
    arrays = ForestArrays.from_sklearn(model)
    np.testing.assert_allclose(arrays.spread(X)[1], tree_confidence(model, X), rtol=1e-10, atol=1e-12)
    assert all(len(np.unique(t.tree_.children_left < 0)) == 2 for t in model.estimators_)
    assert max(t.tree_.n_leaves for t in model.estimators_) <= 32


def test_forest_config_rejects_a_bad_leaf_cap():
    with pytest.raises(ValueError, match="max_leaf_nodes"):
        ForestConfig(max_leaf_nodes=1)
