"""Ratings' domain parts of the training skeleton: ratings files → split → id vocabularies →
DotProductBias or EmbeddingNN, bias/forest baselines and ranking metrics, and a ratings bundle
(seen items, cold-start ranking) that takes raw user and item ids.

`train_ratings(cfg)` runs `RatingsJob` through `pipelines.jobs.base.run_job`; `find_lr` is
`tabrec lr-find ratings`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modeling.baselines import fit_bias_baseline
from modeling.bundle import (
    COLD_START_RANK,
    COLD_START_SCORES,
    SEEN_INDICES,
    SEEN_INDPTR,
    ModelSpec,
    RatingsSpec,
)
from modeling.collab import (
    DotProductBias,
    EmbeddingNN,
    csr_from_pairs,
    csr_rows,
    item_biases,
    item_factors,
    score_all_items,
    top_k_for_users,
)
from modeling.errors import DataError
from modeling.forest import ForestConfig, adversarial_validation, rf_baseline
from modeling.metrics import mae, ndcg_at_k, precision_at_k, recall_at_k, rmse
from modeling.schema import InputField, InputSchema
from modeling.training import LRFinderResult, TensorData
from pipelines import reports
from pipelines.ingest.ratings import rating_scale, read_items, read_ratings
from pipelines.jobs import analysis as views
from pipelines.jobs.base import BundleParts, Checks, Fitted, TrainingJob, run_job, seeded_lr_find
from pipelines.jobs.config import MODEL_DEFAULTS, MODELS, SPLITS, RatingsConfig

__all__ = ["MODELS", "MODEL_DEFAULTS", "SPLITS", "RatingsConfig", "RatingsData", "RatingsJob", "activity_features",
           "build_model", "cold_start_ranking", "find_lr", "load_data", "ranking_metrics", "split_ratings",
           "train_ratings", "y_range_for"]

log = logging.getLogger("tabrec.train.ratings")


@dataclass
class RatingsData:
    """The split, its id vocabularies and encoded arrays (index 0 = unknown id), built once."""

    train_df: pd.DataFrame
    valid_df: pd.DataFrame
    users: pd.Index
    items: pd.Index
    tu: np.ndarray  # train user / item codes and ratings
    ti: np.ndarray
    tr: np.ndarray
    vu: np.ndarray  # valid user / item codes and ratings
    vi: np.ndarray
    vr: np.ndarray
    train: TensorData
    valid: TensorData
    scale: tuple[float, float]
    y_range: tuple[float, float]
    titles: list[str | None]
    files: list[str]

    @property
    def n_users(self) -> int:
        return len(self.users) + 1

    @property
    def n_items(self) -> int:
        return len(self.items) + 1


def train_ratings(cfg: RatingsConfig) -> dict[str, Any] | None:
    """Train, check, track and save; the CLI's result dict (None on torchrun ranks other than 0)."""
    return run_job(RatingsJob(cfg))


