"""Rossmann's domain parts of the training skeleton: Kaggle files → features → processor →
TabularModel on log(Sales), forest checks, and a tabular bundle that takes raw Kaggle rows.

`train_rossmann(cfg)` runs `RossmannJob` through `pipelines.jobs.base.run_job`; `prepare`,
`build_model` and `find_lr` are also what `tabrec lr-find rossmann` and the benchmarks use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

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
from modeling.level import LEVEL_OFFSETS, RecentLevel, level_of
from modeling.metrics import exp_rmspe
from modeling.processor import TabularProcessor
from modeling.tabular import TabularModel, new_tabular_model
from modeling.training import Callback, LRFinderResult, TensorData, distributed
from modeling.training.background import train_members_worker
from modeling.training.ensemble import Members, predict_mean, train_members
from modeling.training.trainer import resolve_precision
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
from pipelines.jobs.base import (
    BundleParts,
    Checks,
    Fitted,
    RefitTask,
    Trained,
    TrainingJob,
    run_job,
    seeded_lr_find,
)
from pipelines.jobs.config import AUTO, RossmannConfig
from pipelines.jobs.rossmann_checks import log_rmspe, run_forest_checks, spread_forest

__all__ = ["RossmannConfig", "RossmannJob", "PreparedData", "auto_batch_size", "auto_cycle_epochs", "auto_epochs",
           "build_model", "drift_sample", "find_lr", "log_rmspe", "prepare", "resolve_options", "rmspe_metric", "run_forest_checks",
           "spread_forest", "train_rossmann"]

log = logging.getLogger("tabrec.train.rossmann")

LEVEL_COLUMN = "Store"  # the entity whose recent level `--level-days` corrects
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
                "external": self.cfg.external_dir is not None, **self.requested}

    def resolve(self) -> None:
        self.requested = {f"{k}_requested": getattr(self.cfg, k) for k in ("epochs", "batch_size", "cycle_epochs", "precision")}
        self.cfg = resolve_options(self.cfg, len(self.data.train))
        log.info("batch size %d, %d epochs (%d steps an epoch), %s%s", self.cfg.batch_size, self.cfg.epochs,
                 math.ceil(len(self.data.train) / self.cfg.batch_size), self.cfg.precision,
                 f", {self.cfg.ensemble} {self.cfg.ensemble_kind} members" if self.cfg.ensemble > 1 else "")

    def build_model(self) -> TabularModel:
        return build_model(self.cfg, self.data)

    def settle_lr(self, suggested: float) -> float:
        """The lr finder's suggestion within `auto_lr_bounds`: on the real data it suggests
        3.4e-3-4e-3 and 3e-3-5e-3 train better than 2e-3; on synthetic 4k-19k rows the runs whose
        suggestion fell under 3e-3 (1.7e-4, 1.1e-3) lost to their forest and those above it won
        (docs/benchmarks.md), so the floor catches a noisy sweep's low reading."""
        lo, hi = self.cfg.auto_lr_bounds
        return float(min(max(suggested, lo), hi))

    @property
    def epoch_metrics(self) -> dict[str, Any]:
        return {"rmspe": rmspe_metric}

    def member_options(self, lr: float, valid: TensorData | None, quiet: bool) -> dict[str, Any]:
        """`train_members`' settings (picklable: a refit worker gets them too)."""
        cfg = self.cfg
        return dict(members=cfg.ensemble, kind=cfg.ensemble_kind, epochs=int(cfg.epochs),
                    cycle_epochs=int(cfg.cycle_epochs), seed=cfg.seed,
                    trainer_kwargs={"lr": lr, "wd": cfg.wd, "batch_size": int(cfg.batch_size), "quiet": quiet,
                                    "mixed_precision": cfg.precision == "bf16",
                                    "metrics": self.epoch_metrics if valid is not None else {}})

    def fit_networks(self, model: nn.Module, lr: float, train: TensorData, valid: TensorData | None,
                     callbacks: list[Callback]) -> Trained:
        """The model and its ensemble members (`train_members`), each kept at the end of its schedule:
        nothing is chosen on the validation rows."""
        quiet = self.cfg.quiet or not distributed.current().is_main
        members = train_members(model_builder(self.cfg, self.data), train, valid,
                                callbacks=lambda i: callbacks if i == 0 else [],
                                **self.member_options(lr, valid, quiet))
        return trained_from(members)

    def refit_task(self, lr: float) -> RefitTask | None:
        """The refit as a worker's task (`train_members_worker`), when `--parallel-refit` is on."""
        rows = self.refit_rows()
        if rows is None or not self.cfg.parallel_refit:
            return None
        args = (model_builder(self.cfg, self.data), rows, self.member_options(lr, None, quiet=True))
        return RefitTask(train_members_worker, args, len(rows), trained_from)

    def refit_rows(self) -> TensorData | None:
        if not self.cfg.refit:
            return None
        tr, va = self.data.train, self.data.valid
        return TensorData(tuple(torch.cat([a, b]) for a, b in zip(tr.xs, va.xs, strict=True)), torch.cat([tr.y, va.y]))

    def level(self, networks: list[nn.Module], refit: bool) -> RecentLevel:
        """The recent-level correction of `networks`: from their residuals over the last
        `level_days` days of the rows they trained on (the training rows; train + valid for a refit)."""
        d = self.data
        parts = [(d.train.xs, d.train.y, d.train_rows["Date"].to_numpy())]
        if refit:
            parts.append((d.valid.xs, d.valid.y, d.valid_rows["Date"].to_numpy()))
        col = d.processor.cat_names_out.index(LEVEL_COLUMN)
        return level_of(networks, parts, self.cfg.level_days, LEVEL_COLUMN, col, len(d.processor.vocab[LEVEL_COLUMN]) + 1)

    def valid_level(self, level: RecentLevel | None) -> np.ndarray | float:
        """`level`'s offsets for the validation rows (0 without one)."""
        if level is None:
            return 0.0
        return level(self.data.valid.xs[0][:, self.data.processor.cat_names_out.index(level.column)].numpy())

    def calibrate(self, fit: Fitted) -> None:
        """The recent-level correction (`--level-days`, modeling/level.py): fitted on the validation
        run's training rows and folded into its validation predictions; the logged networks' (the
        refit's) is fitted on all rows and goes into the bundle."""
        if self.cfg.level_days < 1 or fit.valid_pred is None:
            return
        fit.info["valid_pred_networks"] = fit.valid_pred
        fit.level = self.level(fit.networks, refit=False)
        fit.valid_pred = fit.valid_pred + self.valid_level(fit.level)
        fit.logged_level = self.level(fit.refit.networks, refit=True) if fit.refit is not None else fit.level
        log.info("recent level (last %d days): tau %.4f, sigma %.4f over %d stores, persistence t %.1f: %s",
                 self.cfg.level_days, fit.level.tau, fit.level.sigma, fit.level.entities, fit.level.persistence_t,
                 "applied" if fit.level.applied else "not applied (levels not shown to persist)")

    def evaluate(self, fit: Fitted) -> dict[str, float]:
        """Validation figures of the validation run's final weights (the ensemble's mean), never a
        pick among epochs; the best per-epoch figure is kept under a name that says it was selected
        on the validation rows."""
        y = self.data.valid.y.numpy()
        per_epoch = [e["rmspe"] for e in fit.history if "rmspe" in e]
        refit_seconds = fit.refit.seconds if fit.refit is not None else 0.0
        # epochs of training in the validation run (a seeds ensemble trains each member's epochs)
        epochs_trained = len(fit.history) * (len(fit.networks) if self.cfg.ensemble_kind == "seeds" else 1)
        metrics = {"valid_rmspe": log_rmspe(y, fit.valid_pred),
                   "valid_rmspe_best_epoch_selected_on_valid": min(per_epoch) if per_epoch else float("nan"),
                   "train_seconds": fit.wall_seconds or fit.train_seconds + refit_seconds,
                   "valid_run_seconds": fit.train_seconds,
                   "seconds_per_epoch": fit.train_seconds / max(1, epochs_trained), "lr": fit.lr,
                   "ensemble_members": float(len(fit.networks)),
                   "epochs": float(self.cfg.epochs), "batch_size": float(self.cfg.batch_size)}
        leveled = fit.level is not None

        levels = {tuple(map(id, fit.networks)): fit.level}  # fitted once per set of networks

        def with_level(networks: list[nn.Module], pred: np.ndarray) -> np.ndarray:
            # each member (and first-k mean) with the level fitted on its own residuals: what it would serve
            if not leveled:
                return pred
            key = tuple(map(id, networks))
            if key not in levels:
                levels[key] = self.level(networks, refit=False)
            return pred + self.valid_level(levels[key])

        if leveled:
            metrics.update(valid_rmspe_networks_only=log_rmspe(y, fit.info["valid_pred_networks"]),
                           level_tau=fit.level.tau, level_sigma=fit.level.sigma,
                           level_persistence_t=fit.level.persistence_t, level_applied=float(fit.level.applied))
        if len(fit.networks) > 1:
            preds = [predict_mean([net], self.data.valid.xs).numpy() for net in fit.networks]
            for i, p in enumerate(preds):
                metrics[f"valid_rmspe_member_{i}"] = log_rmspe(y, with_level([fit.networks[i]], p))
            # seconds of training behind each member (snapshot: the run up to its cycle's end)
            member_seconds = [float(s) for s in fit.info.get("member_seconds", [])]
            for i, sec in enumerate(member_seconds):
                metrics[f"train_seconds_member_{i}"] = sec
            # the ensembles of the first k members (k = 1..N): what `--ensemble k` would have given
            # (same seed and lr), and the training seconds behind it; accuracy per second in one run
            total = np.zeros_like(preds[0])
            for k, p in enumerate(preds, start=1):
                total += p
                metrics[f"valid_rmspe_first_{k}"] = log_rmspe(y, with_level(fit.networks[:k], total / k))
                if len(member_seconds) == len(preds):
                    snapshot = self.cfg.ensemble_kind == "snapshot"
                    metrics[f"train_seconds_first_{k}"] = member_seconds[k - 1] if snapshot else sum(member_seconds[:k])
        return metrics

    def checks(self, fit: Fitted) -> Checks:
        return run_forest_checks(self.cfg, self.data, fit.model, fit.tmp)

    def plots(self, fit: Fitted) -> list[Path | None]:
        y_va = self.data.valid.y.numpy()
        return [reports.predicted_vs_actual(np.exp(y_va), np.exp(fit.valid_pred), fit.tmp / "pred_vs_actual.png",
                                            "valid Sales"),
                *_embedding_maps(fit.model, self.data, fit.tmp)]

    def bundle(self, fit: Fitted, metrics: dict[str, float], fingerprint: str, run_id: str) -> BundleParts:
        cfg, data, networks = self.cfg, self.data, fit.logged
        model = networks[0]
        spread_tensors, uncertainty = spread_forest(cfg, data, fit.valid_pred)
        training = {**asdict(cfg), "logged_weights": "refit" if fit.refit is not None else "validation run",
                    "ensemble_members": len(networks)}
        spec = TabularSpec(
            model=ModelSpec.of(model), members=[ModelSpec.of(net, f"member{i}") for i, net in enumerate(networks[1:], 1)],
            inputs=input_schema(), processor=data.processor.to_dict(),
            target=Target("Sales", "log"), zero_when=[ZeroRule("Open", 0)], key_columns=["Id"],
            y_range=list(model.config()["y_range"]), metrics={k: float(v) for k, v in metrics.items()},
            data_fingerprint=fingerprint, training=training, run_id=run_id, uncertainty=uncertainty,
            level=fit.logged_level.describe() if fit.logged_level is not None else None,
        )
        if fit.logged_level is not None:
            spread_tensors[LEVEL_OFFSETS] = torch.from_numpy(fit.logged_level.offsets)
        log.info("forest baseline RMSPE %.4f, adversarial AUC %.3f; logging the model",
                 metrics["rf_valid_rmspe"], metrics["adversarial_auc"])
        example = data.raw_valid.head(5).copy()
        example["Date"] = example["Date"].dt.strftime("%Y-%m-%d")
        example["Open"] = example["Open"].astype("float64")  # test.csv has missing Open values
        example_pred = predict_mean(networks, tuple(x[:5] for x in data.valid.xs)).numpy().astype(np.float64)
        if fit.logged_level is not None:
            example_pred += fit.logged_level(data.valid.xs[0][:5, data.processor.cat_names_out.index(LEVEL_COLUMN)].numpy())
        return BundleParts(spec, networks, extras={**drift_sample(data.train, cfg.seed), **spread_tensors},
                           features=data.pipeline, example=example,
                           example_pred=np.exp(example_pred).astype(np.float64))


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


