"""Random-forest validation checks run beside every training: a baseline, adversarial validation,
permutation importance, per-row tree spread, and embeddings-as-features; plus the small "spread
forest" a bundle carries (as plain arrays, `modeling.forest_arrays`) for per-row uncertainty.

Generic: inputs are numeric DataFrames (categoricals already integer codes) and numpy targets.
Forests train on a seeded row sample (`max_rows`) so they stay cheap on big training sets.
Results are small dataclasses of plain data so a pipeline can log them as metrics/JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.inspection import permutation_importance
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from modeling.errors import DataError
from modeling.forest_arrays import ForestArrays

Metric = Callable[[np.ndarray, np.ndarray], float]

_CONFIDENCE_CHUNK_ROWS = 50_000


@dataclass
class ForestConfig:
    """Forest hyper-parameters plus the row budget that bounds training time."""

    n_estimators: int = 40
    min_samples_leaf: int = 3
    max_features: float = 0.5
    max_rows: int = 200_000
    seed: int = 0
    n_jobs: int = -1
    max_leaf_nodes: int | None = None  # caps each tree at 2 * max_leaf_nodes - 1 nodes

    def __post_init__(self) -> None:
        if self.n_estimators < 1:
            raise ValueError(f"ForestConfig.n_estimators must be >= 1, got {self.n_estimators}")
        if self.min_samples_leaf < 1:
            raise ValueError(
                f"ForestConfig.min_samples_leaf must be >= 1, got {self.min_samples_leaf}"
            )
        if not 0.0 < float(self.max_features) <= 1.0:
            raise ValueError(
                f"ForestConfig.max_features must be in (0, 1], got {self.max_features}"
            )
        if self.max_rows < 2:
            raise ValueError(f"ForestConfig.max_rows must be >= 2, got {self.max_rows}")
        if self.max_leaf_nodes is not None and self.max_leaf_nodes < 2:
            raise ValueError(f"ForestConfig.max_leaf_nodes must be >= 2, got {self.max_leaf_nodes}")


@dataclass
class BaselineResult:
    """Outcome of the random-forest baseline; `model` and `valid_pred` stay out of `to_dict`."""

    valid_score: float
    oob_r2: float
    train_seconds: float
    n_train_rows: int
    model: RandomForestRegressor | None = field(default=None, repr=False)
    valid_pred: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, float | int]:
        """Plain numbers for MLflow metrics."""
        return {
            "valid_score": float(self.valid_score),
            "oob_r2": float(self.oob_r2),
            "train_seconds": float(self.train_seconds),
            "n_train_rows": int(self.n_train_rows),
        }


@dataclass
class AdversarialResult:
    """Cross-validated AUC of telling sample a from sample b (0.5 = indistinguishable)."""

    auc: float
    top_features: list[tuple[str, float]]
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        out = asdict(self)
        out["top_features"] = [[name, float(v)] for name, v in self.top_features]
        return out


# --------------------------------------------------------------------------- input checks


def _check_frame(X: Any, name: str) -> pd.DataFrame:
    if not isinstance(X, pd.DataFrame):
        raise DataError(f"{name}: expected a pandas DataFrame, got {type(X).__name__}")
    if len(X) == 0 or X.shape[1] == 0:
        raise DataError(f"{name}: empty frame (shape {X.shape})")
    for col in X.columns:
        dtype = X[col].dtype
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            raise DataError(
                f"{name}: column {col!r} has non-numeric dtype {dtype}; encode it as integer codes"
            )
    return X


def _check_target(y: Any, n_rows: int, name: str) -> np.ndarray:
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{name}: target must be 1-D, got shape {np.shape(y)}")
    if len(arr) != n_rows:
        raise DataError(f"{name}: target has {len(arr)} rows but features have {n_rows}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataError(f"{name}: target is not finite at row {int(bad[0])} ({arr[bad[0]]})")
    return arr


def _sample_index(n: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a uniform sample without replacement (all rows when n <= max_rows)."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_rows, replace=False))


# --------------------------------------------------------------------------- regressor baseline


def fit_forest_regressor(
    X: pd.DataFrame, y: np.ndarray, cfg: ForestConfig, oob: bool = True
) -> RandomForestRegressor:
    """Fit a bootstrapped forest (with OOB scoring unless `oob=False`) on at most `cfg.max_rows`
    sampled rows."""
    X = _check_frame(X, "X")
    y = _check_target(y, len(X), "y")
    idx = _sample_index(len(X), cfg.max_rows, np.random.default_rng(cfg.seed))
    model = RandomForestRegressor(
        n_estimators=cfg.n_estimators,
        min_samples_leaf=cfg.min_samples_leaf,
        max_features=cfg.max_features,
        max_leaf_nodes=cfg.max_leaf_nodes,
        bootstrap=True,
        oob_score=oob,
        n_jobs=cfg.n_jobs,
        random_state=cfg.seed,
    )
    model.fit(X.iloc[idx], y[idx])
    return model


def rf_baseline(
    X_train: pd.DataFrame,
    y_train: np.ndarray,
    X_valid: pd.DataFrame,
    y_valid: np.ndarray,
    metric: Metric,
    cfg: ForestConfig | None = None,
) -> BaselineResult:
    """Train the reference forest and score it on the validation set with `metric(y, pred)`."""
    cfg = cfg or ForestConfig()
    X_valid = _check_frame(X_valid, "X_valid")
    y_valid = _check_target(y_valid, len(X_valid), "y_valid")
    if list(X_valid.columns) != list(X_train.columns):
        raise DataError(
            f"X_valid columns {list(X_valid.columns)} differ from X_train {list(X_train.columns)}"
        )
    start = time.perf_counter()
    model = fit_forest_regressor(X_train, y_train, cfg)
    seconds = time.perf_counter() - start
    pred = _predict_serial(model, X_valid)
    return BaselineResult(
        valid_score=float(metric(y_valid, pred)),
        oob_r2=float(model.oob_score_),
        train_seconds=float(seconds),
        n_train_rows=int(len(model.oob_prediction_)),
        model=model,
        valid_pred=pred,
    )


# --------------------------------------------------------------------------- adversarial validation


def adversarial_validation(
    X_a: pd.DataFrame,
    X_b: pd.DataFrame,
    cfg: ForestConfig | None = None,
    cv: int = 3,
    top: int = 10,
) -> AdversarialResult:
    """Can a forest tell sample a (label 0) from sample b (label 1)? High AUC = distribution shift."""
    cfg = cfg or ForestConfig(n_estimators=25, max_rows=100_000)
    X_a = _check_frame(X_a, "X_a")
    X_b = _check_frame(X_b, "X_b")
    if list(X_a.columns) != list(X_b.columns):
        raise DataError(f"X_b columns {list(X_b.columns)} differ from X_a {list(X_a.columns)}")
    if cv < 2:
        raise ValueError(f"cv must be >= 2, got {cv}")
    per_side = min(len(X_a), len(X_b), max(cfg.max_rows // 2, 1))
    if per_side < cv:
        raise DataError(f"adversarial validation needs >= {cv} rows per sample, got {per_side}")
    rng = np.random.default_rng(cfg.seed)
    ia = _sample_index(len(X_a), per_side, rng)
    ib = _sample_index(len(X_b), per_side, rng)
    X = pd.concat([X_a.iloc[ia], X_b.iloc[ib]], ignore_index=True)
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [len(ia), len(ib)])
    clf = RandomForestClassifier(
        n_estimators=cfg.n_estimators,
        min_samples_leaf=cfg.min_samples_leaf,
        max_features=cfg.max_features,
        n_jobs=cfg.n_jobs,
        random_state=cfg.seed,
    )
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=cfg.seed)
    proba = np.empty(len(X), dtype=np.float64)
    for fit_idx, oof_idx in folds.split(X, labels):
        clf.fit(X.iloc[fit_idx], labels[fit_idx])
        proba[oof_idx] = _predict_serial(clf, X.iloc[oof_idx], proba=True)[:, 1]
    auc = float(roc_auc_score(labels, proba))
    clf.fit(X, labels)
    ranked = _ranked(X.columns, clf.feature_importances_)
    return AdversarialResult(auc=auc, top_features=ranked[:top], n_rows=len(X))


def _predict_serial(model: Any, X: pd.DataFrame, proba: bool = False) -> np.ndarray:
    """Predict on one thread: threaded tree summation order varies, which breaks bitwise seeding."""
    n_jobs = model.n_jobs
    model.set_params(n_jobs=1)
    try:
        return model.predict_proba(X) if proba else model.predict(X)
    finally:
        model.set_params(n_jobs=n_jobs)


def _ranked(columns: Sequence[Any], values: np.ndarray) -> list[tuple[str, float]]:
    order = np.argsort(-np.asarray(values), kind="stable")
    return [(str(columns[i]), float(values[i])) for i in order]


# --------------------------------------------------------------------------- importance


def permutation_importance_check(
    model: Any,
    X: pd.DataFrame,
    y: np.ndarray,
    metric: Metric,
    n_repeats: int = 3,
    max_rows: int = 20_000,
    seed: int = 0,
) -> list[tuple[str, float]]:
    """Mean increase of `metric` (an error, lower is better) when each column is shuffled."""
    X = _check_frame(X, "X")
    y = _check_target(y, len(X), "y")
    idx = _sample_index(len(X), max_rows, np.random.default_rng(seed))
    Xs, ys = X.iloc[idx], y[idx]

    def neg_error(estimator: Any, X_: pd.DataFrame, y_: np.ndarray) -> float:
        return -float(metric(y_, estimator.predict(X_)))

    result = permutation_importance(
        model, Xs, ys, scoring=neg_error, n_repeats=n_repeats, random_state=seed, n_jobs=1
    )
    return _ranked(X.columns, result.importances_mean)


# --------------------------------------------------------------------------- tree spread


def tree_confidence(model: Any, X: pd.DataFrame) -> np.ndarray:
    """Per-row std of the individual trees' predictions: high spread = the forest is unsure."""
    trees = getattr(model, "estimators_", None)
    if not trees:
        raise ValueError("tree_confidence needs a fitted forest with `estimators_`")
    X = _check_frame(X, "X")
    matrix = np.ascontiguousarray(X.to_numpy(dtype=np.float32))
    out = np.empty(len(matrix), dtype=np.float64)
    preds = np.empty((len(trees), min(len(matrix), _CONFIDENCE_CHUNK_ROWS)), dtype=np.float64)
    for start in range(0, len(matrix), _CONFIDENCE_CHUNK_ROWS):
        chunk = matrix[start : start + _CONFIDENCE_CHUNK_ROWS]
        block = preds[:, : len(chunk)]
        for t, tree in enumerate(trees):
            block[t] = tree.predict(chunk)
        out[start : start + len(chunk)] = block.std(axis=0)
    return out


