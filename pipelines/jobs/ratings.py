"""Ratings' domain parts of the training skeleton: ratings files → split → id vocabularies →
DotProductBias or EmbeddingNN (the rating model) and a ranking head trained on implicit feedback
(top-k, similar items), bias/popularity/forest baselines, ranking metrics under the held-out
protocol, and a ratings bundle that takes raw user and item ids.

Interaction data without ratings (clicks: user and item columns only) trains the ranking head
alone; the bundle then refuses rating predictions. `train_ratings(cfg)` runs `RatingsJob`
through `pipelines.jobs.base.run_job`; `find_lr` is `tabrec lr-find ratings`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modeling.baselines import BiasBaseline, cold_start_fill, fit_bias_baseline
from modeling.bundle import (
    BASELINE_ITEM_BIAS,
    BASELINE_USER_BIAS,
    COLD_START_RANK,
    COLD_START_SCORES,
    SEEN_INDICES,
    SEEN_INDPTR,
    ModelSpec,
    RankingChoice,
    RatingsSpec,
)
from modeling.collab import DotProductBias, EmbeddingNN, csr_from_pairs, item_biases, item_factors
from modeling.errors import DataError
from modeling.forest import ForestConfig, adversarial_validation, rf_baseline
from modeling.metrics import mae, rmse
from modeling.ranking import (
    HoldoutTopK,
    RankingTask,
    build_ranking_head,
    popularity,
    ranking_task,
    unique_pairs,
)
from modeling.ranking_select import FittedHead, fit_ranking_head
from modeling.schema import InputField, InputSchema
from modeling.training import (
    History,
    LRFinderResult,
    Objective,
    TensorData,
    Trainer,
    distributed,
)
from pipelines import reports, tracking
from pipelines.ingest.ratings import rating_scale, read_items, read_ratings
from pipelines.jobs import analysis as views
from pipelines.jobs.base import (
    BundleParts,
    Checks,
    Fitted,
    Trained,
    TrainingJob,
    run_job,
    seeded_lr_find,
)
from pipelines.jobs.config import MODEL_DEFAULTS, MODELS, SPLITS, RatingsConfig
from pipelines.jobs.ratings_eval import (
    activity_features,
    cold_start_ranking,
    popularity_cold_start,
    rmse_by_segment,
    split_ratings,
)

__all__ = ["MODELS", "MODEL_DEFAULTS", "SPLITS", "RatingsConfig", "RatingsData", "RatingsJob", "activity_features",
           "build_model", "cold_start_ranking", "find_lr", "load_data", "split_ratings", "train_ratings",
           "y_range_for"]

log = logging.getLogger("tabrec.train.ratings")
TOP_K = 10


@dataclass
class RatingsData:
    """The split, its id vocabularies and encoded arrays (index 0 = unknown id), built once.

    `implicit`: the data has no ratings (interactions only); `train`/`valid` are then the
    ranking head's rows and `ranking` its task."""

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
    scale: tuple[float, float] | None
    y_range: tuple[float, float] | None
    titles: list[str | None]
    files: list[str]
    implicit: bool = False
    ranking: RankingTask | None = None
    baseline: BiasBaseline | None = None

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

    def __init__(self, cfg: RatingsConfig) -> None:
        super().__init__(cfg)
        self.head: DotProductBias | None = None  # the ranking head, once trained
        self.head_history: History | None = None
        self.head_seconds = 0.0
        self.choice: RankingChoice | None = None  # how the head was chosen (inner split)
        self.head_split = (0.0, 0.0)  # seconds of the head's inner fit (and search) and of its refit

    def prepare(self) -> RatingsData:
        data = prepare(self.cfg)
        if data.implicit:  # the ranking head is the model: registration compares its NDCG
            self.target_metric, self.lower_is_better, self.curve_metric = f"ndcg_at_{TOP_K}", False, None  # type: ignore[misc]
        return data

    def datasets(self) -> list[views.DataInput]:
        return views.ratings_datasets(self.cfg, self.data)

    def analysis(self, fit: Fitted, checks: Checks, metrics: dict[str, float]) -> views.Analysis:
        # ranking by user activity from what the bundle recommends with: the ranking head when trained
        return views.ratings_analysis(self.data, fit, metrics, self.cfg.seed, ranker=self.head)

    def run_name(self) -> str:
        return "ratings-implicit" if self.data.implicit else f"ratings-{self.cfg.model}"

    def params(self) -> dict[str, Any]:
        d = self.data
        return {"n_users": d.n_users - 1, "n_items": d.n_items - 1, "n_train": len(d.train_df),
                "n_valid": len(d.valid_df), "y_range": None if d.y_range is None else list(d.y_range),
                "rating_scale": None if d.scale is None else list(d.scale), "implicit": d.implicit}

    def build_model(self) -> torch.nn.Module:
        d = self.data
        if d.implicit:
            return build_ranking_head(d.n_users, d.n_items, self.cfg.factors)
        assert d.y_range is not None
        return build_model(self.cfg, d.n_users, d.n_items, d.y_range)

    def finder_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # Drawn after the training model, not from a fresh seed like `tabrec lr-find ratings`:
        # how this job always drew it, so `--lr auto` keeps its figures.
        return self.build_model()

    @property
    def epoch_metrics(self) -> dict[str, Any]:
        return {} if self.data.implicit else {"rmse": rmse, "mae": mae}

    def objective(self) -> Objective | None:
        return self.data.ranking.objective if self.data.implicit and self.data.ranking else None

    def fit_networks(self, model: torch.nn.Module, lr: float, train: TensorData, valid: TensorData | None,
                     callbacks: list[Any]) -> Trained:
        """Interactions only: the ranking head is the model, chosen and refitted as beside a rating
        model (`fit_head`); otherwise the rating model's usual fit."""
        if not self.data.implicit:
            return super().fit_networks(model, lr, train, valid, callbacks)
        fitted = self.fit_head(lr, callbacks)
        return Trained([fitted.ranker], fitted.history, fitted.inner_seconds + fitted.refit_seconds)

    def train_heads(self, model: torch.nn.Module) -> float:
        """The ranking head beside the rating model (not with --no-ranking or interactions only)."""
        cfg, d = self.cfg, self.data
        if d.implicit or not cfg.ranking:
            return 0.0
        rank0 = distributed.current().is_main
        fitted = self.fit_head(cfg.ranking_lr, [tracking.MLflowEpochLogger(prefix="ranking/")] if rank0 else [])
        self.head_history, self.head = fitted.history, fitted.ranker
        self.head_seconds = fitted.inner_seconds + fitted.refit_seconds
        self.head_split = (fitted.inner_seconds, fitted.refit_seconds)
        return self.head_seconds

    def fit_head(self, lr: float, refit_callbacks: list[Any]) -> FittedHead:
        """The ranking head: epochs and popularity prior chosen on an inner split of the training
        pairs (`modeling.ranking_select`), then refitted on every training pair; the served
        ranker has the prior folded in. `refit_callbacks` (MLflow curves) see the refit only."""
        cfg, d = self.cfg, self.data
        quiet = cfg.quiet or not distributed.current().is_main

        def make_trainer(head: torch.nn.Module, objective: Any, extra: list[Any], refit: bool) -> Trainer:
            return Trainer(head, lr=lr, wd=cfg.ranking_wd, batch_size=cfg.ranking_batch_size, seed=cfg.seed,
                           quiet=quiet, objective=objective, callbacks=[*extra, *(refit_callbacks if refit else [])])

        log.info("training the ranking head (%s loss): epochs and popularity prior chosen on an inner split "
                 "of the training pairs, schedule of %d epochs", cfg.ranking_loss, cfg.ranking_epochs)
        fitted = fit_ranking_head(cfg.ranking_loss, d.tu, d.ti, d.n_users, d.n_items, cfg.ranking_epochs, cfg.factors,
                                  make_trainer, seed=cfg.seed, negatives=cfg.ranking_negatives, valid_users=d.vu,
                                  valid_items=d.vi, k=TOP_K)
        c = self.choice = fitted.choice
        log.info("ranking head: %d of %d epochs, score = %g * head + %g * log(1 + popularity) (inner P@%d %s, "
                 "popularity %s, t %s, %d inner splits)", c.epochs, c.schedule_epochs, c.head_weight, c.beta, TOP_K,
                 c.inner_precision, c.inner_pop_precision, c.inner_t, c.inner_folds)
        return fitted

    def evaluate(self, fit: Fitted) -> dict[str, float]:
        cfg, d = self.cfg, self.data
        metrics: dict[str, float] = {"train_seconds": fit.train_seconds, "lr": fit.lr}
        ranker = self.head if self.head is not None else fit.model
        holdout = HoldoutTopK.build(d.tu, d.ti, d.vu, d.vi, d.n_users, d.n_items, cfg.eval_users, cfg.seed)
        if not d.implicit:
            assert fit.valid_pred is not None and d.baseline is not None and d.scale is not None
            served = cold_start_fill(fit.valid_pred, d.vu, d.vi, d.baseline, d.scale)
            base = d.baseline.predict(d.vu, d.vi)
            metrics.update({"valid_rmse": rmse(d.vr, served), "valid_mae": mae(d.vr, served),
                            "baseline_rmse": rmse(d.vr, base),
                            "global_mean_rmse": rmse(d.vr, np.full_like(d.vr, d.baseline.mu))})
            metrics.update(rmse_by_segment(d.vr, served, base, d.vu, d.vi))
            log.info("valid RMSE %.4f (bias baseline %.4f)", metrics["valid_rmse"], metrics["baseline_rmse"])
            if self.head is not None:  # the rating model's own top-k, for comparison
                own = holdout.report(fit.model, TOP_K, prefix="rating_model_")
                metrics.update({k: v for k, v in own.items() if "precision" in k or "ndcg" in k})
        if self.head is not None:
            metrics["ranking_train_seconds"] = self.head_seconds
            metrics["ranking_inner_seconds"], metrics["ranking_refit_seconds"] = self.head_split
        if self.choice is not None:
            metrics.update(choice_metrics(self.choice))
        metrics.update(holdout.report(ranker, TOP_K))
        metrics.update(holdout.report_scores(popularity(unique_pairs(d.tu, d.ti)[1], d.n_items), TOP_K, "pop_"))
        metrics["ranking_eval_users"] = float(len(holdout.users))
        if f"precision_at_{TOP_K}" in metrics:
            log.info("top-%d precision %.4f (popularity %.4f)", TOP_K, metrics[f"precision_at_{TOP_K}"],
                     metrics[f"pop_precision_at_{TOP_K}"])
        return metrics

    def checks(self, fit: Fitted) -> Checks:
        """Can a forest tell valid rows from training rows, or predict ratings, from activity alone?"""
        d = self.data
        fcfg = ForestConfig(seed=self.cfg.seed, n_estimators=30, max_rows=100_000)
        tr = None if d.implicit else d.tr
        f_train = activity_features(d.tu, d.ti, d.train_df["timestamp"].to_numpy(), d.tu, d.ti, tr,
                                    d.n_users, d.n_items)
        f_valid = activity_features(d.vu, d.vi, d.valid_df["timestamp"].to_numpy(), d.tu, d.ti, tr,
                                    d.n_users, d.n_items)
        adv = adversarial_validation(f_train, f_valid, cfg=fcfg)
        report: dict[str, Any] = {"adversarial": adv.to_dict() if hasattr(adv, "to_dict") else asdict(adv)}
        metrics = {"adversarial_auc": adv.auc}
        if not d.implicit:
            rf = rf_baseline(f_train.drop(columns="timestamp"), d.tr, f_valid.drop(columns="timestamp"), d.vr, rmse,
                             fcfg)
            metrics["rf_valid_rmse"] = rf.valid_score
            report["rf_baseline"] = rf.to_dict()
        return Checks(metrics=metrics, report=report)

    def plots(self, fit: Fitted) -> list[Path | None]:
        d, tmp = self.data, fit.tmp
        plots: list[Path | None] = []
        if fit.valid_pred is not None:
            plots.append(reports.predicted_vs_actual(d.vr, fit.valid_pred, tmp / "pred_vs_actual.png",
                                                     "valid ratings", discrete=True))
        if self.head_history is not None and len(self.head_history):
            plots.append(reports.learning_curves(self.head_history, tmp / "ranking_learning_curves.png"))
        labels = [t or str(i) for t, i in zip(d.titles, d.items, strict=True)]
        biases = item_biases(fit.model)
        if biases is not None:
            plots.append(reports.bias_bars(labels, biases.numpy()[1:], tmp / "item_bias.png"))
        counts = np.bincount(d.ti, minlength=d.n_items)
        top = np.argsort(-counts[1:], kind="stable")[:300]
        emb = item_factors(self.head if self.head is not None else fit.model).numpy()[1:][top]
        plots.append(reports.embedding_map(emb, [labels[j] for j in top], tmp / "item_embeddings.png",
                                           "Item embeddings (PCA), most-rated items labelled"))
        return plots

    def bundle(self, fit: Fitted, metrics: dict[str, float], fingerprint: str, run_id: str) -> BundleParts:
        cfg, d, model = self.cfg, self.data, fit.model
        # Everything the user interacted with in the data given to training (train and valid) is
        # excluded from served recommendations; the metrics above exclude only training items.
        all_u, all_i = unique_pairs(np.concatenate([d.tu, d.vu]), np.concatenate([d.ti, d.vi]))
        known = (all_u > 0) & (all_i > 0)
        seen_ptr, seen_idx = csr_from_pairs(all_u[known], all_i[known], d.n_users)
        if d.implicit or self.head is not None:
            cold_idx, cold_scores = popularity_cold_start(all_u[known], all_i[known], d.n_items)
        else:
            cold_idx, cold_scores = cold_start_ranking(model, d.tu, d.ti, d.n_items, cfg.min_ratings_cold_start,
                                                       cfg.seed)
        schema = InputSchema([InputField("user", "id", description="external user id"),
                              InputField("item", "id", description="external item id")])
        spec = RatingsSpec(
            model=ModelSpec.of(model), inputs=schema, users=[str(u) for u in d.users],
            items=[str(i) for i in d.items], item_titles=d.titles if any(d.titles) else None,
            rating_scale=None if d.scale is None else list(d.scale),
            y_range=None if d.y_range is None else list(d.y_range),
            metrics={k: float(v) for k, v in metrics.items()}, data_fingerprint=fingerprint,
            training=asdict(cfg), run_id=run_id,
            ranking=ModelSpec.of(self.head, prefix="ranking") if self.head is not None else None,
            ranking_choice=self.choice,  # of `ranking`, or of `model` for interactions only
            global_mean=None if d.baseline is None else d.baseline.mu, interactions_only=d.implicit,
        )
        extras = {
            SEEN_INDPTR: torch.from_numpy(seen_ptr), SEEN_INDICES: torch.from_numpy(seen_idx.astype(np.int32)),
            COLD_START_RANK: torch.from_numpy(cold_idx), COLD_START_SCORES: torch.from_numpy(cold_scores),
        }
        if d.baseline is not None:
            extras[BASELINE_USER_BIAS] = torch.from_numpy(d.baseline.user_bias.astype(np.float32))
            extras[BASELINE_ITEM_BIAS] = torch.from_numpy(d.baseline.item_bias.astype(np.float32))
        example = d.valid_df[["user", "item"]].head(5).reset_index(drop=True)
        if d.implicit:  # no rating predictions: the signature's output is a placeholder column
            example_pred = np.full(len(example), np.nan)
        else:
            assert fit.valid_pred is not None and d.scale is not None and d.baseline is not None
            example_pred = cold_start_fill(fit.valid_pred[:5], d.vu[:5], d.vi[:5], d.baseline, d.scale)
        networks = [model, *([self.head] if self.head is not None else [])]
        return BundleParts(spec, networks, extras=extras, example=example, example_pred=example_pred)


