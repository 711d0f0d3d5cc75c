"""One training skeleton for every domain: `run_job` is the tracked run, a `TrainingJob` the domain.

`run_job(job)` is a template method. It owns the stages every training shares, in this order:

1. validate the config, `job.prepare()` the data (before any run exists: bad input leaves no run),
   `job.resolve()` the options that depend on the data (e.g. epochs "auto");
2. open the MLflow run (tags: pipeline, data fingerprint, git commit), log every config value
   plus `job.params()` as params and `job.datasets()` as the run's inputs (train, valid);
3. `torch.manual_seed(seed)`, then `job.build_model()` (trained with `job.objective()` when the
   job's loss needs the model and the batch, e.g. a ranking loss);
4. with `--lr auto`, the lr finder on `job.finder_model(model)` (a deepcopy is trained, the
   model itself is untouched); rank 0 runs it and broadcasts the value;
5. `job.fit_networks` (by default one `Trainer.fit` with `job.epoch_metrics`, the per-epoch MLflow
   logger (`epoch/...` history) and `job.callbacks()`; a job may train several networks, e.g. an
   ensemble); then `job.train_heads(model)` (on every rank): further networks the bundle carries
   beside the model, such as a ranking head, trained with the same engine (their seconds join
   train_seconds);
5b. refit: when `job.refit_rows()` gives rows (train + valid), the same `fit_networks` again on
   them, from the same seed, with the same lr and settings and no validation set (its history
   as `refit/epoch/...`); the refit's networks are the ones logged, the validation run's are
   the ones measured. When the job gives a `refit_task` (a picklable form of the same training)
   and the CPU has two threads or more, the refit trains in a worker process *beside* the
   validation run, each with half of the threads (`modeling.training.background`); on a GPU,
   under torchrun, or with one thread it runs after it;
6. `job.evaluate(fit)` (the model's metrics), `job.checks(fit)` (forest checks: metrics, a JSON
   report, plots), log them; learning curves, `job.plots(fit)` and `job.analysis(fit, checks, metrics)`
   (the analyst's plots and tables: partial dependence, error breakdowns);
7. `job.bundle(...)`: the typed spec, networks (`fit.logged`), extras and features; save and log
   the bundle; the run's description (headline metric against `job.baselines` and the current
   champion, the data, the plots to open first);
8. registration on `job.target_metric` (`job.lower_is_better`; alias `champion` only when better, or `--force`),
   after the run has ended, with the decision written into the model version's description
   and, on the finished run, into its description; the result dict the CLI prints with
   `--json` (with the effective config under "config").

Under torchrun every rank prepares the same data and trains on its shard (DDP); only rank 0
tracks the run, runs the lr finder and the checks, and saves and registers the model; the
other ranks return None after fit. All randomness flows from `cfg.seed`: the model draws right
after the seed and everything after fit seeds its own generator, so the figures of a seed do
not depend on which stages ran before.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from modeling.bundle import BundleSpec, save_bundle
from modeling.training import (
    Callback,
    History,
    LRFinderResult,
    Objective,
    TensorData,
    Trainer,
    distributed,
    lr_find,
)
from modeling.training.background import BackgroundFit, split_threads
from modeling.training.ensemble import predict_mean
from modeling.training.trainer import resolve_device
from pipelines import reports, run_notes, tracking
from pipelines.datasets import DataInput
from pipelines.jobs.config import TrainingOptions

log = logging.getLogger("tabrec.train")


class Prepared(Protocol):
    """What the skeleton needs of a job's prepared data (the job keeps whatever else it built)."""

    train: TensorData
    valid: TensorData
    files: list[str]  # the input files, fingerprinted into the run's tags and the bundle


