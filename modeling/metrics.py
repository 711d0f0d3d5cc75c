"""Regression and top-k ranking metrics on numpy arrays or torch tensors (vectorized, return float)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "exp_rmspe",
    "mae",
    "map_at_k",
    "ndcg_at_k",
    "precision_at_k",
    "ranking_report",
    "recall_at_k",
    "rmse",
    "rmspe",
]


def _to_numpy(x: Any, dtype: type = np.float64) -> np.ndarray:
    """Convert a tensor (any device, with or without grad) or array-like to a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if dtype is np.float64 else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _to_numpy(y_true).reshape(-1)
    p = _to_numpy(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} values but y_pred has {p.size}")
    return t, p


def rmse(y_true: Any, y_pred: Any) -> float:
    """Root mean squared error."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    return float(np.sqrt(np.mean((t - p) ** 2)))


def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    return float(np.mean(np.abs(t - p)))


def rmspe(y_true: Any, y_pred: Any) -> float:
    """Root mean squared percentage error; rows with y_true == 0 are ignored (Kaggle Rossmann rule)."""
    t, p = _pair(y_true, y_pred)
    keep = t != 0
    if not keep.any():
        return float("nan")
    rel = (t[keep] - p[keep]) / t[keep]
    return float(np.sqrt(np.mean(rel**2)))


def exp_rmspe(log_true: Any, log_pred: Any) -> float:
    """RMSPE of a model trained on log targets, measured back on the original scale."""
    t, p = _pair(log_true, log_pred)
    return rmspe(np.exp(t), np.exp(p))


# ----------------------------------------------------------------------------- ranking


def _hits(recommended: Any, relevant: tuple[Any, Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary hit matrix [m, k] and relevant-item counts [m] for CSR relevance (indptr, indices)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rec = _to_numpy(recommended, np.int64)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be a 2-D [users, k] array, got shape {rec.shape}")
    indptr = _to_numpy(relevant[0], np.int64).reshape(-1)
    indices = _to_numpy(relevant[1], np.int64).reshape(-1)
    m = rec.shape[0]
    if indptr.size != m + 1:
        raise ValueError(f"relevant indptr has {indptr.size} entries, expected users + 1 = {m + 1}")
    if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
        raise ValueError(
            "relevant indptr must start at 0, be non-decreasing and end at len(indices)"
        )
    rec = rec[:, :k]
    # Encode (user, item) pairs as one int64 key so a single np.isin checks every user at once.
    span = int(max(indices.max(initial=-1), rec.max(initial=-1))) + 2
    users_rel = np.repeat(np.arange(m, dtype=np.int64), np.diff(indptr))
    rel_keys = np.unique(users_rel * span + indices)
    n_rel = np.bincount(rel_keys // span, minlength=m)
    rec_keys = np.arange(m, dtype=np.int64)[:, None] * span + rec
    hits = np.isin(rec_keys, rel_keys) & (rec >= 0)
    return hits, n_rel


def _mean_over_users(values: np.ndarray, n_rel: np.ndarray) -> float:
    users = n_rel > 0
    if not users.any():
        return float("nan")
    return float(values[users].mean())


def precision_at_k(recommended: Any, relevant: tuple[Any, Any], k: int) -> float:
    """Mean over users with >= 1 relevant item of (hits in the top k) / k."""
    hits, n_rel = _hits(recommended, relevant, k)
    return _mean_over_users(hits.sum(axis=1) / k, n_rel)


def recall_at_k(recommended: Any, relevant: tuple[Any, Any], k: int) -> float:
    """Mean over users with >= 1 relevant item of (hits in the top k) / (number relevant)."""
    hits, n_rel = _hits(recommended, relevant, k)
    return _mean_over_users(hits.sum(axis=1) / np.maximum(n_rel, 1), n_rel)


def ndcg_at_k(recommended: Any, relevant: tuple[Any, Any], k: int) -> float:
    """Binary-relevance NDCG@k, log2 discount, ideal DCG over min(k, n_relevant) hits."""
    hits, n_rel = _hits(recommended, relevant, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = hits.astype(np.float64) @ discount[: hits.shape[1]]
    ideal_cum = np.concatenate([[0.0], np.cumsum(discount)])
    idcg = ideal_cum[np.minimum(n_rel, k)]
    return _mean_over_users(dcg / np.where(idcg > 0, idcg, 1.0), n_rel)


def map_at_k(recommended: Any, relevant: tuple[Any, Any], k: int) -> float:
    """Mean average precision at k: per user, the sum of precision@j at each hit j <= k divided
    by min(k, number relevant) (so a perfect top-k scores 1), averaged over users with >= 1
    relevant item."""
    hits, n_rel = _hits(recommended, relevant, k)
    h = hits.astype(np.float64)
    prec_at_j = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)
    ap = (prec_at_j * h).sum(axis=1) / np.maximum(np.minimum(n_rel, k), 1)
    return _mean_over_users(ap, n_rel)


def ranking_report(recommended: Any, relevant: tuple[Any, Any], k: int, n_items: int,
                   prefix: str = "") -> dict[str, float]:
    """precision, recall, NDCG and MAP at k, and catalogue coverage (distinct recommended items
    over `n_items`), as `{prefix}precision_at_{k}`, ... `{prefix}coverage_at_{k}`."""
    rec = _to_numpy(recommended, np.int64)
    shown = np.unique(rec[:, :k][rec[:, :k] >= 0]) if rec.size else np.empty(0)
    return {
        f"{prefix}precision_at_{k}": precision_at_k(rec, relevant, k),
        f"{prefix}recall_at_{k}": recall_at_k(rec, relevant, k),
        f"{prefix}ndcg_at_{k}": ndcg_at_k(rec, relevant, k),
        f"{prefix}map_at_{k}": map_at_k(rec, relevant, k),
        f"{prefix}coverage_at_{k}": len(shown) / max(n_items, 1),
    }
