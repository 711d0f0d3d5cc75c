"""Rossmann's random-forest checks beside the network (baseline, adversarial validation, permutation
importance, tree-spread confidence, OOB score, a forest fed the learned embeddings) and the spread
forest the bundle keeps for `score --uncertainty`; all on the processor's codes of the same split."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

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
from modeling.metrics import rmspe
from modeling.processor import TabularProcessor
from modeling.tabular import TabularModel
from modeling.training import TensorData
from pipelines.jobs.base import Checks
from pipelines.jobs.config import RossmannConfig

if TYPE_CHECKING:
    from pipelines.jobs.rossmann import PreparedData

log = logging.getLogger("tabrec.train.rossmann")


def log_rmspe(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """RMSPE of Sales from log(Sales) targets and predictions."""
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
