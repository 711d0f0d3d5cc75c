"""The shipped DAG (pipelines/schedules/airflow_dag.py) run end to end by a real Airflow 3.

The slow tests install Apache Airflow with the standard provider into a cached venv of its own
(tests/airflow_env.py), give it a temp AIRFLOW_HOME with a sqlite metadata DB, set the Variable
`tabrec` with the documented `airflow variables import`, and run the DAG with `airflow dags test`
on small synthetic data against the project's `tabrec` console script and a temp sqlite MLflow
store. One Airflow, one registry and one data tree serve the whole module, day after day:

    Monday     train -> promote -> score / recommend; the alias moves off a weak champion
    Monday     again: same outputs, the alias stays (idempotent rerun)
    Tuesday    not a training day: both trains skipped; scoring killed mid-write (retried, no
               partial output), then the rerun writes the same scores as Monday (same rows)
    Wednesday  a bad value in the drop: score fails at once (exit 2, no retry), recommend runs

Without network to the package registry they skip with pip's message, except where CI=1 or
TABREC_REQUIRE_AIRFLOW=1 is set (`.ci/run` sets it): there a missing Airflow is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from airflow_env import AirflowUnavailable, airflow_required, airflow_venv
from schedule_data import (
    BAD_LINE,
    MONDAY,
    SCHEDULES,
    SCORE_ARGS,
    TRAIN_RATINGS_ARGS,
    TRAIN_ROSSMANN_ARGS,
    TUESDAY,
    WEDNESDAY,
    batch_runs,
    champion,
    check_recommendations,
    check_scores,
    hidden,
    make_world,
    tabrec_bin,
    train_weak_champion,
    versions,
)

DAG_FILE = SCHEDULES / "airflow_dag.py"
DAG_ID = "tabrec_batch"
TASKS = {"train_rossmann", "train_ratings", "score_rossmann", "recommend"}
RUN_TIMEOUT = 900  # one `airflow dags test` of a training day takes ~2 min on 2 busy cores


def _load_dag_module():
    spec = importlib.util.spec_from_file_location("tabrec_airflow_dag", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dag_module_imports_with_or_without_airflow_and_reads_every_path_from_the_variable():
    module = _load_dag_module()
    assert '"$TABREC_BIN" score --model models:/rossmann@champion' in module.SCORE
    assert '"$TABREC_BIN" recommend --model models:/ratings@champion' in module.RECOMMEND
    # Every path comes from the Variable `tabrec`, rendered into the task's environment at run time.
    assert module.ENV["TABREC_BIN"] == "{{ var.json.tabrec.bin }}"
    for key in module.REQUIRED:
        assert any(f"var.json.tabrec.{key} " in v for v in module.ENV.values()), key
    source = DAG_FILE.read_text()
    assert "/srv/" not in source and "Variable.get" not in source  # no baked-in paths, no parse-time lookups
    if importlib.util.find_spec("airflow") is None:
        assert module.dag is None
    else:
        assert {t.task_id for t in module.dag.tasks} == TASKS
        assert module.dag.get_task("score_rossmann").upstream_task_ids == {"train_rossmann"}


@pytest.mark.parametrize(("date", "weekday", "rc", "says"), [
    (MONDAY, "1", 0, "train rossmann --train"),
    (TUESDAY, "1", 99, f"tabrec: {TUESDAY} is not a training day (train_weekday=1): nothing trained"),
    (TUESDAY, "2", 0, "train rossmann --train"),
    (MONDAY, "Monday", 2, "want 1-7"),
    ("2026-13-45", "1", 2, "cannot tell if 2026-13-45 is a training day"),
])
def test_training_day_guard_exit_codes(date, weekday, rc, says):
    """The train task's command with `echo` for tabrec: 99 (skipped) off the training day, and a
    bad date or weekday setting is exit 2 (failed, not retried), never a silent skip."""
    module = _load_dag_module()
    env = {"PATH": "/usr/bin:/bin", "TABREC_BIN": "/bin/echo", "TABREC_DATA": "/data", "TABREC_DATE": date,
           "TABREC_TRAIN_WEEKDAY": weekday, "TABREC_TRAIN_ROSSMANN_ARGS": "--epochs 1"}
    done = subprocess.run(["/bin/bash", "-c", module.TRAIN_ROSSMANN], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == rc and says in done.stdout + done.stderr
    if rc == 0:
        assert done.stdout.split() == ["train", "rossmann", "--train", "/data/rossmann/train.csv", "--store",
                                       "/data/rossmann/store.csv", "--register", "rossmann", "--json", "--quiet",
                                       "--epochs", "1"]


# ---------------------------------------------------------------------------- the real Airflow


class Airflow:
    """One AIRFLOW_HOME (sqlite metadata DB, dags folder holding a copy of the shipped DAG)."""

    def __init__(self, venv: Path, home: Path):
        self.python = venv / "bin" / "python"
        self.home = home
        self.db = home / "airflow.db"
        (home / "dags").mkdir(parents=True)
        shutil.copy(DAG_FILE, home / "dags" / DAG_FILE.name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        self.env = {**env, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
                    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db}"}
        self.logs: dict[str, str] = {}

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), "-m", "airflow", *args], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout)

    def start_dags_test(self, date: str, log: Path) -> subprocess.Popen:
        handle = open(log, "w")  # noqa: SIM115 - closed by the caller through finish()
        return subprocess.Popen([str(self.python), "-m", "airflow", "dags", "test", DAG_ID, date],
                                env=self.env, cwd=self.home, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def dags_test(self, date: str, name: str) -> dict:
        """`airflow dags test` for one logical date: exit code, seconds, task states, log."""
        log = self.home / f"{name}.log"
        started = time.perf_counter()
        proc = self.start_dags_test(date, log)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop(proc)
            pytest.fail(f"airflow dags test {date} still running after {RUN_TIMEOUT} s (a task waiting "
                        f"to be retried?): {log.read_text()[-3000:]}")
        text = log.read_text()
        self.logs[name] = text
        return {"rc": rc, "seconds": time.perf_counter() - started, "states": self.states(date), "log": text,
                "run_state": self.run_state(date)}

    def states(self, date: str) -> dict[str, tuple[str, int]]:
        """{task_id: (state, try_number)} of the latest run for the logical date, from the metadata DB."""
        with sqlite3.connect(self.db) as db:
            rows = db.execute(
                "SELECT ti.task_id, ti.state, ti.try_number FROM task_instance ti JOIN dag_run dr "
                "ON ti.dag_id = dr.dag_id AND ti.run_id = dr.run_id WHERE dr.dag_id = ? AND dr.logical_date LIKE ? "
                "AND dr.id = (SELECT max(id) FROM dag_run WHERE dag_id = ? AND logical_date LIKE ?)",
                (DAG_ID, f"{date}%", DAG_ID, f"{date}%")).fetchall()
        return {task: (state, tries) for task, state, tries in rows}

    def run_state(self, date: str) -> str | None:
        with sqlite3.connect(self.db) as db:
            row = db.execute("SELECT state FROM dag_run WHERE dag_id = ? AND logical_date LIKE ? ORDER BY id DESC",
                             (DAG_ID, f"{date}%")).fetchone()
        return row[0] if row else None


def stop(proc: subprocess.Popen) -> None:
    """End a `dags test` and everything in its session."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Airflow + the data tree + a registry holding a weak Rossmann champion (v1)."""
    try:
        venv, build = airflow_venv()
    except AirflowUnavailable as exc:
        if airflow_required():
            pytest.fail(f"{exc} (CI=1 / TABREC_REQUIRE_AIRFLOW=1 is set, so this is not skipped)", pytrace=False)
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("airflow_dag")
    world = make_world(root)
    train_weak_champion(world)
    af = Airflow(venv, root / "airflow_home")
    started = time.perf_counter()
    migrated = af.cli("db", "migrate")
    assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-2000:]
    settings = {"tabrec": {
        "bin": str(tabrec_bin()), "data": str(world["data"]), "out": str(world["out"]),
        "mlflow_tracking_uri": world["tracking_uri"], "train_rossmann_args": TRAIN_ROSSMANN_ARGS,
        "train_ratings_args": TRAIN_RATINGS_ARGS, "score_args": SCORE_ARGS}}
    (root / "tabrec-variables.json").write_text(json.dumps(settings, indent=2))
    imported = af.cli("variables", "import", str(root / "tabrec-variables.json"))
    assert imported.returncode == 0, imported.stdout[-2000:] + imported.stderr[-2000:]
    shown = af.cli("variables", "get", "tabrec")
    assert json.loads(shown.stdout[shown.stdout.index("{"):]) == settings["tabrec"]  # stored as JSON
    return {**world, "af": af, "build": build, "setup_seconds": time.perf_counter() - started}