def error_by_confidence(
    std: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, bins: int = 5
) -> list[dict[str, float | int]]:
    """RMSE per equal-count bin of tree spread; error should grow with spread."""
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if not len(std) == len(y_true) == len(y_pred):
        raise DataError(
            f"length mismatch: std {len(std)}, y_true {len(y_true)}, y_pred {len(y_pred)}"
        )
    if len(std) == 0:
        raise DataError("error_by_confidence needs at least one row")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n_bins = min(bins, len(std))
    order = np.argsort(std, kind="stable")
    bin_of = np.empty(len(std), dtype=np.int64)
    bin_of[order] = np.arange(len(std)) * n_bins // len(std)
    count = np.bincount(bin_of, minlength=n_bins)
    std_sum = np.bincount(bin_of, weights=std, minlength=n_bins)
    sq_err = np.bincount(bin_of, weights=(y_true - y_pred) ** 2, minlength=n_bins)
    lo = np.full(n_bins, np.inf)
    hi = np.full(n_bins, -np.inf)
    np.minimum.at(lo, bin_of, std)
    np.maximum.at(hi, bin_of, std)
    return [
        {
            "bin": b,
            "n": int(count[b]),
            "std_mean": float(std_sum[b] / count[b]),
            "std_lo": float(lo[b]),
            "std_hi": float(hi[b]),
            "rmse": float(np.sqrt(sq_err[b] / count[b])),
        }
        for b in range(n_bins)
    ]


