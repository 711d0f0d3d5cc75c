"""Tests for the random-forest validation checks on small synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from modeling import forest
from modeling.errors import DataError
from modeling.forest import (
    AdversarialResult,
    ForestConfig,
    adversarial_validation,
    embedding_features,
    error_by_confidence,
    fit_forest_regressor,
    permutation_importance_check,
    plot_adversarial,
    plot_confidence,
    plot_importance,
    rf_baseline,
    tree_confidence,
)

SMALL = ForestConfig(n_estimators=30, seed=0)


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(y_true) - np.asarray(y_pred)) ** 2)))


def nonlinear(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """y = sin(2 x0) + x1^2 + a step on an integer code; `noise` carries no signal."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(
        {
            "x0": rng.uniform(-2, 2, n).astype(np.float32),
            "x1": rng.uniform(-2, 2, n).astype(np.float32),
            "code": rng.integers(0, 5, n).astype(np.int64),
            "noise": rng.normal(size=n).astype(np.float32),
        }
    )
    y = (
        np.sin(2 * X["x0"].to_numpy())
        + X["x1"].to_numpy() ** 2
        + 0.5 * (X["code"].to_numpy() == 3)
        + rng.normal(0, 0.1, n)
    )
    return X, y


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]:
    X_train, y_train = nonlinear(3000, seed=1)
    X_valid, y_valid = nonlinear(1000, seed=2)
    return X_train, y_train, X_valid, y_valid


@pytest.fixture(scope="module")
def baseline(data):
    return rf_baseline(*data, metric=rmse, cfg=SMALL)


# --------------------------------------------------------------------------- baseline


def test_baseline_beats_mean_by_wide_margin(data, baseline) -> None:
    _, y_train, _, y_valid = data
    mean_rmse = rmse(y_valid, np.full_like(y_valid, y_train.mean()))
    assert baseline.valid_score < 0.35 * mean_rmse
    assert baseline.valid_score == pytest.approx(rmse(y_valid, baseline.valid_pred))
    assert 0.8 < baseline.oob_r2 <= 1.0
    assert baseline.train_seconds > 0
    assert baseline.n_train_rows == 3000


def test_baseline_to_dict_is_plain_json(baseline) -> None:
    d = baseline.to_dict()
    assert set(d) == {"valid_score", "oob_r2", "train_seconds", "n_train_rows"}
    assert json.loads(json.dumps(d)) == d
    assert "model" not in repr(baseline) and "valid_pred" not in repr(baseline)


def test_max_rows_sampling_is_honoured(data) -> None:
    cfg = ForestConfig(n_estimators=25, max_rows=500, seed=0)
    result = rf_baseline(*data, metric=rmse, cfg=cfg)
    assert result.n_train_rows == 500
    # The forest really saw 500 rows: one OOB prediction per training row.
    assert result.model.oob_prediction_.shape == (500,)


def test_baseline_is_deterministic_under_seed(data) -> None:
    cfg = ForestConfig(n_estimators=25, max_rows=1000, seed=7)
    a = rf_baseline(*data, metric=rmse, cfg=cfg)
    b = rf_baseline(*data, metric=rmse, cfg=cfg)
    c = rf_baseline(*data, metric=rmse, cfg=ForestConfig(n_estimators=25, max_rows=1000, seed=8))
    np.testing.assert_array_equal(a.valid_pred, b.valid_pred)
    assert a.oob_r2 == b.oob_r2
    assert not np.array_equal(a.valid_pred, c.valid_pred)


def test_bad_inputs_raise_data_error(data) -> None:
    X, y, _, _ = data
    with pytest.raises(DataError, match="'s'"):
        fit_forest_regressor(X.assign(s="a"), y, SMALL)
    with pytest.raises(DataError, match="rows"):
        fit_forest_regressor(X, y[:-1], SMALL)
    y_bad = y.copy()
    y_bad[17] = np.nan
    with pytest.raises(DataError, match="row 17"):
        fit_forest_regressor(X, y_bad, SMALL)
    with pytest.raises(DataError, match="columns"):
        rf_baseline(X, y, X.drop(columns="noise"), y, metric=rmse, cfg=SMALL)
    with pytest.raises(ValueError):
        ForestConfig(max_features=0.0)


# --------------------------------------------------------------------------- adversarial


