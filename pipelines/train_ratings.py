"""Ratings training job: ingest → split → vocab → DotProductBias/EmbeddingNN → checks → MLflow."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
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
    save_bundle,
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
from modeling.training import TensorData, Trainer, distributed, lr_find
from pipelines import reports, tracking
from pipelines.ingest.ratings import rating_scale, read_items, read_ratings

log = logging.getLogger("tabrec.train.ratings")

SPLITS = ("random", "time", "user-last")
MODELS = ("dot", "nn")
# Per-model training defaults, tuned once on ../shared/data/ml-100k train/valid (docs/benchmarks.md):
# the NN needs many more large-batch epochs and strong (embedding) dropout to stop overfitting.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "dot": {"epochs": 5, "lr": "1e-2", "wd": 0.3, "batch_size": 1024, "dropout": 0.0, "embed_p": 0.0},
    "nn": {"epochs": 20, "lr": "3e-2", "wd": 0.5, "batch_size": 4096, "dropout": 0.5, "embed_p": 0.3},
}


@dataclass
class RatingsConfig:
    ratings: str
    format: str = "auto"
    items: str | None = None
    valid: str | None = None
    valid_frac: float = 0.2
    split: str = "random"
    model: str = "dot"
    factors: int = 50
    layers: tuple[int, ...] = (100,)
    # None = the model's default from MODEL_DEFAULTS (tuned once on the ML-100k split).
    dropout: float | None = None
    embed_p: float | None = None
    epochs: int | None = None
    lr: str | None = None
    wd: float | None = None
    batch_size: int | None = None
    seed: int = 0
    experiment: str = "ratings"
    register: str | None = None
    force: bool = False
    min_ratings_cold_start: int = 10
    user_col: str | None = None
    item_col: str | None = None
    rating_col: str | None = None
    time_col: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        for key, value in MODEL_DEFAULTS.get(self.model, MODEL_DEFAULTS["dot"]).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise DataError(f"--model must be one of {MODELS}, got {self.model!r}")
        if self.split not in SPLITS:
            raise DataError(f"--split must be one of {SPLITS}, got {self.split!r}")
        if not 0.0 < self.valid_frac < 1.0:
            raise DataError(f"--valid-frac must be in (0, 1), got {self.valid_frac}")
        if self.epochs < 1:
            raise DataError("--epochs must be >= 1")
        if self.lr != "auto":
            try:
                if float(self.lr) <= 0:
                    raise ValueError
            except ValueError:
                raise DataError(f"--lr must be 'auto' or a positive number, got {self.lr!r}") from None


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


def y_range_for(scale: tuple[float, float]) -> tuple[float, float]:
    """A little beyond the rating scale: (0, 5.5) for 1–5 stars, as in the course."""
    lo, hi = scale
    span = hi - lo
    return (lo - span * 0.25, hi + span * 0.125)


def build_model(cfg: RatingsConfig, n_users: int, n_items: int, y_range: tuple[float, float]) -> torch.nn.Module:
    if cfg.model == "dot":
        return DotProductBias(n_users, n_items, n_factors=cfg.factors, y_range=y_range)
    return EmbeddingNN(n_users, n_items, layers=cfg.layers, ps=cfg.dropout, embed_p=cfg.embed_p, y_range=y_range)


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


def load_data(cfg: RatingsConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the ratings and build the (train, valid) split the config asks for."""
    kw = dict(fmt=cfg.format, user_col=cfg.user_col, item_col=cfg.item_col, rating_col=cfg.rating_col,
              time_col=cfg.time_col)
    ratings = read_ratings(cfg.ratings, **kw)
    if cfg.valid:
        return ratings, read_ratings(cfg.valid, **kw)
    return split_ratings(ratings, cfg.valid_frac, cfg.split, cfg.seed)


def find_lr(cfg: RatingsConfig) -> Any:
    """The lr finder on the training part of the configured data."""
    cfg.validate()
    train_df, _ = load_data(cfg)
    users, items = _vocab(train_df["user"]), _vocab(train_df["item"])
    tu, ti = _encode(users, train_df["user"]), _encode(items, train_df["item"])
    train = TensorData((torch.from_numpy(tu), torch.from_numpy(ti)),
                       torch.from_numpy(train_df["rating"].to_numpy(np.float32)))
    y_range = y_range_for(rating_scale(train_df))
    torch.manual_seed(cfg.seed)
    return lr_find(build_model(cfg, len(users) + 1, len(items) + 1, y_range), train, wd=cfg.wd,
                   batch_size=cfg.batch_size, seed=cfg.seed, quiet=cfg.quiet)


