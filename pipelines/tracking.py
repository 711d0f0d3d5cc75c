"""MLflow glue: run lifecycle, parameter/metric/plot logging, the bundle as a pyfunc, registry,
and what batch runs add (a fast reachability check, ending the runs of a killed batch process).

A run that raises ends FAILED with the error as a tag; nothing is registered from it.
"""

from __future__ import annotations

import hashlib
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
import pandas as pd
from mlflow import MlflowClient

from modeling.errors import DataError
from modeling.training.callbacks import Callback

log = logging.getLogger("tabrec.tracking")

CHAMPION = "champion"
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
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:") and not os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        db_path = Path(mlflow.get_tracking_uri().removeprefix("sqlite:///"))
        location = (db_path.parent / "mlartifacts").resolve().as_uri()
    elif os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        location = os.environ["MLFLOW_ARTIFACT_ROOT"]
    return client.create_experiment(name, artifact_location=location)


@contextmanager
def tracked_run(experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start a run; end it FINISHED, or FAILED (KILLED on Ctrl-C) with the error as a tag."""
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
    clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def _is_number(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


class MLflowEpochLogger(Callback):
    """Per-epoch train/valid loss, metrics and lr as MLflow metrics with step = epoch."""

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, Any]) -> None:
        log_metrics({k: v for k, v in logs.items() if k != "epoch"}, step=epoch)


def log_plot(path: str | Path | None) -> None:
    if path is not None and Path(path).is_file():
        mlflow.log_artifact(str(path), artifact_path="plots")


def log_json(obj: Any, name: str) -> None:
    mlflow.log_dict(obj, name)


def file_fingerprint(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the bytes of the input files, to tie a run to its exact data."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


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


def register_and_promote(
    model_uri: str,
    name: str,
    metric: str,
    value: float,
    lower_is_better: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Register a finished run's model; move alias `champion` only if it beats the current one."""
    client = MlflowClient()
    mv = mlflow.register_model(model_uri, name)
    current = None
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
        champ_run = client.get_run(champ.run_id)
        current = champ_run.data.metrics.get(metric)
    except mlflow.exceptions.MlflowException:
        champ = None
    better = current is None or (value < current if lower_is_better else value > current)
    promoted = bool(force or better)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    else:
        log.warning(
            "%s version %s (%s=%.5f) does not beat champion version %s (%.5f): alias unchanged",
            name, mv.version, metric, value, champ.version if champ else "?", current,
        )
    return {
        "name": name,
        "version": str(mv.version),
        "alias": CHAMPION if promoted else None,
        "champion_metric": current,
        "metric": metric,
    }


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
