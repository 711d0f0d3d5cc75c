"""Rossmann's domain parts of the training skeleton: Kaggle files → features → processor →
TabularModel on log(Sales), forest checks, and a tabular bundle that takes raw Kaggle rows.

`train_rossmann(cfg)` runs `RossmannJob` through `pipelines.jobs.base.run_job`; `prepare`,
`build_model` and `find_lr` are also what `tabrec lr-find rossmann` and the benchmarks use.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modeling.bundle import (
    DRIFT_X_CAT,
    DRIFT_X_CONT,
    ModelSpec,
    TabularSpec,
    Target,
    ZeroRule,
)
from modeling.embeddings import get_emb_szs
from modeling.errors import DataError
from modeling.forest import (
    ForestConfig,
    adversarial_validation,
    embedding_features,
    error_by_confidence,
    permutation_importance_check,
    plot_adversarial,
    plot_confidence,
    plot_importance,
    rf_baseline,
    tree_confidence,
)
from modeling.metrics import exp_rmspe, rmspe
from modeling.processor import TabularProcessor
from modeling.tabular import TabularModel
from modeling.training import Callback, EarlyStopping, LRFinderResult, TensorData
from pipelines import reports
from pipelines.features.rossmann import (
    build_feature_pipeline,
    feature_columns,
    input_schema,
    split_by_days,
    training_rows,
)
from pipelines.ingest.external import read_external
from pipelines.ingest.rossmann import (
    check_calendar,
    check_stores,
    read_calendar,
    read_store,
    read_train,
)
from pipelines.jobs import analysis as views
from pipelines.jobs.base import BundleParts, Checks, Fitted, TrainingJob, run_job, seeded_lr_find
from pipelines.jobs.config import RossmannConfig

__all__ = ["RossmannConfig", "RossmannJob", "PreparedData", "build_model", "drift_sample", "find_lr",
           "log_rmspe", "prepare", "rmspe_metric", "run_forest_checks", "spread_forest", "train_rossmann"]

log = logging.getLogger("tabrec.train.rossmann")

RAW_COLUMNS = ["Store", "DayOfWeek", "Date", "Open", "Promo", "StateHoliday", "SchoolHoliday"]


@dataclass
class PreparedData:
    """Everything the model and the checks train on, built once."""

    processor: TabularProcessor
    pipeline: Any
    train_rows: pd.DataFrame
    valid_rows: pd.DataFrame
    train: TensorData
    valid: TensorData
    cats: list[str]
    conts: list[str]
    raw_valid: pd.DataFrame
    files: list[str]


def train_rossmann(cfg: RossmannConfig) -> dict[str, Any] | None:
    """Train, check, track and save; the CLI's result dict (None on torchrun ranks other than 0)."""
    return run_job(RossmannJob(cfg))


class RossmannJob(TrainingJob[RossmannConfig, PreparedData]):
    pipeline = "rossmann"
    target_metric = "valid_rmspe"
    curve_metric = "rmspe"
    baselines = {"rf_valid_rmspe": "random forest (same inputs)",
                 "rf_embeddings_valid_rmspe": "random forest on the network's embeddings"}

    def prepare(self) -> PreparedData:
        return prepare(self.cfg)

    def datasets(self) -> list[views.DataInput]:
        return views.rossmann_datasets(self.cfg, self.data)

    def analysis(self, fit: Fitted, checks: Checks, metrics: dict[str, float]) -> views.Analysis:
        return views.rossmann_analysis(self.data, fit, checks, self.cfg.seed)

    def run_name(self) -> str:
        return "rossmann-tabular"

    def params(self) -> dict[str, Any]:
        d = self.data
        return {"n_train": len(d.train), "n_valid": len(d.valid), "cat_columns": d.cats, "cont_columns": d.conts,
                "external": self.cfg.external_dir is not None}

    def build_model(self) -> TabularModel:
        return build_model(self.cfg, self.data)

    @property
    def epoch_metrics(self) -> dict[str, Any]:
        return {"rmspe": rmspe_metric}

    def callbacks(self) -> list[Callback]:
        # patience >= epochs: never stops early, but restores the best epoch's weights
        return [EarlyStopping(monitor="rmspe", mode="min", patience=max(2, self.cfg.epochs))]

    def evaluate(self, fit: Fitted) -> dict[str, float]:
        return {"valid_rmspe": log_rmspe(self.data.valid.y.numpy(), fit.valid_pred),
                "train_seconds": fit.train_seconds,
                "seconds_per_epoch": fit.train_seconds / max(1, len(fit.history)), "lr": fit.lr}

    def checks(self, fit: Fitted) -> Checks:
        return run_forest_checks(self.cfg, self.data, fit.model, fit.tmp)

    def plots(self, fit: Fitted) -> list[Path | None]:
        y_va = self.data.valid.y.numpy()
        return [reports.predicted_vs_actual(np.exp(y_va), np.exp(fit.valid_pred), fit.tmp / "pred_vs_actual.png",
                                            "valid Sales"),
                *_embedding_maps(fit.model, self.data, fit.tmp)]

    def bundle(self, fit: Fitted, metrics: dict[str, float], fingerprint: str, run_id: str) -> BundleParts:
        cfg, data, model = self.cfg, self.data, fit.model
        spread_tensors, uncertainty = spread_forest(cfg, data, fit.valid_pred)
        spec = TabularSpec(
            model=ModelSpec.of(model), inputs=input_schema(), processor=data.processor.to_dict(),
            target=Target("Sales", "log"), zero_when=[ZeroRule("Open", 0)], key_columns=["Id"],
            y_range=list(model.config()["y_range"]), metrics={k: float(v) for k, v in metrics.items()},
            data_fingerprint=fingerprint, training=asdict(cfg), run_id=run_id, uncertainty=uncertainty,
        )
        log.info("forest baseline RMSPE %.4f, adversarial AUC %.3f; logging the model",
                 metrics["rf_valid_rmspe"], metrics["adversarial_auc"])
        example = data.raw_valid.head(5).copy()
        example["Date"] = example["Date"].dt.strftime("%Y-%m-%d")
        example["Open"] = example["Open"].astype("float64")  # test.csv has missing Open values
        return BundleParts(spec, [model], extras={**drift_sample(data.train, cfg.seed), **spread_tensors},
                           features=data.pipeline, example=example,
                           example_pred=np.exp(fit.valid_pred[:5]).astype(np.float64))