def choice_metrics(c: RankingChoice) -> dict[str, float]:
    """The head's choice as run metrics (MLflow, `train --json`): chosen on the inner split only."""
    out = {"ranking_epochs_chosen": float(c.epochs), "ranking_prior_beta": c.beta,
           "ranking_head_weight": c.head_weight, "ranking_inner_users": float(c.inner_users),
           "ranking_inner_folds": float(c.inner_folds)}
    if c.inner_t is not None:
        out["ranking_inner_t"] = c.inner_t
    if c.inner_precision is not None:
        out[f"ranking_inner_precision_at_{TOP_K}"] = c.inner_precision
    if c.inner_pop_precision is not None:
        out[f"ranking_inner_pop_precision_at_{TOP_K}"] = c.inner_pop_precision
    return out


def prepare(cfg: RatingsConfig) -> RatingsData:
    """Read the ratings (and item titles), split, build the vocabularies and the tensors."""
    train_df, valid_df = load_data(cfg)
    implicit = bool(train_df.attrs.get("implicit")) or bool(valid_df.attrs.get("implicit"))
    if implicit and train_df["rating"].notna().any():
        raise DataError(f"{cfg.valid}: has no rating column while {cfg.ratings} has ratings; give both "
                        "files the same columns")
    items_meta = read_items(cfg.items) if cfg.items else None
    users, items = _vocab(train_df["user"]), _vocab(train_df["item"])
    tu, ti = _encode(users, train_df["user"]), _encode(items, train_df["item"])
    vu, vi = _encode(users, valid_df["user"]), _encode(items, valid_df["item"])
    tr = train_df["rating"].to_numpy(np.float32)
    vr = valid_df["rating"].to_numpy(np.float32)
    files = [p for p in (cfg.ratings, cfg.valid, cfg.items) if p]
    titles = _titles(items, items_meta)
    n_users, n_items = len(users) + 1, len(items) + 1
    if implicit:
        if not ((vu > 0) & (vi > 0)).any():
            raise DataError("no validation user is known from training: nothing to evaluate the ranking on; "
                            "use --split user-stratified or a validation file of known users")
        log.info("%s has no rating column: training the ranking head only (%s loss, %d epochs, lr %g, wd %g, "
                 "batch %d)", cfg.ratings, cfg.ranking_loss, cfg.ranking_epochs, cfg.ranking_lr, cfg.ranking_wd,
                 cfg.ranking_batch_size)
        # The effective config: the head is the model, so the main fit runs with the head's options.
        cfg.epochs, cfg.lr, cfg.wd = cfg.ranking_epochs, str(cfg.ranking_lr), cfg.ranking_wd
        cfg.batch_size = cfg.ranking_batch_size
        task = ranking_task(cfg.ranking_loss, tu, ti, n_users, n_items, vu, vi, n_negatives=cfg.ranking_negatives)
        valid = task.valid if task.valid is not None else TensorData(
            tuple(x[:0] for x in task.train.xs), task.train.y[:0])
        return RatingsData(train_df, valid_df, users, items, tu, ti, tr, vu, vi, vr, task.train, valid, None, None,
                           titles, files, implicit=True, ranking=task)
    scale = rating_scale(pd.concat([train_df["rating"], valid_df["rating"]]).to_frame("rating"))
    train = TensorData((torch.from_numpy(tu), torch.from_numpy(ti)), torch.from_numpy(tr))
    valid = TensorData((torch.from_numpy(vu), torch.from_numpy(vi)), torch.from_numpy(vr))
    baseline = fit_bias_baseline(tu, ti, tr, n_users, n_items)
    return RatingsData(train_df, valid_df, users, items, tu, ti, tr, vu, vi, vr, train, valid, scale,
                       y_range_for(scale), titles, files, baseline=baseline)


