"""modeling.inspection: partial dependence and error breakdowns agree with plain loops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from modeling.collab import csr_from_pairs, csr_rows
from modeling.inspection import (
    activity_bins,
    error_breakdown,
    feature_grid,
    module_predictor,
    partial_dependence,
    pick_features,
    ranking_breakdown,
    sample_rows,
    worst_groups,
)
from modeling.metrics import ndcg_at_k, precision_at_k, rmse, rmspe
from modeling.processor import TabularProcessor
from modeling.tabular import TabularModel


@pytest.fixture(scope="module")
def fitted() -> dict:
    rng = np.random.default_rng(0)
    n = 600
    df = pd.DataFrame({
        "kind": rng.choice(["a", "b", "c"], n),
        "level": rng.choice([2, 10, 1, 30], n),  # numbers as categories: vocab order is "1","10","2","30"
        "dist": rng.gamma(2.0, 500.0, n),
    })
    df.loc[::37, "dist"] = np.nan
    proc = TabularProcessor(["kind", "level"], ["dist"]).fit(df)
    x_cat, x_cont = proc.transform(df)
    torch.manual_seed(0)
    card = proc.cardinalities
    model = TabularModel([(card[c], 3) for c in proc.cat_names_out], 1, layers=[8], ps=[0.0])
    return {"df": df, "proc": proc, "x_cat": x_cat, "x_cont": x_cont, "model": model}


def test_partial_dependence_equals_a_loop_over_grid_values(fitted):
    proc, x_cat, x_cont, model = fitted["proc"], fitted["x_cat"], fitted["x_cont"], fitted["model"]
    predict = module_predictor(model, batch_rows=97)  # several batches
    rows = sample_rows(len(x_cat), 50, seed=1)
    for name in ("kind", "level", "dist"):
        grid = feature_grid(proc, name, x_cat, x_cont)
        pd_ = partial_dependence(predict, x_cat, x_cont, grid, rows, n_ice=5)
        expected = []
        for v in grid.values:  # the slow way: one predict per grid value
            xc, xn = x_cat[rows].copy(), x_cont[rows].copy()
            (xc if grid.kind == "cat" else xn)[:, grid.column] = v
            expected.append(predict(xc, xn))
        expected = np.stack(expected, axis=1)
        np.testing.assert_allclose(pd_.average, expected.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(pd_.ice, expected[:5], rtol=1e-5)
        assert pd_.rows == 50 and pd_.ice.shape == (5, len(grid.values))
    assert model.training  # the predictor restores the model's mode


def test_feature_grid_labels_categories_and_raw_units(fitted):
    proc, x_cat, x_cont = fitted["proc"], fitted["x_cat"], fitted["x_cont"]
    level = feature_grid(proc, "level", x_cat, x_cont)
    assert level.labels == ["1", "2", "10", "30"]  # numeric order, not the vocabulary's string order
    assert list(proc.code_to_class("level", level.values)) == level.labels
    kind = feature_grid(proc, "kind", x_cat, x_cont, max_levels=2)
    assert len(kind.labels) == 2 and set(kind.labels) <= {"a", "b", "c"}
    dist = feature_grid(proc, "dist", x_cat, x_cont, points=9)
    raw = fitted["df"]["dist"].fillna(proc.medians["dist"])
    assert dist.kind == "cont" and len(dist.values) <= 9
    assert raw.quantile(0.02) - 1 <= dist.raw.min() and dist.raw.max() <= raw.quantile(0.98) + 1
    np.testing.assert_allclose((dist.raw - proc.means["dist"]) / proc.stds["dist"], dist.values, rtol=1e-4)
    with pytest.raises(KeyError, match="not a model input"):
        feature_grid(proc, "nope", x_cat, x_cont)


def test_pick_features_skips_ids_flags_and_excluded(fitted):
    proc = fitted["proc"]
    importance = [("dist_na", 9.0), ("level", 5.0), ("dist", 3.0), ("kind", 1.0)]
    assert pick_features(importance, proc, n=2) == ["level", "dist"]
    assert pick_features(importance, proc, n=3, exclude=("level",)) == ["dist", "kind"]
    assert pick_features([], proc, n=2, prefer=["kind", "missing"]) == ["kind"]
    assert pick_features(importance, proc, n=5, max_cardinality=4) == ["dist", "kind"]  # level has 5 codes


def test_error_breakdown_and_worst_groups_match_the_metric_per_group():
    rng = np.random.default_rng(3)
    n = 2000
    seg = pd.DataFrame({"store": rng.integers(1, 30, n), "type": rng.choice(["a", "b"], n)})
    y = rng.uniform(100, 1000, n)
    pred = y * (1 + rng.normal(0, 0.1, n) + (seg["type"] == "b").to_numpy() * 0.2)
    y[5] = 0.0  # ignored by RMSPE, as in Kaggle's rule
    table = error_breakdown(seg, y, pred, ["type"], "rmspe")
    for value in ("a", "b"):
        mask = (seg["type"] == value).to_numpy()
        row = table[table["value"] == value].iloc[0]
        assert row["rmspe"] == pytest.approx(rmspe(y[mask], pred[mask]))
        assert row["rows"] == int((mask & (y != 0)).sum())
    assert table["share"].sum() == pytest.approx(1.0)
    worst = worst_groups(seg, y, pred, "store", n=5, describe=["type"])
    assert len(worst) == 5 and list(worst["rmspe"]) == sorted(worst["rmspe"], reverse=True)
    top = worst.iloc[0]
    mask = (seg["store"] == top["store"]).to_numpy() & (y != 0)
    assert top["rmspe"] == pytest.approx(rmspe(y[mask], pred[mask]))
    assert top["bias"] == pytest.approx(pred[mask].mean() / y[mask].mean() - 1)
    per_all = error_breakdown(seg, y, pred, ["store"], "rmse")
    assert per_all["rmse"].max() >= rmse(y, pred) * 0.5 and set(per_all["segment"]) == {"store"}


def test_activity_bins_and_ranking_breakdown():
    bins = activity_bins(np.array([0, 1, 9, 10, 29, 30, 299, 300, 5000]))
    assert list(bins.astype(str)) == ["new (0)", "1–9", "1–9", "10–29", "10–29", "30–99", "100–299", "300+",
                                      "300+"]
    rng = np.random.default_rng(0)
    n_users, n_items, k = 40, 50, 5
    rec = np.stack([rng.permutation(n_items)[:k] for _ in range(n_users)])
    rel = csr_from_pairs(rng.integers(0, n_users, 300), rng.integers(0, n_items, 300), n_users)
    groups = activity_bins(rng.integers(0, 60, n_users))
    table = ranking_breakdown(rec, rel, groups, k)
    assert table["users"].sum() == n_users
    for _, row in table.iterrows():
        users = np.flatnonzero(np.asarray(groups.astype(str)) == row["group"])
        sub = csr_rows(rel[0], rel[1], users)
        assert row[f"precision_at_{k}"] == pytest.approx(precision_at_k(rec[users], sub, k), nan_ok=True)
        assert row[f"ndcg_at_{k}"] == pytest.approx(ndcg_at_k(rec[users], sub, k), nan_ok=True)
