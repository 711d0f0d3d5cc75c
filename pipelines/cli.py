"""The `tabrec` command. Logs and progress go to stderr; with --json the last stdout line is JSON.

Exit codes: 0 ok, 2 bad input or usage (the message names file/column/row), 1 internal error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from modeling.errors import DataError
from pipelines.jobs.config import RatingsConfig, RossmannConfig, option_help

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, track and serve entity-embedding tabular models and recommenders.")
data_app = typer.Typer(no_args_is_help=True, help="Demo data.")
synth_app = typer.Typer(no_args_is_help=True, help="Write seeded synthetic data sets.")
train_app = typer.Typer(no_args_is_help=True, help="Train a model, tracked in MLflow.")
lr_app = typer.Typer(no_args_is_help=True, help="Run the learning-rate finder only.")
app.add_typer(data_app, name="data")
data_app.add_typer(synth_app, name="synth")
app.add_typer(train_app, name="train")
app.add_typer(lr_app, name="lr-find")

log = logging.getLogger("tabrec")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last stdout line.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for every random choice.")]
NprocOpt = Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel worker processes (DDP via torchrun; "
                                       "gloo on CPU, NCCL on GPU). See docs/distributed.md.")]


def _layers_text(sizes: tuple[int, ...]) -> str:
    """(500, 250) -> '500,250': the form --layers takes (see _parse_layers)."""
    return ",".join(str(n) for n in sizes)


def _setup_logging(quiet: bool) -> None:
    if quiet:  # MLflow's artifact download bar writes to stderr whatever the log level
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(fn: Callable[[], Any], as_json: bool, quiet: bool = False, human: Callable[[Any], str] | None = None) -> None:
    """Run a command body and map errors to the exit-code contract."""
    _setup_logging(quiet)
    try:
        result = fn()
    except DataError as exc:
        _fail(2, str(exc), as_json)
    except KeyboardInterrupt:
        _fail(130, "interrupted", as_json)
    except Exception as exc:  # internal error: message on stderr, traceback only in debug
        if os.environ.get("TABREC_DEBUG"):
            traceback.print_exc()
        _fail(1, f"internal error: {type(exc).__name__}: {exc}", as_json)
    if as_json:
        print(json.dumps(result, default=str))
    elif human is not None:
        print(human(result))
    elif result is not None:
        print(json.dumps(result, indent=2, default=str))


def _fail(code: int, msg: str, as_json: bool) -> None:
    print(f"error: {msg}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": msg, "exit_code": code}))
    raise typer.Exit(code)


# ---------------------------------------------------------------- data synth
@synth_app.command("rossmann")
def synth_rossmann(
    out: Annotated[Path, typer.Option(help="Output directory (train.csv, store.csv, test.csv).")],
    stores: Annotated[int, typer.Option(min=1)] = 50,
    days: Annotated[int, typer.Option(min=60)] = 730,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Rossmann-schema store sales with learnable structure."""
    from pipelines.synth import write_rossmann

    _run(lambda: {k: str(v) for k, v in write_rossmann(out, stores=stores, days=days, seed=seed).items()}, as_json)