@dataclass
class Trained:
    """What one `fit_networks` call produced: its networks (the model first, then any ensemble
    members, averaged by the predictor) and the history of the first network's training."""

    networks: list[nn.Module]
    history: History
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefitTask:
    """The refit as a worker process can run it: `fn(*args, report=...)` with a module-level `fn`
    and picklable `args` (tensors travel through shared memory); `finish` turns its return value
    into the `Trained` that `fit_networks` would have given."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    rows: int
    finish: Callable[[Any], Trained]


@dataclass
class Fitted:
    """A trained model and what the later stages need of its training.

    `model`, `networks`, `history` and `valid_pred` come from the validation run (weights that never
    saw the validation rows); `refit`, when set, holds the networks trained afterwards on all rows,
    which are the ones logged (`logged`)."""

    model: nn.Module
    history: History
    lr: float
    train_seconds: float
    valid_pred: np.ndarray | None  # predictions on the validation set (training target scale); None
    # when the model trained with an objective (a ranking loss has no per-row prediction)
    tmp: Path  # scratch directory of the run: plots and the bundle are written here
    networks: list[nn.Module] = field(default_factory=list)  # validation run's networks (default: [model])
    refit: Trained | None = None
    info: dict[str, Any] = field(default_factory=dict)  # the validation run's `Trained.info`
    wall_seconds: float = 0.0  # wall time of the validation run and the refit (side by side or one after the other)
    # fitted by `job.calibrate` (e.g. RecentLevel): the validation run's (in valid_pred), the bundle's
    level: Any = None
    logged_level: Any = None

    def __post_init__(self) -> None:
        if not self.networks:
            self.networks = [self.model]

    @property
    def logged(self) -> list[nn.Module]:
        """The networks the bundle carries: the refit's when there is one."""
        return self.refit.networks if self.refit is not None else self.networks


@dataclass
class Checks:
    """The forest checks' outcome: metrics (merged into the run's), a JSON report, plot files."""

    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    plots: list[Path | None] = field(default_factory=list)


@dataclass
class Analysis:
    """The analyst's view of a trained model: plots, tables (logged as CSV under `analysis/`),
    the artifact paths worth opening first, and a few lines on where the model is wrong (both
    go into the run's description)."""

    plots: list[Path | None] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    highlights: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


@dataclass
class BundleParts:
    """What `save_bundle` and `tracking.log_bundle` take: the spec, its networks and tensors, and
    a few raw input rows with the model's answers (the pyfunc signature and input example)."""

    spec: BundleSpec
    networks: list[nn.Module]
    extras: dict[str, torch.Tensor]
    example: pd.DataFrame
    example_pred: np.ndarray
    features: Any | None = None


ConfigT = TypeVar("ConfigT", bound=TrainingOptions)
DataT = TypeVar("DataT", bound=Prepared)