def test_adversarial_same_distribution_is_indistinguishable() -> None:
    X_a, _ = nonlinear(1500, seed=3)
    X_b, _ = nonlinear(1500, seed=4)
    result = adversarial_validation(X_a, X_b, cfg=SMALL)
    assert 0.4 < result.auc < 0.6
    assert result.n_rows == 3000
    again = adversarial_validation(X_a, X_b, cfg=SMALL)
    assert again.auc == result.auc and again.top_features == result.top_features


def test_adversarial_detects_shifted_feature() -> None:
    X_a, _ = nonlinear(1500, seed=3)
    X_b, _ = nonlinear(1500, seed=4)
    X_b["x1"] = X_b["x1"] + 3.0  # overlap of 1/4 of the range: Bayes AUC ~0.97
    result = adversarial_validation(X_a, X_b, cfg=SMALL, top=2)
    assert result.auc > 0.9
    assert result.top_features[0][0] == "x1"
    assert len(result.top_features) == 2
    assert result.top_features[0][1] >= result.top_features[1][1]
    assert json.loads(json.dumps(result.to_dict()))["top_features"][0][0] == "x1"


def test_adversarial_sample_is_balanced_and_capped() -> None:
    X_a, _ = nonlinear(2000, seed=3)
    X_b, _ = nonlinear(300, seed=4)
    assert adversarial_validation(X_a, X_b, cfg=SMALL).n_rows == 600
    capped = ForestConfig(n_estimators=10, max_rows=400)
    assert adversarial_validation(X_a, X_b, cfg=capped).n_rows == 400


# --------------------------------------------------------------------------- permutation importance


def test_permutation_importance_ranks_signal_above_noise(data, baseline) -> None:
    _, _, X_valid, y_valid = data
    ranked = permutation_importance_check(
        baseline.model, X_valid, y_valid, metric=rmse, n_repeats=2, max_rows=800
    )
    names = [n for n, _ in ranked]
    scores = dict(ranked)
    assert sorted(names) == sorted(X_valid.columns)
    assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True)
    assert names.index("x1") < names.index("noise")
    assert names.index("x0") < names.index("noise")
    assert scores["x1"] > 0.5  # shuffling x1 costs a lot of RMSE
    assert abs(scores["noise"]) < 0.1 * scores["x1"]


# --------------------------------------------------------------------------- tree spread