def train_ratings(cfg: RatingsConfig) -> dict[str, Any] | None:
    """Train, check, track and save; the CLI's result dict (None on torchrun ranks other than 0)."""
    cfg.validate()
    t_start = time.perf_counter()
    train_df, valid_df = load_data(cfg)
    items_meta = read_items(cfg.items) if cfg.items else None
    scale = rating_scale(pd.concat([train_df["rating"], valid_df["rating"]]).to_frame("rating"))
    users, items = _vocab(train_df["user"]), _vocab(train_df["item"])
    n_users, n_items = len(users) + 1, len(items) + 1
    tu, ti = _encode(users, train_df["user"]), _encode(items, train_df["item"])
    vu, vi = _encode(users, valid_df["user"]), _encode(items, valid_df["item"])
    tr = train_df["rating"].to_numpy(np.float32)
    vr = valid_df["rating"].to_numpy(np.float32)
    train = TensorData((torch.from_numpy(tu), torch.from_numpy(ti)), torch.from_numpy(tr))
    valid = TensorData((torch.from_numpy(vu), torch.from_numpy(vi)), torch.from_numpy(vr))
    y_range = y_range_for(scale)

    fingerprint = tracking.file_fingerprint([p for p in (cfg.ratings, cfg.valid, cfg.items) if p])
    tags = {"tabrec.pipeline": "ratings", "data_fingerprint": fingerprint}
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    # Under torchrun every rank prepares the same data and trains on its shard (DDP); only rank 0
    # tracks the run, runs the lr finder and the checks, and saves and registers the model.
    rank0 = distributed.current().is_main
    with (tracking.tracked_run(cfg.experiment, run_name=f"ratings-{cfg.model}", tags=tags) if rank0
          else contextlib.nullcontext()) as run, \
            tempfile.TemporaryDirectory(prefix="tabrec-ratings-") as tmp_dir:
        tmp = Path(tmp_dir)
        if rank0:
            tracking.log_params({**asdict(cfg), "n_users": n_users - 1, "n_items": n_items - 1,
                                 "n_train": len(train_df), "n_valid": len(valid_df),
                                 "y_range": list(y_range), "rating_scale": list(scale),
                                 "world_size": distributed.current().world_size})
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, n_users, n_items, y_range)
        lr_plot = None
        if cfg.lr == "auto":
            finder = lr_find(build_model(cfg, n_users, n_items, y_range), train, wd=cfg.wd,
                             batch_size=cfg.batch_size, seed=cfg.seed, quiet=cfg.quiet) if rank0 else None
            lr = float(distributed.broadcast_object(finder.suggestion if finder else None))
            if finder is not None:
                lr_plot = finder.plot(tmp / "lr_finder.png")
                tracking.log_metrics({"lr_suggested": lr})
        else:
            lr = float(cfg.lr)
        trainer = Trainer(model, metrics={"rmse": rmse, "mae": mae}, lr=lr, wd=cfg.wd,
                          batch_size=cfg.batch_size, seed=cfg.seed, quiet=cfg.quiet or not rank0,
                          callbacks=[tracking.MLflowEpochLogger()] if rank0 else [])
        log.info("training %s on %d ratings (%d users, %d items), lr %.3g, %d epochs", type(model).__name__,
                 len(train_df), n_users - 1, n_items - 1, lr, cfg.epochs)
        t_fit = time.perf_counter()
        history = trainer.fit(train, valid, epochs=cfg.epochs)
        train_seconds = time.perf_counter() - t_fit
        if not rank0:
            return None
        pred = trainer.predict(valid.xs).numpy()

        baseline = fit_bias_baseline(tu, ti, tr, n_users, n_items)
        global_rmse = rmse(vr, np.full_like(vr, baseline.mu))
        metrics: dict[str, Any] = {
            "valid_rmse": rmse(vr, pred), "valid_mae": mae(vr, pred),
            "baseline_rmse": rmse(vr, baseline.predict(vu, vi)), "global_mean_rmse": global_rmse,
            "train_seconds": train_seconds, "lr": lr,
        }
        relevant_min = scale[0] + 0.75 * (scale[1] - scale[0])  # 4 stars on a 1–5 scale
        metrics.update(ranking_metrics(model, tu, ti, vu, vi, vr, n_users, n_items, relevant_min))

        log.info("valid RMSE %.4f (bias baseline %.4f); forest checks", metrics["valid_rmse"],
                 metrics["baseline_rmse"])
        fcfg = ForestConfig(seed=cfg.seed, n_estimators=30, max_rows=100_000)
        f_train = activity_features(tu, ti, train_df["timestamp"].to_numpy(), tu, ti, tr, n_users, n_items)
        f_valid = activity_features(vu, vi, valid_df["timestamp"].to_numpy(), tu, ti, tr, n_users, n_items)
        adv = adversarial_validation(f_train, f_valid, cfg=fcfg)
        rf = rf_baseline(f_train.drop(columns="timestamp"), tr, f_valid.drop(columns="timestamp"), vr, rmse, fcfg)
        metrics.update({"adversarial_auc": adv.auc, "rf_valid_rmse": rf.valid_score})
        tracking.log_metrics(metrics)
        tracking.log_json({"adversarial": adv.to_dict() if hasattr(adv, "to_dict") else asdict(adv),
                           "rf_baseline": rf.to_dict()}, "checks/forest.json")

        titles = _titles(items, items_meta)
        plots = [lr_plot,
                 reports.learning_curves(history, tmp / "learning_curves.png", metric="rmse"),
                 reports.predicted_vs_actual(vr, pred, tmp / "pred_vs_actual.png", "valid ratings", discrete=True)]
        biases = item_biases(model)
        counts = np.bincount(ti, minlength=n_items)
        labels = [t or str(i) for t, i in zip(titles, items, strict=True)]
        if biases is not None:
            plots.append(reports.bias_bars(labels, biases.numpy()[1:], tmp / "item_bias.png"))
        top = np.argsort(-counts[1:], kind="stable")[:300]
        emb = item_factors(model).numpy()[1:][top]
        plots.append(reports.embedding_map(emb, [labels[j] for j in top], tmp / "item_embeddings.png",
                                           "Item embeddings (PCA), most-rated items labelled"))
        for p in plots:
            tracking.log_plot(p)

        cold_idx, cold_scores = cold_start_ranking(model, tu, ti, n_items, cfg.min_ratings_cold_start, cfg.seed)
        seen_ptr, seen_idx = csr_from_pairs(tu, ti, n_users)
        schema = InputSchema([InputField("user", "id", description="external user id"),
                              InputField("item", "id", description="external item id")])
        spec = RatingsSpec(
            model=ModelSpec.of(model), inputs=schema, users=[str(u) for u in users], items=[str(i) for i in items],
            item_titles=titles if any(titles) else None, rating_scale=list(scale), y_range=list(y_range),
            metrics={k: float(v) for k, v in metrics.items()}, data_fingerprint=fingerprint,
            training=asdict(cfg), run_id=run.info.run_id,
        )
        extras = {
            SEEN_INDPTR: torch.from_numpy(seen_ptr), SEEN_INDICES: torch.from_numpy(seen_idx.astype(np.int32)),
            COLD_START_RANK: torch.from_numpy(cold_idx), COLD_START_SCORES: torch.from_numpy(cold_scores),
        }
        bundle_dir = save_bundle(tmp / "bundle", spec, [model], extras=extras)
        example = valid_df[["user", "item"]].head(5).reset_index(drop=True)
        model_uri, logged_uri = tracking.log_bundle(bundle_dir, example, pred[:5].astype(np.float64))
        run_id = run.info.run_id
    registered = None
    if cfg.register:
        registered = tracking.register_and_promote(logged_uri, cfg.register, "valid_rmse",
                                                   float(metrics["valid_rmse"]), force=cfg.force)
    return {
        "run_id": run_id, "model_uri": model_uri, "registered": registered,
        "train_seconds": round(train_seconds, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def _titles(items: pd.Index, meta: pd.DataFrame | None) -> list[str | None]:
    if meta is None or "title" not in meta.columns:
        return [None] * len(items)
    lookup = meta.drop_duplicates("item", keep="last").set_index("item")["title"]
    found = lookup.reindex(items.to_numpy())
    return [None if pd.isna(t) else str(t) for t in found.to_numpy()]