def prepare(cfg: RossmannConfig) -> PreparedData:
    log.info("reading %s and %s", cfg.train, cfg.store)
    train_raw = read_train(cfg.train)
    store = read_store(cfg.store)
    check_stores(train_raw, store, cfg.train)
    external = read_external(cfg.external_dir) if cfg.external_dir else None
    if external is not None and external.empty:
        raise DataError(f"--external-dir {cfg.external_dir}: no external tables found there")
    calendar = None
    if cfg.calendar:  # known future events: checked against train.csv, then added to the calendar
        calendar = read_calendar(cfg.calendar)
        check_calendar(calendar, train_raw, cfg.calendar)
    log.info("engineering features for %d rows%s", len(train_raw), " with external tables" if external else "")
    pipeline = build_feature_pipeline(store, external)
    feats = pipeline.fit_transform(train_raw, calendar=calendar)
    rows = training_rows(feats)
    if len(rows) == 0:
        raise DataError(f"{cfg.train}: no open days with Sales > 0 to train on")
    tr_rows, va_rows = split_by_days(rows, cfg.valid_days)
    if len(tr_rows) == 0 or len(va_rows) == 0:
        raise DataError(f"{cfg.train}: --valid-days {cfg.valid_days} leaves an empty train or valid set")
    cats, conts = feature_columns(external is not None, trends=cfg.trends)
    proc = TabularProcessor(cats, conts).fit(tr_rows)
    train = _tensors(proc, tr_rows)
    valid = _tensors(proc, va_rows)
    raw_valid = va_rows[[c for c in RAW_COLUMNS if c in va_rows.columns]].reset_index(drop=True)
    files = [cfg.train, cfg.store, *([cfg.calendar] if cfg.calendar else [])]
    log.info("training rows %d, validation rows %d (last %d days), %d categorical + %d continuous inputs",
             len(train), len(valid), cfg.valid_days, len(proc.cat_names_out), len(proc.cont_names))
    return PreparedData(proc, pipeline, tr_rows, va_rows, train, valid, cats, conts, raw_valid, files)


def _tensors(proc: TabularProcessor, rows: pd.DataFrame) -> TensorData:
    x_cat, x_cont = proc.transform(rows)
    y = np.log(rows["Sales"].to_numpy(np.float64)).astype(np.float32)
    return TensorData((torch.from_numpy(x_cat), torch.from_numpy(x_cont)), torch.from_numpy(y))


def build_model(cfg: RossmannConfig, data: PreparedData) -> TabularModel:
    y_max = float(data.train.y.max())
    emb_szs = get_emb_szs(data.processor.cardinalities, cfg.emb_overrides or None)
    model = TabularModel(emb_szs, len(data.processor.cont_names), layers=cfg.layers, ps=cfg.ps,
                         embed_p=cfg.embed_p, y_range=(0.0, y_max * 1.1))
    model.init_output_bias(float(data.train.y.mean()))
    return model


def find_lr(cfg: RossmannConfig, data: PreparedData) -> LRFinderResult:
    """`tabrec lr-find rossmann`: the lr finder on the model training would build."""
    return seeded_lr_find(cfg, lambda: build_model(cfg, data), data.train)