# --------------------------------------------------------------------------- spread forest


@dataclass
class SpreadForest:
    """A node-capped forest exported as plain arrays for a bundle: the per-row spread at predict
    time is the std of its trees' predictions (`ForestArrays.spread`)."""

    arrays: ForestArrays
    columns: list[str]
    train_seconds: float
    n_train_rows: int
    config: ForestConfig

    def info(self) -> dict[str, Any]:
        """JSON-ready description (what a bundle stores next to the arrays)."""
        return {
            "method": "forest_tree_std",
            "features": list(self.columns),
            "n_trees": self.arrays.n_trees,
            "n_nodes": self.arrays.n_nodes,
            "bytes": self.arrays.nbytes,
            "max_depth": int(self.arrays.depths().max()),
            "max_leaf_nodes": self.config.max_leaf_nodes,
            "min_samples_leaf": self.config.min_samples_leaf,
            "max_features": self.config.max_features,
            "n_train_rows": int(self.n_train_rows),
            "train_seconds": float(self.train_seconds),
        }


def fit_spread_forest(X: pd.DataFrame, y: np.ndarray, cfg: ForestConfig) -> SpreadForest:
    """Fit a forest on at most `cfg.max_rows` rows (no OOB pass) and export its trees as arrays.

    Set `cfg.max_leaf_nodes` to bound the bundle: at most n_estimators * (2 * max_leaf_nodes - 1)
    nodes of 29 bytes each (20 trees x 1024 leaves: 1.2 MB).
    """
    start = time.perf_counter()
    model = fit_forest_regressor(X, y, cfg, oob=False)
    seconds = time.perf_counter() - start
    return SpreadForest(ForestArrays.from_sklearn(model), [str(c) for c in X.columns], seconds,
                        min(len(X), cfg.max_rows), cfg)


