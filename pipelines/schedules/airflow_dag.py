"""Example Airflow DAG: weekly retrain (promotes `champion` only if better) -> daily scoring and recommendations.

Copy this file into Airflow's dags/ folder and set the Variables/paths below. Every task shells
out to the `tabrec` CLI, so Airflow needs no tabrec imports and the model code runs in the
tabrec virtualenv. Exit codes drive Airflow: 0 success, 2 bad input (fix the data; a retry
will not help), 1 internal error, 99 skipped (Airflow's default `skip_on_exit_code`). Retries
are safe: score/recommend write atomically and rebuild the whole output on a rerun.

Without Airflow installed this module imports cleanly and defines `dag = None`.
"""

from __future__ import annotations

import datetime as dt
import os

try:
    from airflow import DAG

    try:  # Airflow 3 moved the core operators into the standard provider
        from airflow.providers.standard.operators.bash import BashOperator
    except ImportError:  # Airflow 2
        from airflow.operators.bash import BashOperator
except ImportError:  # not an Airflow worker: nothing to define
    DAG = None
    BashOperator = None

TABREC = os.environ.get("TABREC_BIN", "/srv/tabrec/.venv/bin/tabrec")
DATA = os.environ.get("TABREC_DATA", "/srv/data/rossmann")
RATINGS = os.environ.get("TABREC_RATINGS", "/srv/data/ratings")
OUT = os.environ.get("TABREC_OUT", "/srv/data/scored")
ENV = {"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")}

# Retrain on Mondays only; on other days exit 99 so Airflow marks the task skipped.
TRAIN = (
    '[ "$(date -d {{ ds }} +%u)" = 1 ] || exit 99; '
    f"{TABREC} train rossmann --train {DATA}/train.csv --store {DATA}/store.csv "
    "--register rossmann --json --quiet"
)
SCORE = (
    f"{TABREC} score --model models:/rossmann@champion --input {DATA}/incoming/{{{{ ds }}}} "
    f"--output {OUT}/rossmann/{{{{ ds }}}}.parquet --json --quiet"
)
RECOMMEND = (
    f"{TABREC} recommend --model models:/ratings@champion --users {RATINGS}/active_users/{{{{ ds }}}}.csv "
    f"--output {OUT}/recommendations/{{{{ ds }}}}.parquet --k 10 --json --quiet"
)


def build_dag() -> object | None:
    """The DAG, or None where Airflow is not installed."""
    if DAG is None:
        return None
    defaults = {"retries": 2, "retry_delay": dt.timedelta(minutes=10), "env": ENV, "append_env": True}
    with DAG(
        dag_id="tabrec_batch",
        schedule="0 5 * * *",
        start_date=dt.datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        default_args=defaults,
        tags=["tabrec"],
    ) as built:
        train = BashOperator(task_id="train_and_promote", bash_command=TRAIN)
        score = BashOperator(task_id="score_rossmann", bash_command=SCORE, trigger_rule="none_failed")
        BashOperator(task_id="recommend", bash_command=RECOMMEND)  # independent of the Rossmann chain
        train >> score
    return built


dag = build_dag()
