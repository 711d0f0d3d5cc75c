"""The training jobs' configuration: the single source of their defaults and help texts.

`RossmannConfig` and `RatingsConfig` are plain dataclasses (re-exported by `pipelines.jobs.rossmann`
and `pipelines.jobs.ratings`). Each option's default is the field's default and its help text is
the field's `metadata["help"]`; the CLI builds its `train` and `lr-find` options from them, so
`tabrec train ... --help`, the Python API and the README cannot drift apart. This module
imports neither torch nor MLflow, so the CLI can read it on every start.

Validation shared by every job (lr 'auto' or a positive number, epochs and batch size) lives
once, in `check_training_options`; each config adds its domain's checks.
"""

from __future__ import annotations

import contextlib
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Protocol

from modeling.errors import DataError


def opt(default: Any = MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field whose help text the CLI shows (`default_factory=` works too)."""
    return field(default=default, metadata={"help": help}, **kw)


def option_help(cls: type, name: str) -> str:
    return config_field(cls, name).metadata.get("help", "")


def config_field(cls: type, name: str) -> Field:
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def default_of(cls: type, name: str) -> Any:
    """A field's default value (calling its default_factory when it has one)."""
    f = config_field(cls, name)
    if f.default_factory is not MISSING:
        return f.default_factory()
    if f.default is MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    return f.default


class TrainingOptions(Protocol):
    """What the training skeleton (`pipelines.jobs.base`) reads from any job's config."""

    epochs: Any
    lr: Any
    wd: Any
    batch_size: Any
    seed: int
    experiment: str
    register: str | None
    force: bool
    quiet: bool

    def validate(self) -> None: ...


AUTO = "auto"


def auto_or_int(value: Any, option: str) -> int | str:
    """'auto', or the value as an int (the CLI and the Python API may pass "4" or 4); DataError
    naming the option otherwise."""
    if value == AUTO:
        return AUTO
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError):
        raise DataError(f"{option} must be 'auto' or a whole number, got {value!r}") from None


def check_training_options(cfg: TrainingOptions, min_batch_size: int = 1, why: str = "",
                           auto: tuple[str, ...] = ()) -> None:
    """The checks every job shares; DataError (exit 2) naming the option. Options named in `auto`
    (e.g. "epochs", "batch_size") may also be 'auto' (settled by the job once the data is read)."""
    epochs = auto_or_int(cfg.epochs, "--epochs") if "epochs" in auto else cfg.epochs
    batch_size = auto_or_int(cfg.batch_size, "--batch-size") if "batch_size" in auto else cfg.batch_size
    if epochs != AUTO and epochs < 1:
        raise DataError("--epochs must be >= 1")
    if batch_size != AUTO and batch_size < min_batch_size:
        raise DataError(f"--batch-size must be >= {min_batch_size}{f' ({why})' if why else ''}")
    if cfg.lr != "auto":
        try:
            if float(cfg.lr) <= 0:
                raise ValueError
        except ValueError:
            raise DataError(f"--lr must be 'auto' or a positive number, got {cfg.lr!r}") from None


LR_HELP = "'auto' (lr finder) or a number."
ENSEMBLE_KINDS = ("snapshot", "seeds")  # as modeling.training.ensemble (this module imports no torch)
PRECISIONS = ("auto", "fp32", "bf16")  # modeling.training.trainer.PRECISIONS (this module imports no torch)
WD_HELP = "AdamW decoupled weight decay."
SEED_HELP = "Seed for every random choice."
REGISTER_HELP = "Register as this model name."
FORCE_HELP = "Promote to champion even if not better."