class RatingsJob(TrainingJob[RatingsConfig, RatingsData]):
    pipeline = "ratings"
    target_metric = "valid_rmse"
    curve_metric = "rmse"
    baselines = {"baseline_rmse": "bias baseline (global mean + user and item biases)",
                 "rf_valid_rmse": "random forest on activity features", "global_mean_rmse": "global mean"}

    def prepare(self) -> RatingsData:
        return prepare(self.cfg)

    def datasets(self) -> list[views.DataInput]:
        return views.ratings_datasets(self.cfg, self.data)

    def analysis(self, fit: Fitted, checks: Checks, metrics: dict[str, float]) -> views.Analysis:
        # ranking by user activity uses the rating model; a ranking head, once the job has one,
        # goes in as `ranker=`
        return views.ratings_analysis(self.data, fit, metrics, self.cfg.seed)

    def run_name(self) -> str:
        return f"ratings-{self.cfg.model}"

    def params(self) -> dict[str, Any]:
        d = self.data
        return {"n_users": d.n_users - 1, "n_items": d.n_items - 1, "n_train": len(d.train_df),
                "n_valid": len(d.valid_df), "y_range": list(d.y_range), "rating_scale": list(d.scale)}

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg, self.data.n_users, self.data.n_items, self.data.y_range)

    def finder_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # Drawn after the training model, not from a fresh seed like `tabrec lr-find ratings`:
        # how this job always drew it, so `--lr auto` keeps its figures.
        return self.build_model()

    @property
    def epoch_metrics(self) -> dict[str, Any]:
        return {"rmse": rmse, "mae": mae}

    def evaluate(self, fit: Fitted) -> dict[str, float]:
        d, pred = self.data, fit.valid_pred
        baseline = fit_bias_baseline(d.tu, d.ti, d.tr, d.n_users, d.n_items)
        metrics = {
            "valid_rmse": rmse(d.vr, pred), "valid_mae": mae(d.vr, pred),
            "baseline_rmse": rmse(d.vr, baseline.predict(d.vu, d.vi)),
            "global_mean_rmse": rmse(d.vr, np.full_like(d.vr, baseline.mu)),
            "train_seconds": fit.train_seconds, "lr": fit.lr,
        }
        relevant_min = d.scale[0] + 0.75 * (d.scale[1] - d.scale[0])  # 4 stars on a 1–5 scale
        metrics.update(ranking_metrics(fit.model, d.tu, d.ti, d.vu, d.vi, d.vr, d.n_users, d.n_items, relevant_min))
        log.info("valid RMSE %.4f (bias baseline %.4f)", metrics["valid_rmse"], metrics["baseline_rmse"])
        return metrics

    def checks(self, fit: Fitted) -> Checks:
        """Can a forest tell valid rows from training rows, or predict ratings, from activity alone?"""
        d = self.data
        fcfg = ForestConfig(seed=self.cfg.seed, n_estimators=30, max_rows=100_000)
        f_train = activity_features(d.tu, d.ti, d.train_df["timestamp"].to_numpy(), d.tu, d.ti, d.tr,
                                    d.n_users, d.n_items)
        f_valid = activity_features(d.vu, d.vi, d.valid_df["timestamp"].to_numpy(), d.tu, d.ti, d.tr,
                                    d.n_users, d.n_items)
        adv = adversarial_validation(f_train, f_valid, cfg=fcfg)
        rf = rf_baseline(f_train.drop(columns="timestamp"), d.tr, f_valid.drop(columns="timestamp"), d.vr, rmse,
                         fcfg)
        return Checks(metrics={"adversarial_auc": adv.auc, "rf_valid_rmse": rf.valid_score},
                      report={"adversarial": adv.to_dict() if hasattr(adv, "to_dict") else asdict(adv),
                              "rf_baseline": rf.to_dict()})

    def plots(self, fit: Fitted) -> list[Path | None]:
        d, tmp = self.data, fit.tmp
        plots: list[Path | None] = [reports.predicted_vs_actual(d.vr, fit.valid_pred, tmp / "pred_vs_actual.png",
                                                                "valid ratings", discrete=True)]
        labels = [t or str(i) for t, i in zip(d.titles, d.items, strict=True)]
        biases = item_biases(fit.model)
        if biases is not None:
            plots.append(reports.bias_bars(labels, biases.numpy()[1:], tmp / "item_bias.png"))
        counts = np.bincount(d.ti, minlength=d.n_items)
        top = np.argsort(-counts[1:], kind="stable")[:300]
        emb = item_factors(fit.model).numpy()[1:][top]
        plots.append(reports.embedding_map(emb, [labels[j] for j in top], tmp / "item_embeddings.png",
                                           "Item embeddings (PCA), most-rated items labelled"))
        return plots

    def bundle(self, fit: Fitted, metrics: dict[str, float], fingerprint: str, run_id: str) -> BundleParts:
        cfg, d, model = self.cfg, self.data, fit.model
        cold_idx, cold_scores = cold_start_ranking(model, d.tu, d.ti, d.n_items, cfg.min_ratings_cold_start, cfg.seed)
        seen_ptr, seen_idx = csr_from_pairs(d.tu, d.ti, d.n_users)
        schema = InputSchema([InputField("user", "id", description="external user id"),
                              InputField("item", "id", description="external item id")])
        spec = RatingsSpec(
            model=ModelSpec.of(model), inputs=schema, users=[str(u) for u in d.users],
            items=[str(i) for i in d.items], item_titles=d.titles if any(d.titles) else None,
            rating_scale=list(d.scale), y_range=list(d.y_range), metrics={k: float(v) for k, v in metrics.items()},
            data_fingerprint=fingerprint, training=asdict(cfg), run_id=run_id,
        )
        extras = {
            SEEN_INDPTR: torch.from_numpy(seen_ptr), SEEN_INDICES: torch.from_numpy(seen_idx.astype(np.int32)),
            COLD_START_RANK: torch.from_numpy(cold_idx), COLD_START_SCORES: torch.from_numpy(cold_scores),
        }
        example = d.valid_df[["user", "item"]].head(5).reset_index(drop=True)
        return BundleParts(spec, [model], extras=extras, example=example,
                           example_pred=fit.valid_pred[:5].astype(np.float64))