def load_data(cfg: RatingsConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the ratings and build the (train, valid) split the config asks for."""
    kw = dict(fmt=cfg.format, user_col=cfg.user_col, item_col=cfg.item_col, rating_col=cfg.rating_col,
              time_col=cfg.time_col, require_rating=False)
    ratings = read_ratings(cfg.ratings, **kw)
    if cfg.valid:
        return ratings, read_ratings(cfg.valid, **kw)
    train, valid = split_ratings(ratings, cfg.valid_frac, cfg.split, cfg.seed)
    train.attrs.update(ratings.attrs)
    valid.attrs.update(ratings.attrs)
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
    if train_df.attrs.get("implicit"):
        raise DataError(f"{cfg.ratings}: has no rating column; the lr finder tunes the rating model")
    users, items = _vocab(train_df["user"]), _vocab(train_df["item"])
    tu, ti = _encode(users, train_df["user"]), _encode(items, train_df["item"])
    train = TensorData((torch.from_numpy(tu), torch.from_numpy(ti)),
                       torch.from_numpy(train_df["rating"].to_numpy(np.float32)))
    y_range = y_range_for(rating_scale(train_df))
    return seeded_lr_find(cfg, lambda: build_model(cfg, len(users) + 1, len(items) + 1, y_range), train)