# ---------------------------------------------------------------- Rossmann
@dataclass
class RossmannConfig:
    train: str = opt(help="Kaggle train.csv (.csv, .csv.gz or .parquet).")
    store: str = opt(help="Kaggle store.csv.")
    external_dir: str | None = opt(None, "Folder with store_states.csv, weather/, googletrend/.")
    # Google Trends columns are joined either way; as inputs they drift with time.
    trends: bool = opt(False, "Use the Google Trends columns as inputs (off: they drift with time).")
    valid_days: int = opt(42, "Last N days of train.csv are the validation set.")
    calendar: str | None = opt(None, "Known future events (test.csv layout: Store, Date, Promo, StateHoliday, "
                                     "SchoolHoliday) added to the bundle's event calendar.")
    epochs: int | str = opt(AUTO, "Training epochs (one-cycle), or 'auto': enough epochs for --steps optimizer "
                                  "steps, at least --min-epochs.")
    lr: str = opt("auto", "'auto' (the lr finder's suggestion, kept within 3e-3..1e-2) or a number.")
    batch_size: int | str = opt(AUTO, "Rows per batch, or 'auto': scaled to the training rows "
                                      "(rows/1600 rounded to a power of two, within 64..1024).")
    steps: int = opt(3000, "Optimizer steps that --epochs auto aims for (the step budget).")
    min_epochs: int = opt(4, "Fewest epochs --epochs auto gives (large data: the step budget is passed sooner).")
    ensemble: int = opt(3, "Networks averaged in log space, stored as one bundle (1: a single network).")
    ensemble_kind: str = opt("snapshot", "snapshot: the ends of the cycles of one run with warm restarts; "
                                         "seeds: independent runs from seeds seed, seed+1, ...")
    cycle_epochs: int | str = opt(AUTO, "snapshot: epochs of each cycle after the first, or 'auto' "
                                        "(half the first cycle's, at least 1).")
    precision: str = opt("auto", "Training arithmetic: bf16 (bf16 autocast, a float32 output layer and float32 "
                                 "weights), fp32, or 'auto' (bf16 where the CPU has AMX/AVX512-BF16 or the GPU "
                                 "supports it, else fp32). Predictions are float32 either way.")
    refit: bool = opt(True, "After the validation run, train the logged model on all rows (train + valid) "
                            "with the same settings; the run keeps the validation run's metrics.")
    parallel_refit: bool = opt(True, "Train the refit in a worker process beside the validation run, each with "
                                     "half of the CPU threads (CPU only, two threads or more); off: after it.")
    level_days: int = opt(42, "Recent-level correction: each store's mean residual over the last N days of the "
                              "training rows (log scale), shrunk by empirical Bayes, is added to its forecasts "
                              "(modeling/level.py); 0: off.")
    layers: tuple[int, ...] = opt((500, 250), "Hidden layer sizes, comma-separated.")
    ps: tuple[float, ...] = (0.001, 0.01)
    embed_p: float = 0.04
    wd: float = opt(0.2, WD_HELP)
    seed: int = opt(0, SEED_HELP)
    experiment: str = opt("rossmann", "MLflow experiment.")
    register: str | None = opt(None, REGISTER_HELP)
    force: bool = opt(False, FORCE_HELP)
    # --lr auto: the lr finder's suggestion bounded to this range (RossmannJob.settle_lr says why)
    auto_lr_bounds: tuple[float, float] = (3e-3, 1e-2)
    forest_rows: int = 200_000
    forest_trees: int = 40
    spread_trees: int = 20  # forest kept in the bundle for `score --uncertainty` (0: none)
    spread_leaves: int = 1024  # leaves per tree of that forest (bounds the bundle's growth)
    quiet: bool = False
    emb_overrides: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # "4" (CLI text) and 4 are the same option; anything else is left for validate() to name
        for name in ("epochs", "batch_size", "cycle_epochs"):
            with contextlib.suppress(DataError):
                setattr(self, name, auto_or_int(getattr(self, name), name))

    def validate(self) -> None:
        if self.valid_days < 1:
            raise DataError("--valid-days must be >= 1")
        check_training_options(self, min_batch_size=2, why="BatchNorm needs two rows", auto=("epochs", "batch_size"))
        if auto_or_int(self.cycle_epochs, "--cycle-epochs") != AUTO and int(self.cycle_epochs) < 1:
            raise DataError("--cycle-epochs must be >= 1 or 'auto'")
        if self.steps < 1:
            raise DataError(f"--steps (the step budget) must be >= 1, got {self.steps}")
        if self.level_days < 0:
            raise DataError(f"--level-days must be >= 0 (0: no recent-level correction), got {self.level_days}")
        if self.min_epochs < 1:
            raise DataError(f"--min-epochs must be >= 1, got {self.min_epochs}")
        if self.precision not in PRECISIONS:
            raise DataError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.ensemble < 1:
            raise DataError(f"--ensemble must be >= 1 (networks in the ensemble), got {self.ensemble}")
        if self.ensemble_kind not in ENSEMBLE_KINDS:
            raise DataError(f"--ensemble-kind must be one of {ENSEMBLE_KINDS}, got {self.ensemble_kind!r}")
        if self.spread_trees < 0 or self.spread_leaves < 2:
            raise DataError("spread_trees must be >= 0 and spread_leaves >= 2")
        lo, hi = self.auto_lr_bounds
        if not 0 < lo <= hi:
            raise DataError(f"auto_lr_bounds must be 0 < low <= high, got {self.auto_lr_bounds}")


