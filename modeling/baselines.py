"""Closed-form baselines a recommender must beat (global mean, user+item biases), and the
cold-start rule that answers ratings for unknown users or items from the bias baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BiasBaseline:
    """r_hat = mu + b_user + b_item, fitted by regularised alternating least squares."""

    mu: float
    user_bias: np.ndarray
    item_bias: np.ndarray

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.mu + self.user_bias[users] + self.item_bias[items]


def fit_bias_baseline(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    n_users: int,
    n_items: int,
    reg_user: float = 15.0,
    reg_item: float = 10.0,
    iters: int = 10,
) -> BiasBaseline:
    """Alternate closed-form updates of item then user biases (vectorized with bincount).

    Index 0 (unknown) keeps bias 0, so unseen users/items fall back to the global mean.
    """
    r = ratings.astype(np.float64)
    mu = float(r.mean())
    bu = np.zeros(n_users)
    bi = np.zeros(n_items)
    n_u = np.bincount(users, minlength=n_users)
    n_i = np.bincount(items, minlength=n_items)
    for _ in range(iters):
        bi = np.bincount(items, weights=r - mu - bu[users], minlength=n_items) / (n_i + reg_item)
        bu = np.bincount(users, weights=r - mu - bi[items], minlength=n_users) / (n_u + reg_user)
    bu[0] = 0.0
    bi[0] = 0.0
    return BiasBaseline(mu, bu, bi)


def cold_start_fill(pred: np.ndarray, users: np.ndarray, items: np.ndarray, baseline: BiasBaseline,
                    scale: tuple[float, float] | None = None) -> np.ndarray:
    """`pred` with the rows of an unknown user or item (code 0) answered by the bias baseline.

    An embedding row that never trained (index 0) says nothing about a new user, so such a row
    gets the global mean plus the known side's bias: mu + b_item for an unknown user, mu +
    b_user for an unknown item, mu when both are unknown (the baseline's biases at index 0 are
    0). On those rows the answer is the bias baseline's own, clipped to the rating `scale`, so
    it is never worse than the baseline there. Known pairs keep the model's prediction."""
    out = np.array(pred, dtype=np.float64, copy=True)
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    cold = (users == 0) | (items == 0)
    if cold.any():
        fill = baseline.predict(users[cold], items[cold])
        out[cold] = fill if scale is None else np.clip(fill, scale[0], scale[1])
    return out