# --------------------------------------------------------------------------- embeddings


def embedding_features(X: pd.DataFrame, embeddings: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Swap each listed integer-code column for its learned embedding vectors (`<col>_emb<j>`)."""
    X = _check_frame(X, "X")
    missing = [c for c in embeddings if c not in X.columns]
    if missing:
        raise DataError(f"embedding columns not in frame: {missing}")
    blocks: list[pd.DataFrame] = []
    for col in X.columns:
        if col not in embeddings:
            blocks.append(X[[col]])
            continue
        table = np.asarray(embeddings[col])
        if table.ndim != 2:
            raise DataError(f"embedding for column {col!r} must be 2-D, got shape {table.shape}")
        codes = _codes(X[col], len(table))
        names = [f"{col}_emb{j}" for j in range(table.shape[1])]
        values = table[codes].astype(np.float32, copy=False)
        blocks.append(pd.DataFrame(values, columns=names, index=X.index))
    return pd.concat(blocks, axis=1)


def _codes(column: pd.Series, n_codes: int) -> np.ndarray:
    values = column.to_numpy()
    if not pd.api.types.is_integer_dtype(values.dtype):
        raise DataError(f"column {column.name!r}: expected integer codes, got dtype {values.dtype}")
    bad = np.flatnonzero((values < 0) | (values >= n_codes))
    if bad.size:
        raise DataError(
            f"column {column.name!r}: code {values[bad[0]]} at row {int(bad[0])} is outside "
            f"the embedding table [0, {n_codes})"
        )
    return values.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas, without touching pyplot's global backend state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    return out


def _barh(ax: Any, items: Sequence[tuple[str, float]], xlabel: str) -> None:
    names = [str(n) for n, _ in items][::-1]
    values = [float(v) for _, v in items][::-1]
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(values)), names)
    ax.set_xlabel(xlabel)


def plot_importance(
    items: Sequence[tuple[str, float]], path: str | Path, title: str = "Feature importance"
) -> Path:
    """Horizontal bars, most important on top."""
    fig = _new_figure(7, max(2.5, 0.3 * len(items) + 1))
    ax = fig.subplots()
    _barh(ax, items, "importance")
    ax.set_title(title)
    return _save(fig, path)


def plot_adversarial(result: AdversarialResult, path: str | Path) -> Path:
    """AUC in the title, the features that give the split away as bars."""
    fig = _new_figure(7, max(2.5, 0.3 * len(result.top_features) + 1))
    ax = fig.subplots()
    _barh(ax, result.top_features, "impurity importance")
    ax.set_title(f"Adversarial validation: AUC {result.auc:.3f} ({result.n_rows} rows)")
    return _save(fig, path)


def plot_confidence(bins: Sequence[Mapping[str, float | int]], path: str | Path) -> Path:
    """RMSE against mean tree spread per bin."""
    fig = _new_figure(6, 4)
    ax = fig.subplots()
    x = [float(b["std_mean"]) for b in bins]
    y = [float(b["rmse"]) for b in bins]
    ax.plot(x, y, marker="o")
    ax.set_xlabel("mean std of tree predictions (bin)")
    ax.set_ylabel("RMSE")
    ax.set_title("Error by forest confidence")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