def proxy_data(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """x1 is a near-copy of x0; y depends on x0 only."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-2, 2, n)
    X = pd.DataFrame({"x0": x0, "x1": x0 + rng.normal(0, 0.05, n)})
    return X, 2 * x0 + rng.normal(0, 0.1, n)


def test_tree_confidence_grows_out_of_distribution() -> None:
    X, y = proxy_data(2000, seed=5)
    model = fit_forest_regressor(X, y, ForestConfig(n_estimators=30, seed=0))
    X_in, _ = proxy_data(300, seed=6)
    # Combinations never seen in training: trees splitting on x0 and on x1 disagree.
    X_out = pd.DataFrame({"x0": X_in["x0"].to_numpy(), "x1": -X_in["x0"].to_numpy()})
    std_in = tree_confidence(model, X_in)
    std_out = tree_confidence(model, X_out)
    assert std_in.shape == (300,) and std_out.shape == (300,)
    assert (std_in >= 0).all() and (std_out >= 0).all()
    assert std_out.mean() > 3 * std_in.mean()


def test_tree_confidence_chunking_matches_direct_stack(baseline, data, monkeypatch) -> None:
    X_valid = data[2].iloc[:257]
    direct = np.stack(
        [t.predict(X_valid.to_numpy(np.float32)) for t in baseline.model.estimators_]
    ).std(axis=0)
    monkeypatch.setattr(forest, "_CONFIDENCE_CHUNK_ROWS", 50)
    np.testing.assert_allclose(tree_confidence(baseline.model, X_valid), direct, rtol=1e-10)


def test_tree_confidence_rejects_unfitted() -> None:
    from sklearn.ensemble import RandomForestRegressor

    with pytest.raises(ValueError, match="fitted"):
        tree_confidence(RandomForestRegressor(), pd.DataFrame({"a": [1.0]}))


# --------------------------------------------------------------------------- error by confidence


def test_error_by_confidence_rmse_grows_with_spread() -> None:
    rng = np.random.default_rng(0)
    std = rng.uniform(0.1, 2.0, 5000)
    y_true = rng.normal(size=5000)
    y_pred = y_true + rng.normal(size=5000) * std  # error scale proportional to spread
    bins = error_by_confidence(std, y_true, y_pred, bins=5)
    assert len(bins) == 5
    assert sum(b["n"] for b in bins) == 5000
    assert all(b["n"] == 1000 for b in bins)
    rmses = [b["rmse"] for b in bins]
    stds = [b["std_mean"] for b in bins]
    assert all(a < b for a, b in zip(rmses, rmses[1:], strict=False))
    assert all(a < b for a, b in zip(stds, stds[1:], strict=False))
    assert all(b["std_lo"] <= b["std_mean"] <= b["std_hi"] for b in bins)
    assert all(a["std_hi"] <= b["std_lo"] for a, b in zip(bins, bins[1:], strict=False))
    json.dumps(bins)


def test_error_by_confidence_on_real_forest(data, baseline) -> None:
    _, _, X_valid, y_valid = data
    std = tree_confidence(baseline.model, X_valid)
    bins = error_by_confidence(std, y_valid, baseline.valid_pred, bins=4)
    assert bins[-1]["rmse"] > bins[0]["rmse"]


def test_error_by_confidence_edge_cases() -> None:
    # All spreads tied: still equal-count bins; constant error gives that error as RMSE.
    bins = error_by_confidence(np.ones(10), np.zeros(10), np.full(10, 0.5), bins=5)
    assert [b["n"] for b in bins] == [2] * 5
    assert all(b["rmse"] == pytest.approx(0.5) for b in bins)
    assert len(error_by_confidence(np.arange(3.0), np.zeros(3), np.zeros(3), bins=5)) == 3
    with pytest.raises(DataError, match="length"):
        error_by_confidence(np.ones(3), np.zeros(2), np.zeros(3))


# --------------------------------------------------------------------------- embeddings


def test_embedding_features_replaces_codes_with_vectors() -> None:
    X = pd.DataFrame(
        {
            "a": np.array([0, 3, 1, 3], dtype=np.int64),
            "b": np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32),
            "c": np.array([2, 0, 1, 1], dtype=np.int64),
        },
        index=[10, 11, 12, 13],
    )
    emb_a = np.arange(8, dtype=np.float32).reshape(4, 2)
    emb_c = -np.arange(9, dtype=np.float32).reshape(3, 3)
    out = embedding_features(X, {"a": emb_a, "c": emb_c})
    assert list(out.columns) == ["a_emb0", "a_emb1", "b", "c_emb0", "c_emb1", "c_emb2"]
    assert list(out.index) == [10, 11, 12, 13]
    assert out.shape == (4, 6)
    np.testing.assert_array_equal(out.loc[11, ["a_emb0", "a_emb1"]].to_numpy(), [6.0, 7.0])
    np.testing.assert_array_equal(out.loc[10, ["c_emb0", "c_emb1", "c_emb2"]], [-6, -7, -8])
    np.testing.assert_array_equal(out["b"].to_numpy(), X["b"].to_numpy())
    # Rows with the same code get the same vector.
    np.testing.assert_array_equal(
        out.loc[11, ["a_emb0", "a_emb1"]], out.loc[13, ["a_emb0", "a_emb1"]]
    )


def test_embedding_features_rejects_bad_codes() -> None:
    X = pd.DataFrame({"a": np.array([0, 5], dtype=np.int64), "f": [0.1, 0.2]})
    with pytest.raises(DataError, match="'a'.*row 1"):
        embedding_features(X, {"a": np.zeros((4, 2))})
    with pytest.raises(DataError, match="not in frame"):
        embedding_features(X, {"zz": np.zeros((4, 2))})
    with pytest.raises(DataError, match="integer codes"):
        embedding_features(X, {"f": np.zeros((4, 2))})


# --------------------------------------------------------------------------- plots


def is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_non_empty_pngs(tmp_path) -> None:
    items = [("x1", 0.9), ("x0", 0.4), ("noise", 0.01)]
    p1 = plot_importance(items, tmp_path / "sub" / "imp.png", title="Permutation importance")
    p2 = plot_adversarial(
        AdversarialResult(auc=0.73, top_features=items, n_rows=100), tmp_path / "adv.png"
    )
    bins = error_by_confidence(np.arange(20.0), np.zeros(20), np.arange(20.0), bins=4)
    p3 = plot_confidence(bins, tmp_path / "conf.png")
    for p in (p1, p2, p3):
        assert p.exists() and is_png(p)
