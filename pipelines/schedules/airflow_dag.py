"""Airflow 3 DAG `tabrec_batch`: weekly retrain (promotes `champion` only if better) -> daily scoring
and recommendations, every task a call of the `tabrec` CLI.

Install: copy this file into Airflow's dags folder and set the Airflow Variable `tabrec` (JSON; keys
below, or the environment variable `AIRFLOW_VAR_TABREC`). The tasks run `tabrec` from the project's
own virtualenv (key `bin`), so Airflow needs no tabrec imports and tabrec needs nothing of Airflow.
pipelines/schedules/README.md has the commands, the data layout and what each failure leaves
behind; tests/test_airflow_dag.py runs this file in a real Airflow (`airflow dags test`).

Remote MLflow: set key `mlflow_tracking_uri` to the server (e.g. http://mlflow.internal:5000, run
with proxied artifacts). Its credentials (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and
_PASSWORD) come from the worker's environment, which every task inherits (`append_env=True`), or
from ~/.mlflow/credentials; never from the Variable.

Exit codes become task states (see `TabrecOperator`):
0 success; 99 skipped (not a training day); 2 bad input or usage: failed at once, no retries
(a retry would read the same input); anything else (1 internal error, killed): retried.
Retries are safe: score/recommend write atomically under a lock and rebuild the whole output.

Without Airflow installed this module imports cleanly and defines `dag = None`.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from typing import Any

if importlib.util.find_spec("airflow") is None:  # not an Airflow worker: nothing to define
    BashOperator = DAG = CronTriggerTimetable = None
else:  # Airflow 3 with the standard provider; anything missing is an import error Airflow shows
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG

    try:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
    except ImportError:  # Airflow 3.0
        from airflow.exceptions import AirflowFailException, AirflowSkipException
    try:
        from airflow.sdk import CronTriggerTimetable
    except ImportError:  # Airflow 3.0
        from airflow.timetables.trigger import CronTriggerTimetable

DAG_ID = "tabrec_batch"
SETTINGS = "tabrec"  # the Airflow Variable (JSON) every path comes from
BAD_INPUT = 2  # tabrec's exit code for bad input or usage
SKIP = 99  # BashOperator's default skip_on_exit_code
REQUIRED = ("bin", "data", "out", "mlflow_tracking_uri")
OPTIONAL = {"train_weekday": "1", "train_rossmann_args": "", "train_ratings_args": "", "score_args": "",
            "recommend_args": ""}


def _setting(key: str) -> str:
    """Jinja for one key of the Variable, rendered when the task runs (not when the file is parsed)."""
    if key in REQUIRED:
        return f"{{{{ var.json.{SETTINGS}.{key} }}}}"
    return f"{{{{ var.json.{SETTINGS}.get('{key}', '{OPTIONAL[key]}') }}}}"


# What each task sees: the Variable's keys as the environment variables the cron example uses too.
ENV = {
    "TABREC_BIN": _setting("bin"),
    "TABREC_DATA": _setting("data"),
    "TABREC_OUT": _setting("out"),
    "MLFLOW_TRACKING_URI": _setting("mlflow_tracking_uri"),
    "TABREC_TRAIN_WEEKDAY": _setting("train_weekday"),
    "TABREC_TRAIN_ROSSMANN_ARGS": _setting("train_rossmann_args"),
    "TABREC_TRAIN_RATINGS_ARGS": _setting("train_ratings_args"),
    "TABREC_SCORE_ARGS": _setting("score_args"),
    "TABREC_RECOMMEND_ARGS": _setting("recommend_args"),
    "TABREC_DATE": "{{ ds }}",  # the run's logical date; 05:00 on D scores D's drop
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


# The tabrec command of each task (cron.example runs the very same lines). The *_args settings are
# left unquoted on purpose: they are word-split into flags.
COMMANDS = {
    "train_rossmann": '"$TABREC_BIN" train rossmann --train "$TABREC_DATA/rossmann/train.csv" '
                      '--store "$TABREC_DATA/rossmann/store.csv" --register rossmann --json --quiet '
                      '$TABREC_TRAIN_ROSSMANN_ARGS',
    "train_ratings": '"$TABREC_BIN" train ratings --ratings "$TABREC_DATA/ratings/ratings.csv" '
                     '--register ratings --json --quiet $TABREC_TRAIN_RATINGS_ARGS',
    "score_rossmann": '"$TABREC_BIN" score --model models:/rossmann@champion '
                      '--input "$TABREC_DATA/rossmann/incoming/$TABREC_DATE" '
                      '--output "$TABREC_OUT/rossmann/$TABREC_DATE.parquet" --json --quiet $TABREC_SCORE_ARGS',
    "recommend": '"$TABREC_BIN" recommend --model models:/ratings@champion '
                 '--output "$TABREC_OUT/recommendations/$TABREC_DATE.parquet" --json --quiet $TABREC_RECOMMEND_ARGS',
}
# The training-day guard, shared with cron.example. GNU `date` gives the ISO weekday of the run's
# day; an unreadable date or a train_weekday outside 1-7 is a usage error (exit 2), never a silent skip.
WEEKDAY = ('wd=$(date -d "$TABREC_DATE" +%u) && case "$TABREC_TRAIN_WEEKDAY" in [1-7]) ;; *) false ;; esac '
           '|| { echo "tabrec: cannot tell if $TABREC_DATE is a training day (train_weekday '
           '\'$TABREC_TRAIN_WEEKDAY\', want 1-7; GNU date needed)" >&2; exit 2; }')
NOT_A_TRAINING_DAY = 'tabrec: $TABREC_DATE is not a training day (train_weekday=$TABREC_TRAIN_WEEKDAY): nothing trained'


def _on_training_day(cmd: str) -> str:
    """Run `cmd` on the training weekday; on other days exit 99 (skipped) before anything starts."""
    return f'{WEEKDAY}; if [ "$wd" != "$TABREC_TRAIN_WEEKDAY" ]; then echo "{NOT_A_TRAINING_DAY}"; exit {SKIP}; fi; {cmd}'


TRAIN_ROSSMANN = _on_training_day(COMMANDS["train_rossmann"])
TRAIN_RATINGS = _on_training_day(COMMANDS["train_ratings"])
SCORE = COMMANDS["score_rossmann"]
RECOMMEND = COMMANDS["recommend"]

if BashOperator is not None:

    class TabrecOperator(BashOperator):
        """A BashOperator that reads tabrec's exit codes: 2 (bad input or usage) fails the task
        at once without its retries; 99 skips it; any other non-zero exit is retried."""

        def execute(self, context: Any) -> Any:
            try:
                return super().execute(context)
            except AirflowSkipException:
                raise
            except Exception as exc:
                proc = self.subprocess_hook.sub_process
                if proc is not None and proc.returncode == BAD_INPUT:
                    raise AirflowFailException(
                        f"tabrec exited {BAD_INPUT} (bad input or usage; the error is in the log above): "
                        "not retried, a retry would read the same input. Fix it, then clear this task.") from exc
                raise


def build_dag() -> Any:
    """The DAG, or None where Airflow 3 is not installed."""
    if DAG is None:
        return None
    defaults = {"retries": 2, "retry_delay": dt.timedelta(minutes=10), "env": ENV, "append_env": True,
                "skip_on_exit_code": SKIP}
    with DAG(
        dag_id=DAG_ID,
        # 05:00 UTC daily; a trigger timetable makes the logical date (`ds`) the day of the run.
        schedule=CronTriggerTimetable("0 5 * * *", timezone="UTC"),
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,
        default_args=defaults,
        tags=["tabrec"],
        doc_md=__doc__,
    ) as built:
        train_rossmann = TabrecOperator(task_id="train_rossmann", bash_command=TRAIN_ROSSMANN)
        train_ratings = TabrecOperator(task_id="train_ratings", bash_command=TRAIN_RATINGS)
        # all_done: score with whatever `champion` is once training has ended, trained or not, so a
        # failed retrain does not cost the day's output (the run still ends failed).
        score = TabrecOperator(task_id="score_rossmann", bash_command=SCORE, trigger_rule="all_done")
        recommend = TabrecOperator(task_id="recommend", bash_command=RECOMMEND, trigger_rule="all_done")
        train_rossmann >> score
        train_ratings >> recommend
    return built


dag = build_dag()
