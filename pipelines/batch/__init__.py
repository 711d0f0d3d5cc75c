"""Batch jobs behind `tabrec score` and `tabrec recommend`.

Both take any model URI (`modeling.uri.ModelUri`), stream their input with pyarrow so memory
stays bounded, write Parquet under a hidden temp name and rename it into place (a crash never
leaves a partial output; a rerun rebuilds it), hold a non-blocking lock on `<output>.lock` so
overlapping runs on one output cannot interleave, and record an MLflow run in experiment
"batch". The model logic is the predictor's (`modeling.predictors`); this package reads,
chunks, gates on drift and writes.

  inputs     the --input files (Parquet/CSV, one file or a directory), schema checks, batches
  outputs    output paths, the lock, atomic writers, leftovers of a killed run
  job        the frame both jobs run in (tracking fast-fail, lock, MLflow run), shared helpers
  drift      the drift gate on top of `modeling.drift` (warn or DriftError) and its log lines
  score      plans (whole / stream), event calendars (`calendar=`), predictions, `score_file`
  recommend  `recommend_file`

Log lines go to the logger "tabrec.score". The MLflow side (reachability check,
TrackingUnavailableError, ending a killed run's record) is in `pipelines.tracking`, imported only
when a run is tracked or the model lives in MLflow.
"""

from pipelines.batch.drift import DriftError, drift_exclusions
from pipelines.batch.inputs import InputSet, count_rows, list_input_files, open_inputs, read_batches
from pipelines.batch.outputs import (
    AtomicTableWriter,
    OutputError,
    OutputLockedError,
    output_lock,
    remove_stale_temps,
)
from pipelines.batch.recommend import REC_SCHEMA, read_user_ids, recommend_file
from pipelines.batch.score import Plan, group_columns, key_columns, make_plan, score_file

__all__ = [
    "REC_SCHEMA",
    "AtomicTableWriter",
    "DriftError",
    "InputSet",
    "OutputError",
    "OutputLockedError",
    "Plan",
    "count_rows",
    "drift_exclusions",
    "group_columns",
    "key_columns",
    "list_input_files",
    "make_plan",
    "open_inputs",
    "output_lock",
    "read_batches",
    "read_user_ids",
    "recommend_file",
    "remove_stale_temps",
    "score_file",
]