@synth_app.command("ratings")
def synth_ratings(
    out: Annotated[Path, typer.Option(help="Output directory (u.data, movies.csv).")],
    users: Annotated[int, typer.Option(min=2)] = 943,
    items: Annotated[int, typer.Option(min=2)] = 1682,
    ratings: Annotated[int, typer.Option(min=10)] = 100_000,
    choice: Annotated[float, typer.Option(min=0.0, help="How much taste (not only popularity) decides "
                                                       "which items a user rates; 0 = popularity only.")] = 0.0,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """MovieLens-100k-format ratings from latent factors and biases."""
    from pipelines.synth import write_ratings

    _run(lambda: {k: str(v) for k, v in write_ratings(out, users=users, items=items, ratings=ratings,
                                                       seed=seed, choice=choice).items()}, as_json)


# ---------------------------------------------------------------- train ratings
# The train/lr-find options take their defaults and help texts from the config dataclasses.
Rat, Ross = RatingsConfig, RossmannConfig


def _opt(cfg: type, name: str, *args: Any, **kw: Any) -> Any:
    """typer.Option with the help text of config field `name` (its default is `cfg.name`)."""
    return typer.Option(*args, help=option_help(cfg, name), **kw)


@train_app.command("ratings")
def train_ratings_cmd(
    ctx: typer.Context,
    ratings: Annotated[str, _opt(Rat, "ratings")],
    format: Annotated[str, _opt(Rat, "format")] = Rat.format,
    items: Annotated[str | None, _opt(Rat, "items")] = Rat.items,
    valid: Annotated[str | None, _opt(Rat, "valid")] = Rat.valid,
    valid_frac: Annotated[float, _opt(Rat, "valid_frac")] = Rat.valid_frac,
    split: Annotated[str, _opt(Rat, "split")] = Rat.split,
    model: Annotated[str, _opt(Rat, "model")] = Rat.model,
    factors: Annotated[int, _opt(Rat, "factors", min=1)] = Rat.factors,
    epochs: Annotated[int | None, _opt(Rat, "epochs", min=1)] = Rat.epochs,
    lr: Annotated[str | None, _opt(Rat, "lr")] = Rat.lr,
    wd: Annotated[float | None, _opt(Rat, "wd")] = Rat.wd,
    batch_size: Annotated[int | None, _opt(Rat, "batch_size", min=1)] = Rat.batch_size,
    dropout: Annotated[float | None, _opt(Rat, "dropout", min=0.0, max=0.99)] = Rat.dropout,
    embed_p: Annotated[float | None, _opt(Rat, "embed_p", min=0.0, max=0.99)] = Rat.embed_p,
    ranking: Annotated[bool, _opt(Rat, "ranking", "--ranking/--no-ranking")] = Rat.ranking,
    ranking_loss: Annotated[str, _opt(Rat, "ranking_loss")] = Rat.ranking_loss,
    ranking_epochs: Annotated[int | None, _opt(Rat, "ranking_epochs", min=1)] = Rat.ranking_epochs,
    ranking_lr: Annotated[float | None, _opt(Rat, "ranking_lr", min=0.0)] = Rat.ranking_lr,
    ranking_wd: Annotated[float | None, _opt(Rat, "ranking_wd", min=0.0)] = Rat.ranking_wd,
    ranking_batch_size: Annotated[int | None, _opt(Rat, "ranking_batch_size", min=1)] = Rat.ranking_batch_size,
    ranking_negatives: Annotated[int, _opt(Rat, "ranking_negatives", min=1)] = Rat.ranking_negatives,
    seed: SeedOpt = Rat.seed,
    experiment: Annotated[str, _opt(Rat, "experiment")] = Rat.experiment,
    register: Annotated[str | None, _opt(Rat, "register")] = Rat.register,
    force: Annotated[bool, _opt(Rat, "force")] = Rat.force,
    user_col: Annotated[str | None, _opt(Rat, "user_col")] = Rat.user_col,
    item_col: Annotated[str | None, _opt(Rat, "item_col")] = Rat.item_col,
    rating_col: Annotated[str | None, _opt(Rat, "rating_col")] = Rat.rating_col,
    time_col: Annotated[str | None, _opt(Rat, "time_col")] = Rat.time_col,
    as_json: JsonOpt = False,
    quiet: QuietOpt = Rat.quiet,
    nproc: NprocOpt = 1,
) -> None:
    """Train a DotProductBias or EmbeddingNN recommender (with a ranking head for top-k)."""
    from pipelines.jobs.ratings import train_ratings

    cfg_kw = dict(ratings=ratings, format=format, items=items, valid=valid, valid_frac=valid_frac, split=split,
                  model=model, factors=factors, epochs=epochs, lr=lr, wd=wd, batch_size=batch_size, dropout=dropout,
                  embed_p=embed_p, ranking=ranking, ranking_loss=ranking_loss, ranking_epochs=ranking_epochs,
                  ranking_lr=ranking_lr, ranking_wd=ranking_wd, ranking_batch_size=ranking_batch_size,
                  ranking_negatives=ranking_negatives, seed=seed,
                  experiment=experiment, register=register, force=force, user_col=user_col,
                  item_col=item_col, rating_col=rating_col, time_col=time_col, quiet=quiet)
    _run_train(ctx, lambda: train_ratings(RatingsConfig(**cfg_kw)), as_json, quiet, nproc)


def _human_train(r: dict[str, Any]) -> str:
    lines = [f"run {r['run_id']}  model {r['model_uri']}  ({r['train_seconds']:.1f} s training)"]
    lines += [f"  {k:>20}: {v:.4f}" for k, v in r["metrics"].items()]
    if r.get("registered"):
        reg = r["registered"]
        lines.append(f"registered {reg['name']} v{reg['version']}" + (f" @{reg['alias']}" if reg["alias"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- distributed training
def _run_train(ctx: typer.Context, fn: Callable[[], Any], as_json: bool, quiet: bool, nproc: int) -> None:
    """A train command's body: in this process, as one torchrun worker, or launching `nproc` workers.

    Under torchrun (RANK/WORLD_SIZE set) --nproc is ignored: the process joins the process group,
    trains its shard, and only rank 0 prints the result (other ranks log warnings only).
    """
    from modeling.training import distributed

    if not distributed.in_torchrun_worker():
        if nproc > 1:
            _setup_logging(quiet)
            _launch_workers(_command_argv(ctx, drop={"nproc"}), nproc, as_json)
        else:
            _run(fn, as_json, quiet, human=_human_train)
        return
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.WARNING if quiet or rank else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")

    def body() -> Any:
        with distributed.process_group():
            return fn()

    _run(body, as_json and rank == 0, quiet or rank > 0, human=_human_train if rank == 0 else None)


def _launch_workers(argv: list[str], nproc: int, as_json: bool) -> None:
    """Run `torchrun --standalone --nproc-per-node N -m pipelines.cli <argv>` (the launcher is
    driven in-process so that a worker's exit code 2, bad input, is propagated as 2)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from modeling.training.distributed import threads_per_rank

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    launch = ["--standalone", f"--nproc-per-node={nproc}", "-m", "pipelines.cli", *argv]
    log.info("launching: python -m torch.distributed.run %s", " ".join(launch))
    try:
        run(parse_args(launch))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode in (2, 130) else 1
        _fail(code, f"rank {rank} of {nproc} failed first (exit code {failure.exitcode}); "
                    "its error is above on stderr", as_json)
    except Exception as exc:
        _fail(1, f"internal error: torchrun launch failed: {type(exc).__name__}: {exc}", as_json)


def _command_argv(ctx: typer.Context, drop: set[str]) -> list[str]:
    """The command line of `ctx` (subcommand path + options given explicitly), minus `drop`."""
    path, c = [], ctx
    while c.parent is not None:
        path.append(c.info_name)
        c = c.parent
    argv = path[::-1]
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name in drop:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name == "DEFAULT":
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if value or param.secondary_opts:
                argv.append(param.opts[0] if value else param.secondary_opts[0])
        elif value is not None:
            for v in value if param.multiple else [value]:
                argv += [param.opts[0], str(v)]
    return argv


# ---------------------------------------------------------------- train rossmann
@train_app.command("rossmann")
def train_rossmann_cmd(
    ctx: typer.Context,
    train: Annotated[str, _opt(Ross, "train")],
    store: Annotated[str, _opt(Ross, "store")],
    external_dir: Annotated[str | None, _opt(Ross, "external_dir")] = Ross.external_dir,
    trends: Annotated[bool, _opt(Ross, "trends")] = Ross.trends,
    valid_days: Annotated[int, _opt(Ross, "valid_days", min=1)] = Ross.valid_days,
    calendar: Annotated[str | None, _opt(Ross, "calendar")] = Ross.calendar,
    epochs: Annotated[str, _opt(Ross, "epochs")] = str(Ross.epochs),
    lr: Annotated[str, _opt(Ross, "lr")] = Ross.lr,
    batch_size: Annotated[str, _opt(Ross, "batch_size")] = str(Ross.batch_size),
    steps: Annotated[int, _opt(Ross, "steps", min=1)] = Ross.steps,
    min_epochs: Annotated[int, _opt(Ross, "min_epochs", min=1)] = Ross.min_epochs,
    ensemble: Annotated[int, _opt(Ross, "ensemble", min=1)] = Ross.ensemble,
    ensemble_kind: Annotated[str, _opt(Ross, "ensemble_kind")] = Ross.ensemble_kind,
    cycle_epochs: Annotated[str, _opt(Ross, "cycle_epochs")] = str(Ross.cycle_epochs),
    refit: Annotated[bool, _opt(Ross, "refit", "--refit/--no-refit")] = Ross.refit,
    parallel_refit: Annotated[bool, _opt(Ross, "parallel_refit", "--parallel-refit/--no-parallel-refit")] = Ross.parallel_refit,
    precision: Annotated[str, _opt(Ross, "precision")] = Ross.precision,
    level_days: Annotated[int, _opt(Ross, "level_days")] = Ross.level_days,
    layers: Annotated[str, _opt(Ross, "layers")] = _layers_text(Ross.layers),
    wd: Annotated[float, _opt(Ross, "wd", min=0.0)] = Ross.wd,
    seed: SeedOpt = Ross.seed,
    experiment: Annotated[str, _opt(Ross, "experiment")] = Ross.experiment,
    register: Annotated[str | None, _opt(Ross, "register")] = Ross.register,
    force: Annotated[bool, _opt(Ross, "force")] = Ross.force,
    as_json: JsonOpt = False,
    quiet: QuietOpt = Ross.quiet,
    nproc: NprocOpt = 1,
) -> None:
    """Train the entity-embedding TabularModel on Rossmann data, with forest checks."""
    from pipelines.jobs.rossmann import train_rossmann

    cfg = dict(train=train, store=store, external_dir=external_dir, trends=trends, valid_days=valid_days, calendar=calendar,
               epochs=epochs, lr=lr, batch_size=batch_size, steps=steps, min_epochs=min_epochs, ensemble=ensemble,
               ensemble_kind=ensemble_kind, cycle_epochs=cycle_epochs, refit=refit, parallel_refit=parallel_refit,
               precision=precision, level_days=level_days,
               layers=_parse_layers(layers),
               wd=wd, seed=seed, experiment=experiment, register=register, force=force, quiet=quiet)
    _run_train(ctx, lambda: train_rossmann(RossmannConfig(**cfg)), as_json, quiet, nproc)


def _parse_layers(text: str) -> tuple[int, ...]:
    """'500,250' -> (500, 250); a usage error (exit 2) that names the option otherwise."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated positive integers, got {text!r}",
                                 param_hint="--layers") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"expected comma-separated positive integers, got {text!r}", param_hint="--layers")
    return sizes


# ---------------------------------------------------------------- lr-find
@lr_app.command("rossmann")
def lr_find_rossmann(
    train: Annotated[str, _opt(Ross, "train")],
    store: Annotated[str, _opt(Ross, "store")],
    external_dir: Annotated[str | None, _opt(Ross, "external_dir")] = Ross.external_dir,
    trends: Annotated[bool, _opt(Ross, "trends")] = Ross.trends,
    valid_days: Annotated[int, _opt(Ross, "valid_days", min=1)] = Ross.valid_days,
    batch_size: Annotated[str, _opt(Ross, "batch_size")] = str(Ross.batch_size),
    layers: Annotated[str, _opt(Ross, "layers")] = _layers_text(Ross.layers),
    wd: Annotated[float, _opt(Ross, "wd", min=0.0)] = Ross.wd,
    seed: SeedOpt = Ross.seed,
    plot: Annotated[Path | None, typer.Option(help="Write the loss-vs-lr plot here (PNG).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = Ross.quiet,
) -> None:
    """Sweep learning rates on the Rossmann model and suggest one."""
    from pipelines.jobs.rossmann import find_lr, prepare

    def body() -> dict[str, Any]:
        cfg = RossmannConfig(train=train, store=store, external_dir=external_dir, trends=trends,
                             valid_days=valid_days, batch_size=batch_size, layers=_parse_layers(layers), wd=wd, seed=seed,
                             quiet=quiet)
        cfg.validate()
        return _finder_result(find_lr(cfg, prepare(cfg)), plot)

    _run(body, as_json, quiet)


@lr_app.command("ratings")
def lr_find_ratings(
    ratings: Annotated[str, _opt(Rat, "ratings")],
    format: Annotated[str, _opt(Rat, "format")] = Rat.format,
    model: Annotated[str, _opt(Rat, "model")] = Rat.model,
    factors: Annotated[int, _opt(Rat, "factors", min=1)] = Rat.factors,
    wd: Annotated[float | None, _opt(Rat, "wd")] = Rat.wd,
    batch_size: Annotated[int | None, _opt(Rat, "batch_size", min=1)] = Rat.batch_size,
    seed: SeedOpt = Rat.seed,
    plot: Annotated[Path | None, typer.Option(help="Write the loss-vs-lr plot here (PNG).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = Rat.quiet,
) -> None:
    """Sweep learning rates on a ratings model and suggest one."""
    from pipelines.jobs.ratings import find_lr

    def body() -> dict[str, Any]:
        cfg = RatingsConfig(ratings=ratings, format=format, model=model, factors=factors, wd=wd,
                            batch_size=batch_size, seed=seed, quiet=quiet)
        return _finder_result(find_lr(cfg), plot)

    _run(body, as_json, quiet)


def _finder_result(result: Any, plot: Path | None) -> dict[str, Any]:
    out = {"suggestion": result.suggestion, "method": result.method,
           "lrs": [float(x) for x in result.lrs], "losses": [float(x) for x in result.losses]}
    if plot is not None:
        out["plot"] = str(result.plot(plot))
    return out


# ---------------------------------------------------------------- batch
@app.command("score")
def score_cmd(
    model: Annotated[str, typer.Option(help="Bundle dir, runs:/<id>/model, models:/<name>/<version> or @alias.")],
    input: Annotated[str, typer.Option(help="Parquet/CSV file or a directory of them.")],
    output: Annotated[str, typer.Option(help="Output Parquet file.")],
    uncertainty: Annotated[bool, typer.Option(help="Add a per-row `spread` column (tree variance).")] = False,
    max_drift_auc: Annotated[float, typer.Option(min=0.0, max=1.0,
                                                 help="Warn (or fail) when the drift check's AUC exceeds this.")] = 0.8,
    fail_on_drift: Annotated[bool, typer.Option(help="Exit 2 before writing when drift exceeds --max-drift-auc.")] = False,
    drift_rows: Annotated[int, typer.Option(min=0, help="Batch rows sampled for the drift check (0: off).")] = 5000,
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows per scoring chunk (bounds memory).")] = 100_000,
    submission_csv: Annotated[str | None, typer.Option(help="Also write a Kaggle submission CSV (Id,Sales).")] = None,
    calendar: Annotated[str | None, typer.Option(
        help="Known future events (CSV/Parquet, test.csv layout: Store, Date, Promo, StateHoliday, "
             "SchoolHoliday) laid over the bundle's event calendar for this run.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the batch run.")] = "batch",
    track: Annotated[bool, typer.Option("--track/--no-track", help="Record the batch run in MLflow.")] = True,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score a file with a tabular or ratings model (keys + prediction, Parquet)."""
    from pipelines.batch import score_file

    _run(lambda: score_file(model, input, output, quiet=quiet, uncertainty=uncertainty, max_drift_auc=max_drift_auc,
                            fail_on_drift=fail_on_drift, drift_rows=drift_rows, batch_rows=batch_rows,
                            submission_csv=submission_csv, experiment=experiment, track=track,
                            calendar=calendar), as_json, quiet)


@app.command("recommend")
def recommend_cmd(
    model: Annotated[str, typer.Option(help="A ratings model URI.")],
    output: Annotated[str, typer.Option(help="Output Parquet file (user, rank, item, score).")],
    users: Annotated[str | None, typer.Option(help="File of user ids (one column); default all users.")] = None,
    k: Annotated[int, typer.Option(min=1)] = 10,
    include_seen: Annotated[bool, typer.Option(help="Do not exclude items the user already rated.")] = False,
    batch_rows: Annotated[int, typer.Option(min=1, help="Output rows per chunk (bounds memory).")] = 100_000,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the batch run.")] = "batch",
    track: Annotated[bool, typer.Option("--track/--no-track", help="Record the batch run in MLflow.")] = True,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-k recommendations for all or listed users, seen items excluded."""
    from pipelines.batch import recommend_file

    _run(lambda: recommend_file(model, output, users=users, k=k, quiet=quiet, exclude_seen=not include_seen,
                                batch_rows=batch_rows, experiment=experiment, track=track), as_json, quiet)


# ---------------------------------------------------------------- serve
@app.command("serve")
def serve_cmd(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    model: Annotated[list[str] | None, typer.Option(help="NAME=URI, repeatable.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Uvicorn worker processes.")] = None,
    calendar: Annotated[list[str] | None, typer.Option(
        help="NAME=PATH, repeatable: known future events (test.csv layout) laid over model NAME's "
             "event calendar; re-read on POST /v1/admin/reload. Also TABREC_CALENDARS.")] = None,
) -> None:
    """Serve registered models over HTTP (FastAPI + uvicorn)."""
    from service.server import serve

    _run(lambda: serve(host=host, port=port, models=model or [], workers=workers, calendars=calendar or []),
         as_json=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