AUTO_BATCH_ROWS = 1600  # rows per step of 'auto' batch size: 804k Kaggle rows -> 512
AUTO_BATCH_RANGE = (64, 1024)


def auto_batch_size(n_rows: int) -> int:
    """n_rows / AUTO_BATCH_ROWS rounded to a power of two, within AUTO_BATCH_RANGE: the real 804k
    rows get 512 (the batch the large-data defaults were measured at), 10k-100k rows get 64."""
    lo, hi = AUTO_BATCH_RANGE
    target = max(n_rows / AUTO_BATCH_ROWS, 1.0)
    return int(min(max(2 ** round(math.log2(target)), lo), hi))


def auto_epochs(n_rows: int, batch_size: int, steps: int, min_epochs: int) -> int:
    """Enough epochs for `steps` optimizer steps, at least `min_epochs`."""
    per_epoch = max(1, math.ceil(n_rows / batch_size))
    return max(int(min_epochs), math.ceil(steps / per_epoch))


def auto_cycle_epochs(first_epochs: int) -> int:
    """Epochs of each later snapshot cycle: half the first cycle, at least 1 (the real 804k rows:
    4 + 2 + 2 epochs). Measured on the real data (bf16, docs/benchmarks.md): three snapshots of
    4 + 2 + 2 epochs reach valid RMSPE 0.1059 where 4 + 1 + 1 reached 0.1070 and three seeds of 4
    epochs each (12 epochs) 0.1069; the 1-epoch restarts leave the members too close to the
    first one to gain from averaging. The faster epochs (SparseDropout, bf16) pay for the two
    extra epochs of each run."""
    return max(1, round(first_epochs / 2))