class TrainingJob(ABC, Generic[ConfigT, DataT]):
    """The domain parts of a training run; `run_job` calls the hooks in the order above.

    Subclasses set the class attributes and implement the abstract hooks; `self.data` is what
    `prepare` returned."""

    pipeline: ClassVar[str]  # "rossmann" | "ratings": the run's tag and the temp dir's prefix
    target_metric: ClassVar[str]  # the validation metric registration compares
    lower_is_better: ClassVar[bool] = True  # the direction of target_metric
    curve_metric: ClassVar[str]  # the per-epoch metric drawn beside the losses
    baselines: ClassVar[dict[str, str]] = {}  # final metric -> label: what the run description compares with

    def __init__(self, cfg: ConfigT) -> None:
        self.cfg = cfg
        self.data: DataT

    @abstractmethod
    def prepare(self) -> DataT:
        """Read and validate the inputs, engineer features, build the tensors (DataError on bad input)."""

    def run_name(self) -> str:
        return self.pipeline

    def params(self) -> dict[str, Any]:
        """Params logged beside the config's values (sizes, columns, ...)."""
        return {}

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised network (the skeleton seeds the global torch generator first)."""

    def finder_model(self, model: nn.Module) -> nn.Module:
        """The network the lr finder trains a copy of: by default the model just built."""
        return model

    def settle_lr(self, suggested: float) -> float:
        """The lr training uses for the lr finder's suggestion: by default the suggestion itself (a
        job may bound it to the range its data was measured in)."""
        return suggested

    @property
    @abstractmethod
    def epoch_metrics(self) -> dict[str, Any]:
        """Metrics the trainer computes on the validation set after every epoch."""

    def callbacks(self) -> list[Callback]:
        return []

    def resolve(self) -> None:
        """Settle options that depend on the prepared data (e.g. epochs or batch size "auto") in
        `self.cfg`, before anything is logged; by default nothing to settle."""

    def fit_networks(self, model: nn.Module, lr: float, train: TensorData, valid: TensorData | None,
                     callbacks: list[Callback]) -> Trained:
        """Train `model` (built right after seeding) on `train`, validating on `valid` when given.

        The default is one `Trainer.fit`; a job may train more networks (an ensemble). Called once
        for the validation run and, for a refit, once more on all rows with `valid=None`."""
        cfg = self.cfg
        trainer = Trainer(model, metrics=self.epoch_metrics if valid is not None else {}, lr=lr, wd=cfg.wd,
                          batch_size=cfg.batch_size, seed=cfg.seed, quiet=cfg.quiet or not distributed.current().is_main,
                          callbacks=[*callbacks, *(self.callbacks() if valid is not None else [])],
                          objective=self.objective())
        t0 = time.perf_counter()
        history = trainer.fit(train, valid, epochs=cfg.epochs)
        return Trained([model], history, time.perf_counter() - t0)

    def refit_rows(self) -> TensorData | None:
        """All rows (train + valid) for a refit after the validation run, or None: no refit (default)."""
        return None

    def refit_task(self, lr: float) -> RefitTask | None:
        """The refit (`refit_rows`, same settings as `fit_networks`) as a task a worker process can
        run beside the validation run, or None: the refit runs after it, in this process (default)."""
        return None

    def objective(self) -> Objective | None:
        """A loss that needs the model and the batch (a ranking loss) for the main fit, or None
        for the Trainer's default loss on (prediction, target)."""
        return None

    def train_heads(self, model: nn.Module) -> float:
        """Train further networks the bundle carries beside `model` (e.g. a ranking head) with the
        same engine; runs on every rank after the main fit. Returns their training seconds."""
        return 0.0

    def calibrate(self, fit: Fitted) -> None:
        """Fit what follows the networks (`fit.level`, `fit.logged_level`) and fold the validation
        run's into `fit.valid_pred`, before any figure is computed; by default nothing."""

    @abstractmethod
    def evaluate(self, fit: Fitted) -> dict[str, float]:
        """The model's final metrics (include fit.train_seconds and fit.lr where they belong)."""

    def checks(self, fit: Fitted) -> Checks:
        """Forest checks beside the model."""
        return Checks()

    def plots(self, fit: Fitted) -> list[Path | None]:
        """The domain's plots (the lr finder's and the learning curves come from the skeleton)."""
        return []

    def datasets(self) -> list[DataInput]:
        """The run's inputs (`mlflow.log_input`): train and valid, with their source files."""
        return []

    def analysis(self, fit: Fitted, checks: Checks, metrics: dict[str, float]) -> Analysis:
        """Partial dependence, error breakdowns: what an analyst opens after the metrics."""
        return Analysis()

    @abstractmethod
    def bundle(self, fit: Fitted, metrics: dict[str, float], fingerprint: str, run_id: str) -> BundleParts:
        """The typed bundle spec and what goes with it."""