# ---------------------------------------------------------------- ratings
SPLITS = ("random", "time", "user-last", "user-stratified")
MODELS = ("dot", "nn")
RANKING_LOSSES = ("softmax", "bpr")  # modeling.ranking.RANKING_LOSSES (not imported: no torch here)
# Per-model training defaults, tuned once on ../shared/data/ml-100k train/valid (docs/benchmarks.md):
# the NN needs many more large-batch epochs and strong (embedding) dropout to stop overfitting.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "dot": {"epochs": 5, "lr": "1e-2", "wd": 0.3, "batch_size": 1024, "dropout": 0.0, "embed_p": 0.0},
    "nn": {"epochs": 20, "lr": "3e-2", "wd": 0.5, "batch_size": 4096, "dropout": 0.5, "embed_p": 0.3},
}
# Per-loss defaults of the ranking head (the same head for dot and nn), tuned on ML-100k under the
# per-user stratified 75/25 protocol, seeds 0 and 1 (docs/benchmarks.md). softmax batches count
# users (one row per user, scored against the whole catalogue), bpr batches count (user, item) pairs.
RANKING_DEFAULTS: dict[str, dict[str, Any]] = {
    "softmax": {"ranking_epochs": 30, "ranking_lr": 2e-2, "ranking_wd": 1.0, "ranking_batch_size": 128},
    "bpr": {"ranking_epochs": 20, "ranking_lr": 1e-2, "ranking_wd": 0.1, "ranking_batch_size": 1024},
}


def _per_model(text: str, key: str, models: tuple[str, ...] = MODELS) -> str:
    """Help text ending in the per-model defaults, read from MODEL_DEFAULTS."""
    return f"{text} Default: " + ", ".join(f"{m} {MODEL_DEFAULTS[m][key]}" for m in models) + "."


def _per_loss(text: str, key: str) -> str:
    """Help text ending in the per-loss defaults of the ranking head, read from RANKING_DEFAULTS."""
    return f"{text} Default: " + ", ".join(f"{m} {d[key]:g}" for m, d in RANKING_DEFAULTS.items()) + "."