def prepare(cfg: RatingsConfig) -> RatingsData:
    """Read the ratings (and item titles), split, build the vocabularies and the tensors."""
    train_df, valid_df = load_data(cfg)
    items_meta = read_items(cfg.items) if cfg.items else None
    scale = rating_scale(pd.concat([train_df["rating"], valid_df["rating"]]).to_frame("rating"))
    users, items = _vocab(train_df["user"]), _vocab(train_df["item"])
    tu, ti = _encode(users, train_df["user"]), _encode(items, train_df["item"])
    vu, vi = _encode(users, valid_df["user"]), _encode(items, valid_df["item"])
    tr = train_df["rating"].to_numpy(np.float32)
    vr = valid_df["rating"].to_numpy(np.float32)
    train = TensorData((torch.from_numpy(tu), torch.from_numpy(ti)), torch.from_numpy(tr))
    valid = TensorData((torch.from_numpy(vu), torch.from_numpy(vi)), torch.from_numpy(vr))
    files = [p for p in (cfg.ratings, cfg.valid, cfg.items) if p]
    return RatingsData(train_df, valid_df, users, items, tu, ti, tr, vu, vi, vr, train, valid, scale,
                       y_range_for(scale), _titles(items, items_meta), files)


def load_data(cfg: RatingsConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the ratings and build the (train, valid) split the config asks for."""
    kw = dict(fmt=cfg.format, user_col=cfg.user_col, item_col=cfg.item_col, rating_col=cfg.rating_col,
              time_col=cfg.time_col)
    ratings = read_ratings(cfg.ratings, **kw)
    if cfg.valid:
        return ratings, read_ratings(cfg.valid, **kw)
    return split_ratings(ratings, cfg.valid_frac, cfg.split, cfg.seed)


def split_ratings(df: pd.DataFrame, frac: float, how: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random (seeded), global time cut-off, or each user's latest rating(s) held out."""
    n = len(df)
    if how == "random":
        rng = np.random.default_rng(seed)
        is_valid = np.zeros(n, dtype=bool)
        is_valid[rng.permutation(n)[: int(round(n * frac))]] = True
    elif how == "time":
        cutoff = np.quantile(df["timestamp"].to_numpy(), 1.0 - frac)
        is_valid = (df["timestamp"] > cutoff).to_numpy()
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


def _vocab(values: pd.Series) -> pd.Index:
    uniq = pd.unique(values.to_numpy())
    keys = pd.to_numeric(pd.Series(uniq), errors="coerce")
    if keys.notna().all():  # numeric ids sort numerically, so vocab order is natural
        uniq = uniq[np.argsort(keys.to_numpy(), kind="stable")]
    else:
        uniq = np.sort(uniq.astype(str))
    return pd.Index(uniq, dtype=object)


def _encode(index: pd.Index, values: pd.Series) -> np.ndarray:
    return (index.get_indexer(values.to_numpy()) + 1).astype(np.int64)


def _titles(items: pd.Index, meta: pd.DataFrame | None) -> list[str | None]:
    if meta is None or "title" not in meta.columns:
        return [None] * len(items)
    lookup = meta.drop_duplicates("item", keep="last").set_index("item")["title"]
    found = lookup.reindex(items.to_numpy())
    return [None if pd.isna(t) else str(t) for t in found.to_numpy()]


def y_range_for(scale: tuple[float, float]) -> tuple[float, float]:
    """A little beyond the rating scale: (0, 5.5) for 1–5 stars, as in the course."""
    lo, hi = scale
    span = hi - lo
    return (lo - span * 0.25, hi + span * 0.125)


def build_model(cfg: RatingsConfig, n_users: int, n_items: int, y_range: tuple[float, float]) -> torch.nn.Module:
    if cfg.model == "dot":
        return DotProductBias(n_users, n_items, n_factors=cfg.factors, y_range=y_range)
    return EmbeddingNN(n_users, n_items, layers=cfg.layers, ps=cfg.dropout, embed_p=cfg.embed_p, y_range=y_range)


def find_lr(cfg: RatingsConfig) -> LRFinderResult:
    """`tabrec lr-find ratings`: the lr finder on the training part of the configured data."""
    cfg.validate()
    train_df, _ = load_data(cfg)
    users, items = _vocab(train_df["user"]), _vocab(train_df["item"])
    tu, ti = _encode(users, train_df["user"]), _encode(items, train_df["item"])
    train = TensorData((torch.from_numpy(tu), torch.from_numpy(ti)),
                       torch.from_numpy(train_df["rating"].to_numpy(np.float32)))
    y_range = y_range_for(rating_scale(train_df))
    return seeded_lr_find(cfg, lambda: build_model(cfg, len(users) + 1, len(items) + 1, y_range), train)


def ranking_metrics(
    model: torch.nn.Module,
    train_u: np.ndarray,
    train_i: np.ndarray,
    valid_u: np.ndarray,
    valid_i: np.ndarray,
    valid_r: np.ndarray,
    n_users: int,
    n_items: int,
    relevant_min: float,
    k: int = 10,
) -> dict[str, float]:
    """precision/recall/NDCG@k on valid items rated >= relevant_min, training items excluded."""
    mask = (valid_r >= relevant_min) & (valid_u > 0) & (valid_i > 0)
    users = np.unique(valid_u[mask])
    if len(users) == 0:
        return {}
    seen = csr_from_pairs(train_u, train_i, n_users)
    rel_ptr_all, rel_idx_all = csr_from_pairs(valid_u[mask], valid_i[mask], n_users)
    rec, _ = top_k_for_users(model, users, k, seen)
    rel_ptr, rel_idx = csr_rows(rel_ptr_all, rel_idx_all, users)
    coverage = len(np.unique(rec[rec > 0])) / max(1, n_items - 1)
    return {
        f"precision_at_{k}": precision_at_k(rec, (rel_ptr, rel_idx), k),
        f"recall_at_{k}": recall_at_k(rec, (rel_ptr, rel_idx), k),
        f"ndcg_at_{k}": ndcg_at_k(rec, (rel_ptr, rel_idx), k),
        f"coverage_at_{k}": coverage,
    }


def activity_features(df_u: np.ndarray, df_i: np.ndarray, ts: np.ndarray, train_u: np.ndarray,
                      train_i: np.ndarray, train_r: np.ndarray, n_users: int, n_items: int) -> pd.DataFrame:
    """Per-row user/item activity statistics from the training set (for forest checks)."""
    u_cnt = np.bincount(train_u, minlength=n_users)
    i_cnt = np.bincount(train_i, minlength=n_items)
    u_mean = np.bincount(train_u, weights=train_r, minlength=n_users) / np.maximum(u_cnt, 1)
    i_mean = np.bincount(train_i, weights=train_r, minlength=n_items) / np.maximum(i_cnt, 1)
    return pd.DataFrame({
        "user_count": u_cnt[df_u], "item_count": i_cnt[df_i],
        "user_mean": u_mean[df_u], "item_mean": i_mean[df_i], "timestamp": ts.astype(np.float64),
    })


def cold_start_ranking(model: torch.nn.Module, train_u: np.ndarray, train_i: np.ndarray,
                       n_items: int, min_ratings: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items with enough ratings ranked by mean predicted rating over a sample of known users."""
    counts = np.bincount(train_i, minlength=n_items)
    threshold = min(min_ratings, int(np.quantile(counts[1:], 0.5)) if n_items > 1 else 0)
    candidates = np.flatnonzero(counts >= max(1, threshold))
    candidates = candidates[candidates > 0]
    rng = np.random.default_rng(seed)
    known = np.unique(train_u)
    sample = rng.choice(known, size=min(256, len(known)), replace=False)
    scores = score_all_items(model, torch.from_numpy(np.sort(sample))).numpy()[:, candidates].mean(axis=0)
    order = np.lexsort((candidates, -scores))
    return candidates[order][:1000].astype(np.int64), scores[order][:1000].astype(np.float32)