def rmspe_metric(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The per-epoch metric: RMSPE of Sales from predictions and targets of log(Sales)."""
    return exp_rmspe(target, pred)


def log_rmspe(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return rmspe(np.exp(y_true), np.exp(y_pred))


def _codes_frame(data: TensorData, proc: TabularProcessor) -> pd.DataFrame:
    x_cat, x_cont = data.xs
    frame = pd.DataFrame(x_cat.numpy(), columns=proc.cat_names_out)
    for j, name in enumerate(proc.cont_names):
        frame[name] = x_cont[:, j].numpy()
    return frame


def run_forest_checks(cfg: RossmannConfig, data: PreparedData, model: TabularModel, tmp: Path) -> Checks:
    """Baseline, adversarial validation, importance, confidence, OOB and embedding-fed forest."""
    fcfg = ForestConfig(n_estimators=cfg.forest_trees, max_rows=cfg.forest_rows, seed=cfg.seed)
    x_tr, x_va = _codes_frame(data.train, data.processor), _codes_frame(data.valid, data.processor)
    y_tr, y_va = data.train.y.numpy(), data.valid.y.numpy()
    metric = log_rmspe
    base = rf_baseline(x_tr, y_tr, x_va, y_va, metric, fcfg)
    adv = adversarial_validation(x_tr, x_va, cfg=ForestConfig(n_estimators=30, max_rows=100_000, seed=cfg.seed))
    importance = permutation_importance_check(base.model, x_va, y_va, metric, seed=cfg.seed)
    spread = tree_confidence(base.model, x_va)
    conf_bins = error_by_confidence(spread, y_va, base.valid_pred)
    emb_cols = {c: model.embeds[j].weight.detach().numpy() for j, c in enumerate(data.processor.cat_names_out)
                if model.embeds[j].weight.shape[1] > 1 and data.processor.cardinalities[c] > 50}
    emb_fcfg = ForestConfig(n_estimators=cfg.forest_trees, max_rows=min(cfg.forest_rows, 100_000), seed=cfg.seed)
    emb_rf = rf_baseline(embedding_features(x_tr, emb_cols), y_tr, embedding_features(x_va, emb_cols), y_va,
                         metric, emb_fcfg)
    plots: list[Path | None] = [
        plot_importance(importance[:25], tmp / "rf_importance.png", "Permutation importance (valid RMSPE increase)"),
        plot_adversarial(adv, tmp / "adversarial_validation.png"),
        plot_confidence(conf_bins, tmp / "rf_confidence.png"),
    ]
    return Checks(
        metrics={"rf_valid_rmspe": base.valid_score, "rf_oob_r2": base.oob_r2,
                 "adversarial_auc": adv.auc, "rf_embeddings_valid_rmspe": emb_rf.valid_score,
                 "rf_train_seconds": base.train_seconds},
        report={"baseline": base.to_dict(), "adversarial": _asdict(adv), "importance": importance[:40],
                "confidence_bins": conf_bins, "embedding_forest": emb_rf.to_dict(),
                "embedding_columns": sorted(emb_cols)},
        plots=plots,
    )


def _asdict(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else asdict(obj)


def drift_sample(train: TensorData, seed: int, n: int = 5000) -> dict[str, torch.Tensor]:
    """A seeded sample of processed training features, kept in the bundle for batch drift checks."""
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(np.sort(rng.choice(len(train), size=min(n, len(train)), replace=False)))
    return {DRIFT_X_CAT: train.xs[0][idx], DRIFT_X_CONT: train.xs[1][idx]}


def spread_forest(cfg: RossmannConfig, data: PreparedData,
                  valid_pred: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A node-capped forest on the processed training features, as plain arrays for the bundle
    (`score --uncertainty`: spread = std of its trees' predictions of log(Sales)), and its
    description, with the model's validation RMSE (log scale) per spread bin."""
    if cfg.spread_trees < 1:
        return {}, None
    from modeling.forest import fit_spread_forest

    fcfg = ForestConfig(n_estimators=cfg.spread_trees, max_leaf_nodes=cfg.spread_leaves,
                        max_rows=cfg.forest_rows, seed=cfg.seed)
    sf = fit_spread_forest(_codes_frame(data.train, data.processor), data.train.y.numpy(), fcfg)
    _, spread_va = sf.arrays.spread(_codes_frame(data.valid, data.processor).to_numpy(np.float32))
    info = {**sf.info(), "target": "log(Sales)",
            "spread": "std over the trees of their predictions of log(Sales); 0 where a zero_when rule applies",
            "valid_bins": error_by_confidence(spread_va, data.valid.y.numpy(), valid_pred)}
    log.info("spread forest: %d trees, %d nodes (%.2f MB) in %.1f s", sf.arrays.n_trees, sf.arrays.n_nodes,
             sf.arrays.nbytes / 1e6, sf.train_seconds)
    return {k: torch.from_numpy(v) for k, v in sf.arrays.to_arrays().items()}, info


def _embedding_maps(model: TabularModel, data: PreparedData, tmp: Path) -> list[Path]:
    out = []
    names = data.processor.cat_names_out
    for col in ("Store", "State"):
        if col not in names:
            continue
        j = names.index(col)
        emb = model.embeds[j].weight.detach().numpy()[1:]
        labels = data.processor.vocab[col]
        out.append(reports.embedding_map(emb, labels, tmp / f"embedding_{col.lower()}.png",
                                         f"{col} embeddings (PCA)", annotate=40))
    return out