@dataclass
class RatingsConfig:
    ratings: str = opt(help="Ratings file (u.data, ratings.dat, ratings.csv, CSV, Parquet); a CSV/Parquet "
                            "of user and item columns without ratings (clicks) trains the ranking head only.")
    format: str = opt("auto", "auto|ml-100k|ml-1m|ml-latest|csv|parquet")
    items: str | None = opt(None, "Item metadata (u.item, movies.dat, movies.csv).")
    valid: str | None = opt(None, "Explicit validation ratings file.")
    valid_frac: float = opt(0.2, "Validation fraction when --valid is not given.")
    split: str = opt("random", "|".join(SPLITS) + " (user-stratified: that fraction of each user's rows, "
                               "drawn at random)")
    model: str = opt("dot", "dot (DotProductBias) or nn (EmbeddingNN)")
    factors: int = opt(50, "Embedding width (of dot and of the ranking head).")
    layers: tuple[int, ...] = (100,)
    # None = the model's default from MODEL_DEFAULTS (tuned once on the ML-100k split).
    dropout: float | None = opt(None, _per_model("nn only: dense-layer dropout.", "dropout", ("nn",)))
    embed_p: float | None = opt(None, _per_model("nn only: embedding dropout.", "embed_p", ("nn",)))
    epochs: int | None = opt(None, _per_model("Training epochs (one-cycle).", "epochs"))
    lr: str | None = opt(None, _per_model(LR_HELP, "lr"))
    wd: float | None = opt(None, _per_model(WD_HELP, "wd"))
    batch_size: int | None = opt(None, _per_model("Ratings per batch.", "batch_size"))
    ranking: bool = opt(True, "Train a ranking head on implicit feedback for top-k and similar items "
                              "(off: the rating model ranks).")
    ranking_loss: str = opt("softmax", "Ranking head loss: softmax (over the whole catalogue) or bpr.")
    # None = the loss's default from RANKING_DEFAULTS.
    ranking_epochs: int | None = opt(None, _per_loss("Ranking head one-cycle schedule in epochs; the head stops at the "
                                                         "epoch chosen on an inner split of the training pairs.",
                                                         "ranking_epochs"))
    ranking_lr: float | None = opt(None, _per_loss("Ranking head learning rate.", "ranking_lr"))
    ranking_wd: float | None = opt(None, _per_loss("Ranking head AdamW weight decay.", "ranking_wd"))
    ranking_batch_size: int | None = opt(None, _per_loss("Ranking head batch: users (softmax) or "
                                                         "(user, item) pairs (bpr).", "ranking_batch_size"))
    ranking_negatives: int = opt(1, "bpr only: negatives drawn per positive.")
    seed: int = opt(0, SEED_HELP)
    experiment: str = opt("ratings", "MLflow experiment.")
    register: str | None = opt(None, REGISTER_HELP)
    force: bool = opt(False, FORCE_HELP)
    min_ratings_cold_start: int = 10
    eval_users: int = 20_000  # ranking metrics on a seeded sample of at most this many validation users
    user_col: str | None = opt(None, "User id column of a CSV/Parquet file.")
    item_col: str | None = opt(None, "Item id column of a CSV/Parquet file.")
    rating_col: str | None = opt(None, "Rating column of a CSV/Parquet file.")
    time_col: str | None = opt(None, "Timestamp column of a CSV/Parquet file.")
    quiet: bool = False

    def __post_init__(self) -> None:
        for key, value in MODEL_DEFAULTS.get(self.model, MODEL_DEFAULTS["dot"]).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key, value in RANKING_DEFAULTS.get(self.ranking_loss, RANKING_DEFAULTS["softmax"]).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise DataError(f"--model must be one of {MODELS}, got {self.model!r}")
        if self.split not in SPLITS:
            raise DataError(f"--split must be one of {SPLITS}, got {self.split!r}")
        if not 0.0 < self.valid_frac < 1.0:
            raise DataError(f"--valid-frac must be in (0, 1), got {self.valid_frac}")
        check_training_options(self)
        if self.ranking_loss not in RANKING_LOSSES:
            raise DataError(f"--ranking-loss must be one of {RANKING_LOSSES}, got {self.ranking_loss!r}")
        if self.ranking_epochs < 1 or self.ranking_batch_size < 1 or self.ranking_negatives < 1:
            raise DataError("--ranking-epochs, --ranking-batch-size and --ranking-negatives must be >= 1")
        if not self.ranking_lr > 0 or self.ranking_wd < 0:
            raise DataError("--ranking-lr must be > 0 and --ranking-wd >= 0")
