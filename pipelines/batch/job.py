"""The frame both batch jobs run in, and what they share (run logging, model source, progress).

`batch_job` does, in order: fail fast when the model or the run needs an unreachable MLflow
tracking server; lock the output (a second run on it fails at once); start the MLflow run in
experiment `batch`, tagged with the output; delete the temp files a killed run left beside the
outputs and end that run's record (still RUNNING) as KILLED. Leaving the frame ends the run
FINISHED, or FAILED with the error, then releases the lock.

Without tracking (`track=False`) the run is None and the logging helpers do nothing; then
`pipelines.tracking`, hence mlflow, is imported only when the model URI itself lives in MLflow.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from modeling.predictors import Predictor
from modeling.uri import ModelUri
from pipelines.batch.outputs import output_lock, remove_stale_temps

OUTPUT_TAG = "tabrec.output"


@contextmanager
def batch_job(model: ModelUri, outputs: Sequence[Path], *, track: bool, experiment: str, run_name: str,
              pipeline: str) -> Iterator[Any]:
    """Yield the job's MLflow run (None without tracking) under the lock of `outputs[0]`; every
    path in `outputs` is cleared of a killed run's temp files first."""
    if track or model.needs_tracking:
        from pipelines import tracking

        tracking.check_tracking_reachable()
    out = outputs[0]
    with ExitStack() as stack:
        stack.enter_context(output_lock(out))
        run = None
        if track:
            from pipelines import tracking

            tags = {"tabrec.pipeline": pipeline, OUTPUT_TAG: str(out)}
            run = stack.enter_context(tracking.tracked_run(experiment, run_name=run_name, tags=tags))
        for path in outputs:
            remove_stale_temps(path)
        if run is not None:
            tracking.end_stale_runs(run, OUTPUT_TAG, str(out))
        yield run


def log_run(run: Any, params: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
            artifacts: Mapping[str, Any] | None = None) -> None:
    """Params, metrics and JSON artifacts (name -> object) on the job's run; nothing without one."""
    if run is None:
        return
    from pipelines import tracking

    if params:
        tracking.log_params(params)
    if metrics:
        tracking.log_metrics(metrics)
    for name, obj in (artifacts or {}).items():
        tracking.log_json(obj, name)


def log_input(run: Any, path: Path, rows: int, columns: Any, *, n_files: int = 1, context: str = "scoring",
              profile: Mapping[str, Any] | None = None) -> None:
    """The job's input as the run's dataset (`mlflow.log_input`): the --input file or directory,
    its row count and columns (a pyarrow schema or name -> MLflow type); a directory of parts or a
    pipe is described with a note instead of a content hash. Nothing without a run."""
    if run is None:
        return
    from pipelines import tracking
    from pipelines.datasets import DataInput, arrow_columns

    cols = dict(columns) if isinstance(columns, Mapping) else arrow_columns(columns)
    prof = {"n_files": n_files, **(profile or {})}
    tracking.log_datasets([DataInput(path.name or str(path), context, [str(path)], rows, cols, profile=prof)])


def run_id(run: Any) -> str | None:
    return run.info.run_id if run is not None else None


def source_info(predictor: Predictor, uri: str) -> dict[str, Any]:
    """Where the model came from, for the run's params and the job's result."""
    src = predictor.source
    return {"uri": uri, "kind": predictor.kind, "name": src.name, "version": src.version, "run_id": src.run_id}


def progress(total: int, quiet: bool, unit: str) -> Any:
    """A tqdm bar on stderr, silent when quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())
