"""MLflow glue: run lifecycle, parameter/metric/plot logging, datasets, the run's description,
the bundle as a pyfunc, registry, and what batch runs add (a fast reachability check, ending the
runs of a killed batch process).

A run that raises ends FAILED with the error as a tag; nothing is registered from it. Every
experiment is tagged for the UI's model-training view. Metric names: per-epoch history is
`epoch/<name>` with step = epoch, final results keep plain names (`valid_rmspe`), timings are
`time/<name>`, and the learning rate used is a param, not a metric (see `mlflow_metric_names`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.types import ColSpec, Schema

from modeling.errors import DataError
from modeling.training.callbacks import Callback
from pipelines.datasets import DataInput, describe_source
from pipelines.run_notes import Champion, Decision, Headline, version_description

log = logging.getLogger("tabrec.tracking")

CHAMPION = "champion"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's model-training view (not the GenAI one)
NOTE_TAG = "mlflow.note.content"  # the run description the UI shows and edits
PYFUNC_FILE = Path(__file__).resolve().parent.parent / "modeling" / "pyfunc_model.py"
MODELING_DIR = PYFUNC_FILE.parent
MAX_PARAM_LEN = 6000


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup_tracking() -> str:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def _ensure_experiment(name: str) -> str:
    """The experiment's id, created (or restored) and tagged for the UI's model-training view."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:") and not os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        db_path = Path(mlflow.get_tracking_uri().removeprefix("sqlite:///"))
        location = (db_path.parent / "mlartifacts").resolve().as_uri()
    elif os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        location = os.environ["MLFLOW_ARTIFACT_ROOT"]
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


