"""Looking inside a trained model: partial dependence with ICE lines, and where its error sits.

Partial dependence (the course's machine-learning lessons): take a sample of rows, set one
feature to each value of a grid in every row, predict, and average over the rows; the
individual rows' curves (ICE) show whether that average hides rows that move the other way.
It is computed in one batch per feature: the sample is repeated once per grid value with
`np.repeat`, the column overwritten with `np.tile(grid)`, and all copies go through the model
together, so no Python loop runs over rows.

Error breakdowns group a per-row error by segment columns with pandas' groupby (RMSPE,
RMSE), so an analyst sees which store types, days or users the model gets wrong.

Generic: this module knows the processor's state (to build grids on the model's input scale
and label them in raw units) but no data set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from modeling.collab import csr_rows
from modeling.metrics import ndcg_at_k, precision_at_k, recall_at_k
from modeling.processor import NA_SUFFIX, TabularProcessor

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class FeatureGrid:
    """The values one model input is set to: codes (categorical) or normalized floats (continuous),
    with their labels (category names, raw numbers) for the plot's x axis."""

    name: str
    kind: str  # "cat" | "cont"
    column: int  # position in x_cat or x_cont
    values: np.ndarray  # on the model's input scale
    labels: list[str]
    raw: np.ndarray | None = None  # raw numbers (continuous): the x positions of the plot


@dataclass
class PartialDependence:
    grid: FeatureGrid
    average: np.ndarray  # [G]: mean prediction over the sampled rows with the feature at each value
    ice: np.ndarray  # [n_ice, G]: a few rows' own curves
    rows: int  # rows averaged over

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.grid.name, "kind": self.grid.kind, "labels": self.grid.labels,
                "average": [float(v) for v in self.average], "rows": self.rows,
                "ice": [[float(v) for v in row] for row in self.ice]}