def resolve_options(cfg: RossmannConfig, n_train: int) -> RossmannConfig:
    """`cfg` with 'auto' batch size, epochs and cycle length settled for `n_train` training rows.
    A refit uses these same values (same epochs: every row is seen as often as in the validation run)."""
    bs = auto_batch_size(n_train) if cfg.batch_size == AUTO else int(cfg.batch_size)
    epochs = auto_epochs(n_train, bs, cfg.steps, cfg.min_epochs) if cfg.epochs == AUTO else int(cfg.epochs)
    cycle = auto_cycle_epochs(epochs) if cfg.cycle_epochs == AUTO else int(cfg.cycle_epochs)
    return replace(cfg, batch_size=bs, epochs=epochs, cycle_epochs=cycle, precision=resolve_precision(cfg.precision))


def dropouts_for(cfg: RossmannConfig) -> tuple[float, ...]:
    """One dropout per hidden layer: cfg.ps when it matches --layers, else ps[0] for every layer but
    the last and ps[-1] for the last (so `--layers 8` or `--layers 64,32,16` just work)."""
    n = len(cfg.layers)
    if len(cfg.ps) == n:
        return tuple(cfg.ps)
    return tuple([cfg.ps[0]] * (n - 1) + [cfg.ps[-1]]) if n else ()