def run_job(job: TrainingJob[Any, Any]) -> dict[str, Any] | None:
    """Train, check, track and save; the CLI's result dict (None on torchrun ranks other than 0)."""
    cfg = job.cfg
    cfg.validate()
    t_start = time.perf_counter()
    rank0 = distributed.current().is_main
    if rank0:
        tracking.check_tracking_reachable()  # in seconds, before minutes of data preparation
    job.data = data = job.prepare()
    job.resolve()
    cfg = job.cfg
    fingerprint = tracking.file_fingerprint(data.files)
    tags = {"tabrec.pipeline": job.pipeline, "data_fingerprint": fingerprint}
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    with (tracking.tracked_run(cfg.experiment, run_name=job.run_name(), tags=tags) if rank0
          else contextlib.nullcontext()) as run, \
            tempfile.TemporaryDirectory(prefix=f"tabrec-{job.pipeline}-") as tmp_dir:
        tmp = Path(tmp_dir)
        inputs: list[dict[str, Any]] = []
        if rank0:
            tracking.log_params({**asdict(cfg), **job.params(), "world_size": distributed.current().world_size})
            inputs = tracking.log_datasets(job.datasets())
        torch.manual_seed(cfg.seed)
        model = job.build_model()
        lr, lr_plot = _resolve_lr(job, model, tmp, rank0)
        log.info("training %s on %d rows (%d valid), lr %.3g, batch %s, %s epochs", type(model).__name__,
                 len(data.train), len(data.valid), lr, cfg.batch_size, cfg.epochs)
        t_fit = time.perf_counter()
        background = _start_background_refit(job, lr, rank0)
        try:
            with _torch_threads(background.main_threads if background else None):
                trained = job.fit_networks(model, lr, data.train, data.valid,
                                           [tracking.MLflowEpochLogger()] if rank0 else [])
            refit = background.finish() if background else _refit(job, lr, rank0)
        finally:
            if background:
                background.cancel()
        wall_seconds = time.perf_counter() - t_fit
        train_seconds = wall_seconds + job.train_heads((refit or trained).networks[0])
        if not rank0:
            return None
        valid_pred = predict_mean(trained.networks, data.valid.xs).numpy() if job.objective() is None else None
        fit = Fitted(trained.networks[0], trained.history, lr, trained.seconds, valid_pred, tmp,
                     networks=trained.networks, refit=refit, info=trained.info, wall_seconds=wall_seconds)
        job.calibrate(fit)
        metrics = job.evaluate(fit)
        if refit is not None:
            metrics["refit_seconds"] = refit.seconds
            if "worker_peak_rss_mb" in refit.info:  # the refit trained in a worker beside the validation run
                metrics["refit_worker_peak_rss_mb"] = float(refit.info["worker_peak_rss_mb"])
            # the logged weights are the refit's; every valid_* metric is the validation run's
            tracking.log_params({"logged_weights": "refit", "refit_rows": refit.info["rows"],
                                 "refit_mode": refit.info.get("mode", "after the validation run")})
        log.info("valid %s %.4f after %.0f s; running the checks", job.target_metric, metrics[job.target_metric],
                 train_seconds)
        checks = job.checks(fit)
        metrics.update(checks.metrics)
        tracking.log_final_metrics(metrics)
        tracking.log_json(checks.report, "checks/forest.json")
        curves = reports.learning_curves(fit.history, tmp / "learning_curves.png", metric=job.curve_metric)
        analysis = job.analysis(fit, checks, metrics)
        for plot in [lr_plot, *checks.plots, curves, *job.plots(fit), *analysis.plots]:
            tracking.log_plot(plot)
        for name, table in analysis.tables.items():
            tracking.log_table(table, f"analysis/{name}")
        parts = job.bundle(fit, metrics, fingerprint, run.info.run_id)
        bundle_dir = save_bundle(tmp / "bundle", parts.spec, parts.networks, extras=parts.extras,
                                 features=parts.features)
        model_uri, logged_uri = tracking.log_bundle(bundle_dir, parts.example, parts.example_pred)
        run_id = run.info.run_id
        headline = _headline(job, metrics)
        exp_id = run.info.experiment_id
        notes = {"inputs": inputs, "highlights": analysis.highlights or ["plots/learning_curves.png"],
                 "findings": analysis.findings,
                 "link": lambda path: tracking.run_link(run_id, exp_id, f"/artifacts/{path}")}
        tracking.set_description(run_notes.run_description(headline, **notes, pending=True))
    registered = None
    if cfg.register:
        decision = tracking.register_version(logged_uri, cfg.register, headline, force=cfg.force, run_id=run_id)
        registered = decision.result()
        tracking.set_description(run_notes.run_description(headline, **notes, decision=decision), run_id=run_id)
    return {
        "run_id": run_id, "model_uri": model_uri, "registered": registered,
        "train_seconds": round(train_seconds, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "config": asdict(cfg),
    }


def _headline(job: TrainingJob[Any, Any], metrics: dict[str, float]) -> run_notes.Headline:
    """The target metric, the run's baselines beside it, and the champion it would have to beat."""
    cfg = job.cfg
    baselines = [(label, key, float(metrics[key])) for key, label in job.baselines.items()
                 if key in metrics and tracking.is_number(metrics[key])]
    champion = tracking.current_champion(cfg.register, job.target_metric) if cfg.register else None
    return run_notes.Headline(job.target_metric, float(metrics[job.target_metric]), baselines,
                              champion=champion, register=cfg.register, lower_is_better=job.lower_is_better)


def _refit(job: TrainingJob[Any, Any], lr: float, rank0: bool) -> Trained | None:
    """The refit on all rows (`job.refit_rows()`), same seed, lr and settings; None without one."""
    rows = job.refit_rows()
    if rows is None:
        return None
    log.info("refit on all %d rows (train + valid), same settings, lr %.3g", len(rows), lr)
    torch.manual_seed(job.cfg.seed)
    trained = job.fit_networks(job.build_model(), lr, rows, None, [tracking.MLflowEpochLogger(prefix="refit/")] if rank0 else [])
    trained.info["rows"] = len(rows)
    return trained


class _BackgroundRefit:
    """The refit training in a worker process while this process trains the validation run."""

    def __init__(self, task: RefitTask, threads: tuple[int, int], quiet: bool) -> None:
        self.task, self.main_threads, self.worker_threads = task, threads[0], threads[1]
        self.epochs: list[dict[str, Any]] = []
        self.quiet = quiet
        self.fit = BackgroundFit(task.fn, task.args, threads=self.worker_threads, name="refit worker",
                                 on_progress=self._progress)

    def _progress(self, message: tuple[Any, ...]) -> None:
        kind, fit_index, epoch, epochs, logs = message
        if kind != "epoch" or fit_index != 0:
            return
        self.epochs.append(logs)
        if not self.quiet:
            log.info("refit (beside the validation run): epoch %d/%d train_loss=%.4g in %.0f s",
                     epoch + 1, epochs, logs.get("train_loss", float("nan")), logs.get("seconds", float("nan")))

    def finish(self) -> Trained:
        if not self.quiet:
            log.info("validation run done; waiting for the refit worker")
        trained = self.task.finish(self.fit.result())
        for epoch, logs in enumerate(self.epochs):
            tracking.MLflowEpochLogger(prefix="refit/").on_epoch_end(None, epoch, logs)
        trained.info.update(rows=self.task.rows, mode=f"beside the validation run ({self.worker_threads} + "
                                                      f"{self.main_threads} torch threads)")
        return trained

    def cancel(self) -> None:
        self.fit.cancel()


def _start_background_refit(job: TrainingJob[Any, Any], lr: float, rank0: bool) -> _BackgroundRefit | None:
    """Start the refit beside the validation run when the job offers a task and the CPU has the
    threads for two trainings (not on a GPU, not under torchrun); None: refit afterwards."""
    if not rank0 or distributed.current().initialized or resolve_device("auto").type != "cpu":
        return None
    threads = split_threads(torch.get_num_threads())
    task = job.refit_task(lr) if threads else None
    if task is None or threads is None:
        return None
    log.info("refit on all %d rows (train + valid) in a worker beside the validation run, lr %.3g, "
             "%d + %d torch threads", task.rows, lr, threads[0], threads[1])
    torch.manual_seed(job.cfg.seed)  # as `_refit` would: the worker seeds its own generators
    return _BackgroundRefit(task, threads, quiet=bool(getattr(job.cfg, "quiet", False)))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block (unchanged for None)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve_lr(job: TrainingJob[Any, Any], model: nn.Module, tmp: Path, rank0: bool) -> tuple[float, Path | None]:
    """The configured lr, or the lr finder's suggestion (rank 0 runs it, every rank gets the value)."""
    cfg = job.cfg
    if cfg.lr != "auto":
        return float(cfg.lr), None
    log.info("running the lr finder")
    finder = run_lr_finder(cfg, job.finder_model(model), job.data.train) if rank0 else None
    lr = float(distributed.broadcast_object(finder.suggestion if finder else None))
    if finder is None:
        return lr, None
    plot = finder.plot(tmp / "lr_finder.png")
    tracking.log_params({"lr_suggested": lr})
    log.info("lr finder suggests %.3g (%s)", lr, finder.method)
    settled = job.settle_lr(lr)
    if settled != lr:
        tracking.log_params({"lr_settled": settled})
        log.info("lr %.3g: the suggestion bounded to the job's range", settled)
    return settled, plot


def run_lr_finder(cfg: TrainingOptions, model: nn.Module, train: TensorData) -> LRFinderResult:
    """The lr finder with the job's weight decay, batch size and seed (trains a copy of `model`)."""
    return lr_find(model, train, wd=cfg.wd, batch_size=cfg.batch_size, seed=cfg.seed, quiet=cfg.quiet)


def seeded_lr_find(cfg: TrainingOptions, build: Callable[[], nn.Module], train: TensorData) -> LRFinderResult:
    """`tabrec lr-find`: the lr finder on a model built right after seeding, as training builds it."""
    torch.manual_seed(cfg.seed)
    return run_lr_finder(cfg, build(), train)