def _score_out(world: dict, date: str) -> Path:
    return world["out"] / "rossmann" / f"{date}.parquet"


def _recs_out(world: dict, date: str) -> Path:
    return world["out"] / "recommendations" / f"{date}.parquet"


def _ok(run: dict) -> str:
    return f"rc={run['rc']} states={run['states']}\n{run['log'][-4000:]}"


@pytest.mark.slow
def test_the_dag_parses_in_airflow_without_deprecation_warnings(airflow):
    code = (
        "import importlib.util, json, warnings\n"
        "import airflow.sdk, airflow.providers.standard.operators.bash\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    spec = importlib.util.spec_from_file_location('d', {str(DAG_FILE)!r})\n"
        "    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "d = m.dag\n"
        "print(json.dumps({'warnings': [f'{w.category.__name__}: {w.message}' for w in caught],\n"
        "  'tasks': {t.task_id: sorted(t.upstream_task_ids) for t in d.tasks},\n"
        "  'retries': {t.task_id: t.retries for t in d.tasks}, 'timetable': type(d.timetable).__name__}))\n")
    done = subprocess.run([str(airflow["af"].python), "-c", code], env=airflow["af"].env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed["warnings"] == []
    assert parsed["tasks"] == {"train_rossmann": [], "train_ratings": [], "score_rossmann": ["train_rossmann"],
                               "recommend": ["train_ratings"]}
    assert set(parsed["retries"].values()) == {2}
    assert parsed["timetable"] == "CronTriggerTimetable"


@pytest.fixture(scope="module")
def monday(airflow) -> dict:
    run = airflow["af"].dags_test(MONDAY, "monday")
    saved = {p: p.read_bytes() for p in (_score_out(airflow, MONDAY), _recs_out(airflow, MONDAY)) if p.exists()}
    return {**run, "bytes": saved}


@pytest.mark.slow
def test_a_training_day_trains_promotes_then_scores_and_recommends(airflow, monday):
    assert monday["rc"] == 0, _ok(monday)
    assert monday["states"] == {t: ("success", 1) for t in TASKS}, _ok(monday)
    assert monday["run_state"] == "success"
    # The new Rossmann model beat the weak champion: the alias moved from v1 to v2. Ratings had none.
    assert versions(airflow, "rossmann") == ["1", "2"] and champion(airflow, "rossmann") == "2"
    assert versions(airflow, "ratings") == ["1"] and champion(airflow, "ratings") == "1"
    # Scoring ran after the promotion, so it used the new champion.
    out = _score_out(airflow, MONDAY)
    check_scores(out, airflow["day_rows"])
    [run] = batch_runs(airflow, out)
    assert run.info.status == "FINISHED" and run.data.params["model_version"] == "2"
    assert run.data.params["model_uri"] == "models:/rossmann@champion"
    check_recommendations(_recs_out(airflow, MONDAY), airflow["ratings"])
    assert hidden(out.parent) == [] and hidden(_recs_out(airflow, MONDAY).parent) == []
    # BashOperator pushes the last stdout line: the CLI's --json result, for downstream tasks.
    assert f'"rows_out": {len(airflow["day_rows"])}' in monday["log"]


@pytest.mark.slow
def test_rerunning_a_training_day_is_idempotent(airflow, monday):
    assert monday["rc"] == 0, "the first Monday run failed"
    again = airflow["af"].dags_test(MONDAY, "monday-again")
    assert again["rc"] == 0, _ok(again)
    assert again["states"] == {t: ("success", 1) for t in TASKS}, _ok(again)
    # Training ran again on the same data with the same seed: same metrics, so it registered a new
    # version but did not beat the champion, and the alias stayed.
    assert versions(airflow, "rossmann") == ["1", "2", "3"] and champion(airflow, "rossmann") == "2"
    assert versions(airflow, "ratings") == ["1", "2"] and champion(airflow, "ratings") == "1"
    for path, first in monday["bytes"].items():
        assert path.read_bytes() == first, f"{path} differs after the rerun"
    assert len(monday["bytes"]) == 2
    assert [r.data.params["model_version"] for r in batch_runs(airflow, _score_out(airflow, MONDAY))] == ["2", "2"]


@pytest.fixture(scope="module")
def tuesday(airflow, monday) -> dict:
    """Tuesday's run killed while scoring writes, then run again."""
    af, out = airflow["af"], _score_out(airflow, TUESDAY)
    log = af.home / "tuesday-killed.log"
    proc = af.start_dags_test(TUESDAY, log)
    try:
        temp, deadline = None, time.time() + RUN_TIMEOUT
        while temp is None and time.time() < deadline and proc.poll() is None:
            temp = next((p for p in hidden(out.parent) if p.endswith(".tmp")), None)
            time.sleep(0.02)
        assert temp is not None, f"scoring never started writing: {log.read_text()[-3000:]}"
        time.sleep(0.2)
        pid = int(re.match(rf"\.{re.escape(out.name)}\.(\d+)-", temp).group(1))  # the tabrec process
        os.kill(pid, signal.SIGKILL)
        state, deadline = None, time.time() + 120
        while state != "up_for_retry" and time.time() < deadline:
            state = af.states(TUESDAY).get("score_rossmann", (None, 0))[0]
            time.sleep(0.2)
        killed = {"states": af.states(TUESDAY), "output_exists": out.exists(), "hidden": hidden(out.parent),
                  "runs": [r.info.status for r in batch_runs(airflow, out)]}
    finally:
        stop(proc)  # the worker goes away while the task waits for its retry
    killed["log"] = log.read_text()
    rerun = af.dags_test(TUESDAY, "tuesday")
    return {"killed": killed, "rerun": rerun}


@pytest.mark.slow
def test_not_a_training_day_skips_both_trainings_and_still_scores(airflow, tuesday):
    rerun = tuesday["rerun"]
    assert rerun["rc"] == 0, _ok(rerun)
    states = {task: state for task, (state, _) in rerun["states"].items()}
    assert states == {"train_rossmann": "skipped", "train_ratings": "skipped", "score_rossmann": "success",
                      "recommend": "success"}, _ok(rerun)
    assert f"{TUESDAY} is not a training day" in rerun["log"]
    assert "nothing trained" in rerun["log"]
    # Nothing was trained: the registry is as Monday's rerun left it.
    assert versions(airflow, "rossmann") == ["1", "2", "3"] and champion(airflow, "rossmann") == "2"
    assert versions(airflow, "ratings") == ["1", "2"]
    check_recommendations(_recs_out(airflow, TUESDAY), airflow["ratings"])


@pytest.mark.slow
def test_a_scoring_task_killed_mid_write_is_retried_and_its_rerun_writes_identical_output(airflow, monday, tuesday):
    killed, rerun = tuesday["killed"], tuesday["rerun"]
    out = _score_out(airflow, TUESDAY)
    # The kill (exit -9, not 2) is a retryable failure: Airflow queued a retry instead of failing.
    assert killed["states"]["score_rossmann"] == ("up_for_retry", 1), killed["log"][-4000:]
    assert killed["states"]["train_rossmann"] == ("skipped", 1)
    # Killed mid-write: only hidden junk beside the output, never a partial file under its name,
    # and the batch run was left RUNNING.
    assert not killed["output_exists"]
    assert any(h.endswith(".tmp") for h in killed["hidden"]), killed["hidden"]
    assert killed["runs"] == ["RUNNING"]
    # The rerun removed the junk, marked the dead run KILLED, and wrote the same scores as Monday:
    # the same rows scored by the same champion (v2).
    assert rerun["rc"] == 0 and rerun["states"]["score_rossmann"][0] == "success", _ok(rerun)
    assert hidden(out.parent) == []
    runs = batch_runs(airflow, out)
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert {r.data.params["model_version"] for r in runs} == {"2"}
    assert pq.read_table(out).equals(pq.read_table(_score_out(airflow, MONDAY)))
    assert out.read_bytes() == monday["bytes"][_score_out(airflow, MONDAY)]


@pytest.mark.slow
def test_bad_input_fails_the_scoring_task_at_once_without_retries(airflow, monday):
    started = time.perf_counter()
    run = airflow["af"].dags_test(WEDNESDAY, "wednesday")
    # Had the exit code 2 been retried, the run would wait 10 minutes for it (RUN_TIMEOUT catches that).
    assert run["states"]["score_rossmann"] == ("failed", 1), _ok(run)
    assert run["states"]["recommend"] == ("success", 1)
    assert run["states"]["train_rossmann"] == ("skipped", 1)
    assert run["run_state"] == "failed"
    assert time.perf_counter() - started < RUN_TIMEOUT
    bad = airflow["data"] / "rossmann" / "incoming" / WEDNESDAY / "part-0.csv"
    assert re.search(rf"{re.escape(str(bad))} line {BAD_LINE} field 'StateHoliday'", run["log"]), _ok(run)
    assert "not retried" in run["log"]
    out = _score_out(airflow, WEDNESDAY)
    assert not out.exists() and hidden(out.parent) == []
    assert [r.info.status for r in batch_runs(airflow, out)] == ["FAILED"]
    check_recommendations(_recs_out(airflow, WEDNESDAY), airflow["ratings"])
    # The documented way to run it again once the drop is fixed: clear the failed task (the
    # scheduler then reruns it); the task that succeeded is left alone.
    cleared = airflow["af"].cli("tasks", "clear", DAG_ID, "-t", "score_rossmann", "-s", WEDNESDAY,
                                "-e", f"{WEDNESDAY}T23:59:59", "-y")
    assert cleared.returncode == 0, cleared.stdout[-2000:] + cleared.stderr[-2000:]
    after = airflow["af"].states(WEDNESDAY)
    assert after["score_rossmann"][0] is None and after["recommend"] == ("success", 1)