def module_predictor(model: nn.Module, batch_rows: int = 65_536,
                     transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Predict:
    """`predict(*inputs)` for a torch model taking one tensor per input array: eval mode, no grad,
    batches of `batch_rows` on the model's device; `transform` maps outputs (e.g. np.exp)."""

    def predict(*arrays: np.ndarray) -> np.ndarray:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = []
        try:
            with torch.no_grad():
                for start in range(0, len(arrays[0]), batch_rows):
                    xs = [torch.from_numpy(np.ascontiguousarray(a[start:start + batch_rows])).to(device)
                          for a in arrays]
                    out.append(model(*xs).float().cpu().numpy().reshape(-1))
        finally:
            model.train(was_training)
        pred = np.concatenate(out) if out else np.empty(0, dtype=np.float32)
        return transform(pred) if transform is not None else pred

    return predict


def feature_grid(proc: TabularProcessor, name: str, x_cat: np.ndarray, x_cont: np.ndarray,
                 max_levels: int = 16, points: int = 15) -> FeatureGrid:
    """The grid of one input: a categorical's most frequent codes in `x_cat` (at most `max_levels`,
    in vocabulary order), or a continuous input's quantiles (2 %–98 %) in `x_cont`."""
    if name in proc.cat_names_out:
        j = proc.cat_names_out.index(name)
        counts = np.bincount(x_cat[:, j], minlength=proc.cardinalities[name])
        counts[0] = 0  # the unknown token is not a value to set
        top = np.argsort(-counts, kind="stable")[:max_levels]
        codes = np.sort(top[counts[top] > 0])
        if name.endswith(NA_SUFFIX):
            labels = np.where(codes == 1, "present", "missing").astype(object)
        else:
            labels = proc.code_to_class(name, codes)
            numeric = pd.to_numeric(pd.Series(labels), errors="coerce").to_numpy()
            if not np.isnan(numeric).any():  # numbers stored as categories: show them in numeric order
                order = np.argsort(numeric, kind="stable")
                codes, labels = codes[order], labels[order]
        return FeatureGrid(name, "cat", j, codes.astype(np.int64), [str(v) for v in labels])
    if name not in proc.cont_names:
        raise KeyError(f"{name!r} is not a model input; have {proc.cat_names_out + proc.cont_names}")
    j = proc.cont_names.index(name)
    values = np.unique(np.quantile(x_cont[:, j], np.linspace(0.02, 0.98, points)).astype(np.float32))
    raw = values * proc.stds[name] + proc.means[name] if proc.normalize else values.astype(np.float64)
    return FeatureGrid(name, "cont", j, values, [f"{v:.4g}" for v in raw], raw.astype(np.float64))


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def partial_dependence(predict: Predict, x_cat: np.ndarray, x_cont: np.ndarray, grid: FeatureGrid,
                       rows: np.ndarray, n_ice: int = 12) -> PartialDependence:
    """Average prediction (and `n_ice` rows' curves) with `grid`'s input set to each grid value, over
    the given rows: one predict call on len(rows) × len(grid) copies."""
    g = len(grid.values)
    xc = np.repeat(x_cat[rows], g, axis=0)
    xn = np.repeat(x_cont[rows], g, axis=0)
    target = xc if grid.kind == "cat" else xn
    target[:, grid.column] = np.tile(grid.values, len(rows)).astype(target.dtype)
    pred = np.asarray(predict(xc, xn), dtype=np.float64).reshape(len(rows), g)
    return PartialDependence(grid, pred.mean(axis=0), pred[:n_ice], len(rows))


def pick_features(importance: Sequence[tuple[str, float]], proc: TabularProcessor, n: int = 6,
                  max_cardinality: int = 60, prefer: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """The `n` most important model inputs worth a partial-dependence panel: `prefer`red ones
    first when they are inputs, then by importance; `exclude`d ones (ids such as Store, whose
    embedding map says more), id-like categoricals (more than `max_cardinality` levels) and
    missing-value flags are left out."""
    inputs = set(proc.cat_names_out) | set(proc.cont_names)
    card = proc.cardinalities

    def usable(c: str) -> bool:
        return (c in inputs and c not in exclude and not c.endswith(NA_SUFFIX)
                and card.get(c, 0) <= max_cardinality)

    ranked = [c for c, _ in sorted(importance, key=lambda t: -t[1])]
    out: list[str] = []
    for c in [*prefer, *ranked]:
        if usable(c) and c not in out:
            out.append(c)
    return out[:n]


# ---------------------------------------------------------------- error breakdowns


def squared_errors(y_true: np.ndarray, y_pred: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row squared error for `metric` ('rmspe': relative to the actual, rows with actual 0 left
    out as in Kaggle's rule; 'rmse': absolute) and the mask of rows that count."""
    t, p = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    if metric == "rmspe":
        keep = t != 0
        return np.where(keep, (t - p) / np.where(keep, t, 1.0), 0.0) ** 2, keep
    if metric == "rmse":
        return (t - p) ** 2, np.ones(len(t), dtype=bool)
    raise ValueError(f"metric must be 'rmspe' or 'rmse', got {metric!r}")


def error_breakdown(segments: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray, by: Sequence[str],
                    metric: str = "rmspe") -> pd.DataFrame:
    """One row per (segment column, value): rows, share of rows, the metric on those rows, mean
    actual and predicted; values in their natural order within each column."""
    se, keep = squared_errors(y_true, y_pred, metric)
    frame = segments.loc[keep, list(by)].reset_index(drop=True)
    frame["_se"], frame["_t"], frame["_p"] = se[keep], np.asarray(y_true)[keep], np.asarray(y_pred)[keep]
    total = max(1, len(frame))
    parts = []
    for col in by:
        g = frame.groupby(col, observed=True, dropna=False, sort=True).agg(
            rows=("_se", "size"), mse=("_se", "mean"), mean_actual=("_t", "mean"), mean_predicted=("_p", "mean"))
        parts.append(pd.DataFrame({
            "segment": col, "value": g.index.astype(str), "rows": g["rows"].to_numpy(),
            "share": g["rows"].to_numpy() / total, metric: np.sqrt(g["mse"].to_numpy()),
            "mean_actual": g["mean_actual"].to_numpy(), "mean_predicted": g["mean_predicted"].to_numpy()}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def worst_groups(segments: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray, key: str, n: int = 20,
                 metric: str = "rmspe", describe: Sequence[str] = (), min_rows: int = 1) -> pd.DataFrame:
    """The `n` values of `key` (e.g. Store) with the highest error, with their rows, mean actual and
    predicted, bias (mean predicted / mean actual − 1) and the first value of `describe` columns."""
    se, keep = squared_errors(y_true, y_pred, metric)
    frame = segments.loc[keep, [key, *describe]].reset_index(drop=True)
    frame["_se"], frame["_t"], frame["_p"] = se[keep], np.asarray(y_true)[keep], np.asarray(y_pred)[keep]
    agg = {"rows": ("_se", "size"), "mse": ("_se", "mean"), "mean_actual": ("_t", "mean"),
           "mean_predicted": ("_p", "mean"), **{c: (c, "first") for c in describe}}
    g = frame.groupby(key, observed=True, sort=False).agg(**agg)
    g = g[g["rows"] >= min_rows]
    g[metric] = np.sqrt(g.pop("mse"))
    g["bias"] = g["mean_predicted"] / g["mean_actual"].where(g["mean_actual"] != 0) - 1.0
    g = g.sort_values(metric, ascending=False, kind="stable").head(n).reset_index()
    return g[[key, "rows", metric, "bias", "mean_actual", "mean_predicted", *describe]]


def activity_bins(counts: np.ndarray, edges: Sequence[int] = (1, 10, 30, 100, 300)) -> pd.Categorical:
    """Counts (e.g. a user's training ratings) as ordered bins: 'new (0)', '1–9', ..., '300+'."""
    edges = list(edges)
    labels = ["new (0)"] + [f"{lo}–{hi - 1}" for lo, hi in zip(edges, edges[1:], strict=False)] + [f"{edges[-1]}+"]
    pos = np.searchsorted(np.asarray(edges), np.asarray(counts), side="right")
    return pd.Categorical.from_codes(pos, categories=labels, ordered=True)


def ranking_breakdown(recommended: np.ndarray, relevant: tuple[np.ndarray, np.ndarray], groups: pd.Categorical,
                      k: int = 10) -> pd.DataFrame:
    """precision/recall/NDCG@k per group of users (one row of `recommended` and of the relevance
    CSR per user; `groups` labels each user): one vectorized metric call per group."""
    indptr, indices = relevant
    codes = np.asarray(groups.codes)
    rows = []
    for g, label in enumerate(groups.categories):
        users = np.flatnonzero(codes == g)
        if len(users) == 0:
            continue
        rel = csr_rows(indptr, indices, users)
        rows.append({"group": str(label), "users": int(len(users)),
                     f"precision_at_{k}": precision_at_k(recommended[users], rel, k),
                     f"recall_at_{k}": recall_at_k(recommended[users], rel, k),
                     f"ndcg_at_{k}": ndcg_at_k(recommended[users], rel, k)})
    return pd.DataFrame(rows)