@contextmanager
def tracked_run(experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start a run; end it FINISHED, or FAILED (KILLED on Ctrl-C) with the error as a tag.

    An unreachable tracking server fails here, in seconds, before any run exists."""
    check_tracking_reachable()
    setup_tracking()
    exp_id = _ensure_experiment(experiment)
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=dict(tags or {}))
    try:
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:4000])
        finally:
            mlflow.end_run(status)
        raise
    else:
        mlflow.end_run("FINISHED")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def log_params(params: Mapping[str, Any]) -> None:
    flat = {k: str(v)[:MAX_PARAM_LEN] for k, v in flatten(params).items()}
    mlflow.log_params(flat)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items() if is_number(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


# keys of a job's final metrics that are settings or timings, not results
LR_KEYS = {"lr": "lr_used"}


def mlflow_metric_names(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, params) as the run logs a job's final figures: results keep their names, timings
    go under `time/`, and the learning rate used becomes the param `lr_used` (the `train --json`
    keys stay as they are; only the run's names change)."""
    out: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for k, v in metrics.items():
        if k in LR_KEYS:
            params[LR_KEYS[k]] = v
        elif k.endswith("seconds") or k.startswith("seconds_"):
            out[f"time/{k}"] = v
        else:
            out[k] = v
    return out, params


def log_final_metrics(metrics: Mapping[str, Any]) -> None:
    """A job's final figures, named for the metrics table (see `mlflow_metric_names`)."""
    named, params = mlflow_metric_names(metrics)
    log_metrics(named)
    if params:
        log_params(params)


def is_number(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


EPOCH_PREFIX = "epoch/"
_EPOCH_PLAIN = ("train_loss", "valid_loss", "lr", "seconds")


def epoch_metric_name(key: str) -> str:
    """The history name of a trainer log key: `epoch/train_loss`, `epoch/lr`, and the validation
    metrics as `epoch/valid_<name>` (the trainer computes them on the validation set)."""
    return EPOCH_PREFIX + (key if key in _EPOCH_PLAIN or key.startswith("valid_") else f"valid_{key}")


class MLflowEpochLogger(Callback):
    """Per-epoch train/valid loss, validation metrics, lr and seconds as `epoch/...` metrics with
    step = epoch, so the history never sits beside (or shadows) a final figure of the same name.
    A prefix keeps a second training's history apart (the refit's `refit/epoch/...`)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, Any]) -> None:
        log_metrics({self.prefix + epoch_metric_name(k): v for k, v in logs.items() if k != "epoch"}, step=epoch)


def log_plot(path: str | Path | None) -> None:
    if path is not None and Path(path).is_file():
        mlflow.log_artifact(str(path), artifact_path="plots")


def log_json(obj: Any, name: str) -> None:
    mlflow.log_dict(obj, name)


def log_table(frame: pd.DataFrame, name: str) -> None:
    """A table artifact (CSV: the UI's artifact viewer shows it as a table)."""
    mlflow.log_text(frame.to_csv(index=False), name)


def set_description(text: str, run_id: str | None = None) -> None:
    """The run's Markdown description (the `mlflow.note.content` tag; a finished run may get it too)."""
    if run_id is None:
        mlflow.set_tag(NOTE_TAG, text)
    else:
        MlflowClient().set_tag(run_id, NOTE_TAG, text)


def file_fingerprint(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the bytes of the input files, to tie a run to its exact data.

    A path that is not a regular file (a pipe, a directory of parts) is never opened: what is
    known of it (`describe_source`'s digest) goes into the hash instead of its bytes."""
    h = hashlib.sha256()
    for p in paths:
        if not Path(p).is_file():
            h.update(describe_source(p).sha256.encode())
            continue
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- datasets


class _DescribedDataset(Dataset):
    """An MLflow dataset from a `DataInput`: source path, digest, schema and profile, no rows."""

    def __init__(self, source: Any, name: str, digest: str, schema: Schema | None, profile: dict[str, Any]):
        self._schema = schema
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:  # the digest is always given
        return self._digest

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    @property
    def schema(self) -> Schema | None:
        return self._schema

    def to_dict(self) -> dict[str, str]:
        d = super().to_dict()
        d["profile"] = json.dumps(self._profile, default=_json_default)
        if self._schema is not None:
            d["schema"] = json.dumps({"mlflow_colspec": self._schema.to_dict()})
        return d


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def log_datasets(inputs: Sequence[DataInput]) -> list[dict[str, Any]]:
    """`mlflow.log_inputs` for the run's datasets (context as MLflow's input tag); returns what
    was logged (name, context, digest, profile), which the run description reads."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    # MLflow's source for local paths (resolving a path finds two registered candidates and warns)
    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    described, datasets = [], []
    for inp in inputs:
        d = inp.describe()
        schema = Schema([ColSpec(t, n) for n, t in inp.columns.items()]) if inp.columns else None
        source = local(str(Path(inp.sources[0]).absolute()))
        datasets.append(_DescribedDataset(source, d["name"], d["digest"], schema, d["profile"]))
        described.append(d)
    if datasets:
        mlflow.log_inputs(datasets=datasets, contexts=[d["context"] for d in described],
                          tags_list=[{"tabrec.note": d["profile"]["note"]} if "note" in d["profile"] else None
                                     for d in described])
    return described


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=PYFUNC_FILE.parent.parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def pip_requirements() -> list[str]:
    """Pinned runtime requirements of the served model (avoids MLflow's slow inference)."""
    from importlib.metadata import version

    names = ["torch", "numpy", "pandas", "pyarrow", "safetensors", "scikit-learn", "mlflow"]
    return [f"{n}=={version(n)}" for n in names]


def log_bundle(bundle_dir: Path, input_example: pd.DataFrame, predictions: Any) -> tuple[str, str]:
    """Log the bundle as a models-from-code pyfunc with signature and input example.

    Returns the user-facing ``runs:/<id>/model`` URI and MLflow 3's logged-model URI
    (``models:/m-...``), which registration uses directly.
    """
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, predictions)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_FILE),
        artifacts={"bundle": str(bundle_dir)},
        code_paths=[str(MODELING_DIR)],
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements(),
    )
    return f"runs:/{mlflow.active_run().info.run_id}/model", info.model_uri


def current_champion(name: str, metric: str) -> Champion | None:
    """The version holding alias `champion` of registered model `name`, with its run's `metric`."""
    client = MlflowClient()
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    value = None
    if champ.run_id:
        try:
            value = client.get_run(champ.run_id).data.metrics.get(metric)
        except mlflow.exceptions.MlflowException:
            value = None
    return Champion(name, str(champ.version), value, champ.run_id)


UI_VIEW = "workflowType=machine_learning"  # MLflow 3.17's UI picks GenAI or model-training view from this


def run_link(run_id: str, experiment_id: str | None = None, subpath: str = "") -> str:
    """The run's page (or `subpath` under it, e.g. `/artifacts/plots/x.png`) in the UI's
    model-training view: absolute for an http(s) tracking server, else the UI's relative route."""
    if experiment_id is None:
        experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    route = f"#/experiments/{experiment_id}/runs/{run_id}{subpath}?{UI_VIEW}"
    uri = tracking_uri()
    return f"{uri.rstrip('/')}/{route}" if urlparse(uri).scheme in ("http", "https") else route


def register_version(model_uri: str, name: str, headline: Headline, force: bool = False,
                     run_id: str | None = None) -> Decision:
    """Register a finished run's model; move alias `champion` only if it beats the current one
    (or with `force`); write the decision, the comparison and the run link into the version's
    description and tags."""
    client = MlflowClient()
    champ = current_champion(name, headline.metric)
    mv = mlflow.register_model(model_uri, name)
    value = headline.value
    better = champ is None or champ.value is None or (
        value < champ.value if headline.lower_is_better else value > champ.value)
    decision = Decision(name, str(mv.version), headline.metric, value, champ, better, force,
                        headline.lower_is_better)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    else:
        log.warning("%s version %s: %s", name, mv.version, decision.sentence().replace("**", ""))
    rid = run_id or mv.run_id
    if rid:
        run_name = client.get_run(rid).info.run_name
        text = version_description(decision, headline, run_link(rid), run_name)
        client.update_model_version(name, mv.version, description=text)
    for key, val in decision.tags().items():
        client.set_model_version_tag(name, mv.version, key, val)
    return decision


def register_and_promote(
    model_uri: str,
    name: str,
    metric: str,
    value: float,
    lower_is_better: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """`register_version` without baselines; the CLI's `registered` dict."""
    return register_version(model_uri, name, Headline(metric, value, lower_is_better=lower_is_better),
                            force=force).result()


# ---------------------------------------------------------------- batch runs
# pipelines.batch imports this module only when a job is tracked or its model lives in MLflow:
# importing mlflow takes seconds, and `--no-track` on a local bundle never needs it.

TRACKING_TIMEOUT_S = 5.0


class TrackingUnavailableError(DataError):
    """The MLflow tracking server cannot be reached."""


def check_tracking_reachable(timeout: float = TRACKING_TIMEOUT_S) -> str:
    """Fail fast (not after MLflow's minutes of retries) when an http(s) tracking server is down."""
    uri = tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout).close()
        except OSError as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({exc.strerror or exc}); "
                "check MLFLOW_TRACKING_URI or run without tracking") from exc
    return uri


def end_stale_runs(run: Any, tag: str, value: str) -> int:
    """Mark the experiment's other RUNNING runs tagged `tag` = `value` KILLED, with the reason as a tag.

    A batch job calls this for its output while holding the output's lock: a run of the same output
    still RUNNING held that lock too, so its process is gone (killed before it could end the run).
    """
    if "'" in value:
        return 0
    client = MlflowClient()
    flt = f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'"
    stale = [r for r in client.search_runs([run.info.experiment_id], flt, max_results=100)
             if r.info.run_id != run.info.run_id]
    for r in stale:
        client.set_tag(r.info.run_id, "error", "process died (found RUNNING by a later run)")
        client.set_terminated(r.info.run_id, "KILLED")
    return len(stale)
