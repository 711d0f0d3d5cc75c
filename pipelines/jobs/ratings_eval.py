"""The ratings job's data splits and evaluation pieces: split options, RMSE by known/unknown
user and item, the forest checks' activity features, and the cold-start rankings a bundle keeps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from modeling.collab import score_all_items
from modeling.errors import DataError
from modeling.metrics import rmse

__all__ = ["activity_features", "cold_start_ranking", "popularity_cold_start", "rmse_by_segment",
           "split_ratings", "user_stratified"]

COLD_START_LENGTH = 1000  # items kept in the bundle's ranking for unknown users


def split_ratings(df: pd.DataFrame, frac: float, how: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random (seeded), global time cut-off, each user's latest rating(s) held out, or a per-user
    stratified random split (`frac` of each user's rows held out, seeded)."""
    n = len(df)
    if how == "random":
        rng = np.random.default_rng(seed)
        is_valid = np.zeros(n, dtype=bool)
        is_valid[rng.permutation(n)[: int(round(n * frac))]] = True
    elif how == "time":
        cutoff = np.quantile(df["timestamp"].to_numpy(), 1.0 - frac)
        is_valid = (df["timestamp"] > cutoff).to_numpy()
    elif how == "user-stratified":
        is_valid = user_stratified(df["user"].to_numpy(), frac, seed)
    else:  # user-last: each user's most recent rating, for users with at least 2
        order = df.sort_values(["user", "timestamp"], kind="stable")
        last = ~order["user"].duplicated(keep="last")
        multi = order.groupby("user")["user"].transform("size") >= 2
        is_valid = np.zeros(n, dtype=bool)
        is_valid[df.index.get_indexer(order.index[(last & multi).to_numpy()])] = True
    train, valid = df[~is_valid].reset_index(drop=True), df[is_valid].reset_index(drop=True)
    if len(train) == 0 or len(valid) == 0:
        raise DataError(f"split {how!r} with fraction {frac} leaves an empty train or valid set")
    return train, valid


def user_stratified(users: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Validation mask holding out round(frac * n_u) of each user's n_u rows, drawn at random
    (seeded), so every user with enough rows is in both parts (vectorized: one sort)."""
    codes = pd.factorize(pd.Series(users))[0]
    key = np.random.default_rng(seed).random(len(codes))
    order = np.lexsort((key, codes))
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(codes)) - np.repeat(starts, counts)  # position within the user's shuffled rows
    n_valid = np.round(counts * frac).astype(np.int64)
    is_valid = np.empty(len(codes), dtype=bool)
    is_valid[order] = rank < np.repeat(n_valid, counts)
    return is_valid


def rmse_by_segment(y: np.ndarray, pred: np.ndarray, baseline: np.ndarray, users: np.ndarray,
                    items: np.ndarray) -> dict[str, float]:
    """Validation RMSE of the served predictions and of the bias baseline on the rows of known
    and unknown (code 0) users and items, with the row counts; an empty segment has only its count."""
    out: dict[str, float] = {}
    for name, mask in (("known_user", users > 0), ("unknown_user", users == 0),
                       ("known_item", items > 0), ("unknown_item", items == 0)):
        out[f"valid_rows_{name}"] = float(mask.sum())
        if mask.any():
            out[f"valid_rmse_{name}"] = rmse(y[mask], pred[mask])
            out[f"baseline_rmse_{name}"] = rmse(y[mask], baseline[mask])
    return out


def activity_features(df_u: np.ndarray, df_i: np.ndarray, ts: np.ndarray, train_u: np.ndarray,
                      train_i: np.ndarray, train_r: np.ndarray | None, n_users: int,
                      n_items: int) -> pd.DataFrame:
    """Per-row user/item activity statistics from the training set (for forest checks).

    An unknown user or item (code 0) has count 0 and the global mean rating, not a mean of 0 a
    forest would read as a harsh rater. Without ratings (interactions) only the counts."""
    u_cnt = np.bincount(train_u, minlength=n_users)
    i_cnt = np.bincount(train_i, minlength=n_items)
    out = {"user_count": u_cnt[df_u], "item_count": i_cnt[df_i]}
    if train_r is not None:
        mu = float(np.mean(train_r)) if len(train_r) else 0.0
        u_mean = np.bincount(train_u, weights=train_r, minlength=n_users) / np.maximum(u_cnt, 1)
        i_mean = np.bincount(train_i, weights=train_r, minlength=n_items) / np.maximum(i_cnt, 1)
        u_mean[u_cnt == 0] = mu
        i_mean[i_cnt == 0] = mu
        out.update(user_mean=u_mean[df_u], item_mean=i_mean[df_i])
    out["timestamp"] = ts.astype(np.float64)
    return pd.DataFrame(out)


def popularity_cold_start(users: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Items ranked for an unknown user by how many users interacted with them (the popularity
    ranking: the best non-personal top-k under the held-out protocol); score = share of users."""
    counts = np.bincount(items, minlength=n_items).astype(np.float64)
    counts[0] = 0.0
    candidates = np.flatnonzero(counts > 0)
    order = np.lexsort((candidates, -counts[candidates]))[:COLD_START_LENGTH]
    share = counts / max(len(np.unique(users)), 1)
    return candidates[order].astype(np.int64), share[candidates[order]].astype(np.float32)


def cold_start_ranking(model: torch.nn.Module, train_u: np.ndarray, train_i: np.ndarray,
                       n_items: int, min_ratings: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items with enough ratings ranked by mean predicted rating over a sample of known users
    (the rating model's answer when the bundle has no ranking head)."""
    counts = np.bincount(train_i, minlength=n_items)
    threshold = min(min_ratings, int(np.quantile(counts[1:], 0.5)) if n_items > 1 else 0)
    candidates = np.flatnonzero(counts >= max(1, threshold))
    candidates = candidates[candidates > 0]
    rng = np.random.default_rng(seed)
    known = np.unique(train_u)
    sample = rng.choice(known, size=min(256, len(known)), replace=False)
    scores = score_all_items(model, torch.from_numpy(np.sort(sample))).numpy()[:, candidates].mean(axis=0)
    order = np.lexsort((candidates, -scores))
    return candidates[order][:COLD_START_LENGTH].astype(np.int64), scores[order][:COLD_START_LENGTH].astype(np.float32)