def build_model(cfg: RossmannConfig, data: PreparedData) -> TabularModel:
    return model_builder(cfg, data)()


def model_builder(cfg: RossmannConfig, data: PreparedData) -> partial[TabularModel]:
    """A picklable zero-argument builder of the network (a refit worker builds it too): y_range up
    to 1.1 x the largest training target, output bias at the training mean."""
    emb_szs = get_emb_szs(data.processor.cardinalities, cfg.emb_overrides or None)
    return partial(new_tabular_model, emb_szs, len(data.processor.cont_names), tuple(cfg.layers), dropouts_for(cfg),
                   cfg.embed_p, (0.0, float(data.train.y.max()) * 1.1), float(data.train.y.mean()))


def trained_from(members: Members) -> Trained:
    """`fit_networks`' result from `train_members`' (in this process or a refit worker)."""
    return Trained(members.networks, members.history, members.seconds,
                   {"member_seconds": members.member_seconds, "member_epochs": members.member_epochs,
                    "epochs_trained": members.epochs_trained, **members.info})


def find_lr(cfg: RossmannConfig, data: PreparedData) -> LRFinderResult:
    """`tabrec lr-find rossmann`: the lr finder on the model training would build."""
    cfg = resolve_options(cfg, len(data.train))
    return seeded_lr_find(cfg, lambda: build_model(cfg, data), data.train)


def rmspe_metric(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The per-epoch metric: RMSPE of Sales from predictions and targets of log(Sales)."""
    return exp_rmspe(target, pred)


def drift_sample(train: TensorData, seed: int, n: int = 5000) -> dict[str, torch.Tensor]:
    """A seeded sample of processed training features, kept in the bundle for batch drift checks."""
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(np.sort(rng.choice(len(train), size=min(n, len(train)), replace=False)))
    return {DRIFT_X_CAT: train.xs[0][idx], DRIFT_X_CONT: train.xs[1][idx]}


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
