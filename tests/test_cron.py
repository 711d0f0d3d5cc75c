"""The shipped crontab (pipelines/schedules/cron.example), its job lines run as cron runs them.

A job line is taken apart like cron does (five time fields, then the command; `\\%` is a literal
`%`, a bare `%` would end the command) and run with `SHELL` from the file, the crontab's settings
(pointed at temp dirs) and cron's bare environment (PATH=/usr/bin:/bin, HOME). The day comes from
TABREC_DATE (the documented rerun/backfill) or from a fake clock: a `date` on PATH that answers
`date +%F` with the day under test. The slow tests run the real `tabrec` console script against a
real `mlflow server` on localhost (the remote tracking server of the crontab's settings, with
proxied artifacts); the fast ones check the file itself.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
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
    versions,
)

CRONTAB = SCHEDULES / "cron.example"
JOBS = ("train-rossmann", "train-ratings", "score-rossmann", "recommend")  # in schedule order
FIELD = re.compile(r"^(\*|\d+(-\d+)?(,\d+(-\d+)?)*)(/\d+)?$")


def parse_crontab(text: str) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """({setting: value}, {job: (schedule, command as cron hands it to SHELL)}).

    Jobs are named by the log they append to (`.../train-rossmann.log` -> `train-rossmann`)."""
    settings, jobs = {}, {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        env = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)
        if env and not line[0].isdigit() and not line.startswith("*"):
            settings[env.group(1)] = env.group(2)
            continue
        parts = line.split(None, 5)
        assert len(parts) == 6 and all(FIELD.match(f) for f in parts[:5]), f"not a cron job line: {line}"
        body = parts[5]
        assert re.search(r"(?<!\\)%", body) is None, f"bare % in a job line (cron would cut it there): {line}"
        log = re.search(r'>> "\$TABREC_LOG/([a-z-]+)\.log"', body)
        assert log, f"job does not append to a log under $TABREC_LOG: {line}"
        jobs[log.group(1)] = (" ".join(parts[:5]), body.replace("\\%", "%"))
    return settings, jobs


def _dag_module():
    spec = importlib.util.spec_from_file_location("tabrec_airflow_dag", SCHEDULES / "airflow_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crontab_settings_jobs_and_the_dag_agree():
    settings, jobs = parse_crontab(CRONTAB.read_text())
    assert settings["SHELL"] == "/bin/bash"
    # One settings block; the DAG's task environment has the same names (from its Variable).
    dag = _dag_module()
    for name in dag.ENV:
        if name != "TABREC_DATE":
            assert name in settings, f"{name} missing from the crontab's settings"
    assert {"TABREC_LOG", "MAILTO"} <= set(settings)
    assert set(jobs) == set(JOBS)
    assert [jobs[j][0] for j in JOBS] == ["0 2 * * *", "0 3 * * *", "0 5 * * *", "30 5 * * *"]
    # Each job runs exactly the DAG task's tabrec command, on the same date variable.
    for job, task in zip(JOBS, ("train_rossmann", "train_ratings", "score_rossmann", "recommend"), strict=True):
        command = jobs[job][1]
        assert command.startswith("TABREC_DATE=${TABREC_DATE:-$(date +%F)}; ")
        assert dag.COMMANDS[task] in command, job
    for job in JOBS[:2]:
        assert dag.WEEKDAY in jobs[job][1] and dag.NOT_A_TRAINING_DAY in jobs[job][1]


@pytest.mark.parametrize(("date", "weekday", "rc", "logged", "mailed"), [
    (MONDAY, "1", 0, "train rossmann --train", ""),
    (TUESDAY, "1", 0, f"tabrec: {TUESDAY} is not a training day (train_weekday=1): nothing trained", ""),
    (TUESDAY, "2", 0, "train rossmann --train", ""),
    (MONDAY, "Monday", 2, "want 1-7", f"tabrec train rossmann for {MONDAY} failed (exit 2)"),
    ("2026-13-45", "1", 2, "cannot tell if 2026-13-45 is a training day", "failed (exit 2)"),
])
def test_training_day_guard(tmp_path, date, weekday, rc, logged, mailed):
    """The guard alone (`echo` stands in for tabrec): not a training day is exit 0 with a note,
    a bad date or weekday setting is a mailed exit 2, never a silent skip."""
    settings, jobs = parse_crontab(CRONTAB.read_text())
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **settings, "TABREC_BIN": "/bin/echo",
           "TABREC_LOG": str(tmp_path), "TABREC_DATE": date, "TABREC_TRAIN_WEEKDAY": weekday}
    done = subprocess.run(["/bin/bash", "-c", jobs["train-rossmann"][1]], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == rc and mailed in done.stdout and (done.stdout == "") == (mailed == "")
    assert logged in (tmp_path / "train-rossmann.log").read_text()


def test_a_bare_percent_is_caught():
    with pytest.raises(AssertionError, match="bare %"):
        parse_crontab('0 5 * * *  echo $(date +%F) >> "$TABREC_LOG/x.log"')


# ---------------------------------------------------------------------------- running the jobs


class Cron:
    """Runs the crontab's jobs in cron's environment with the settings pointed at a temp world."""

    def __init__(self, world: dict):
        self.world = world
        self.settings, self.jobs = parse_crontab(CRONTAB.read_text())
        root = world["root"]
        self.log_dir = root / "log"
        self.log_dir.mkdir()
        self.fake_bin = root / "fakeclock"
        self.fake_bin.mkdir()
        real_date = shutil.which("date", path="/usr/bin:/bin")
        fake = self.fake_bin / "date"
        # The fake clock: `date` without -d/--date reads the day under test; with one, the real date.
        fake.write_text("#!/bin/sh\n"
                        'for a in "$@"; do case "$a" in -d|--date|--date=*) exec ' + real_date + ' "$@";; esac; done\n'
                        f'exec {real_date} -d "$FAKE_TODAY 05:00" "$@"\n')
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
        overrides = {"TABREC_BIN": str(tabrec_bin()), "TABREC_DATA": str(world["data"]),
                     "TABREC_OUT": str(world["out"]), "TABREC_LOG": str(self.log_dir),
                     "MLFLOW_TRACKING_URI": world["tracking_uri"],
                     "TABREC_TRAIN_ROSSMANN_ARGS": TRAIN_ROSSMANN_ARGS,
                     "TABREC_TRAIN_RATINGS_ARGS": TRAIN_RATINGS_ARGS, "TABREC_SCORE_ARGS": SCORE_ARGS}
        assert set(overrides) <= set(self.settings)
        # cron's own environment: HOME, LOGNAME, PATH=/usr/bin:/bin, SHELL; then the crontab's lines.
        self.env = {"HOME": str(root), "LOGNAME": os.environ.get("LOGNAME", "tabrec"), "PATH": "/usr/bin:/bin",
                    **self.settings, **overrides}
        if os.environ.get("PYTHONPATH"):  # a development checkout whose tabrec script imports another tree
            self.env["PYTHONPATH"] = os.environ["PYTHONPATH"]

    def run(self, job: str, *, date: str | None = None, today: str | None = None) -> subprocess.CompletedProcess:
        """One job as cron would start it: on `date` (TABREC_DATE) or on the fake clock's `today`."""
        env = dict(self.env)
        if date is not None:
            env["TABREC_DATE"] = date
        if today is not None:
            env["FAKE_TODAY"] = today
            env["PATH"] = f"{self.fake_bin}:{env['PATH']}"
        return subprocess.run([self.settings["SHELL"], "-c", self.jobs[job][1]], env=env, cwd=self.world["root"],
                              capture_output=True, text=True, timeout=900)

    def log(self, job: str) -> str:
        path = self.log_dir / f"{job}.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free local port: the remote
    tracking server the crontab's MLFLOW_TRACKING_URI names, as in production."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # a fresh store runs all of MLflow's migrations first
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def cron(tmp_path_factory: pytest.TempPathFactory, tracking_server: str) -> Cron:
    world = make_world(tmp_path_factory.mktemp("cron"))
    return Cron({**world, "tracking_uri": tracking_server})


def _out(cron: Cron, kind: str, date: str) -> Path:
    return cron.world["out"] / kind / f"{date}.parquet"


@pytest.fixture(scope="module")
def monday(cron: Cron) -> dict:
    return {job: cron.run(job, date=MONDAY) for job in JOBS}


@pytest.mark.slow
def test_a_training_day_trains_promotes_scores_and_recommends(cron, monday):
    world = cron.world
    for job in JOBS:
        done = monday[job]
        assert done.returncode == 0, f"{job}: {done.stdout}\n{cron.log(job)[-3000:]}"
        assert done.stdout == "" and done.stderr == ""  # nothing for cron to mail
    assert versions(world, "rossmann") == ["1"] and champion(world, "rossmann") == "1"
    assert versions(world, "ratings") == ["1"] and champion(world, "ratings") == "1"
    assert '"registered": {"name": "rossmann", "version": "1", "alias": "champion"' in cron.log("train-rossmann")
    out = _out(cron, "rossmann", MONDAY)
    check_scores(out, world["day_rows"])
    assert [r.data.params["model_version"] for r in batch_runs(world, out)] == ["1"]
    check_recommendations(_out(cron, "recommendations", MONDAY), world["ratings"])


@pytest.mark.slow
def test_not_a_training_day_on_the_clock_trains_nothing_and_scores(cron, monday):
    world = cron.world
    for job in JOBS[:2]:
        done = cron.run(job, today=TUESDAY)
        assert done.returncode == 0 and done.stdout == "", f"{job}: {done.stdout}"
        assert f"tabrec: {TUESDAY} is not a training day (train_weekday=1): nothing trained" in cron.log(job)
    assert versions(world, "rossmann") == ["1"] and versions(world, "ratings") == ["1"]
    done = cron.run("score-rossmann", today=TUESDAY)
    assert done.returncode == 0, f"{done.stdout}\n{cron.log('score-rossmann')[-3000:]}"
    # Tuesday's drop holds Monday's rows: the same champion gives the same scores.
    tuesday = _out(cron, "rossmann", TUESDAY)
    assert pq.read_table(tuesday).equals(pq.read_table(_out(cron, "rossmann", MONDAY)))


@pytest.mark.slow
def test_rerunning_a_day_by_hand_rewrites_identical_output(cron, monday):
    out = _out(cron, "rossmann", MONDAY)
    first = out.read_bytes()
    done = cron.run("score-rossmann", date=MONDAY)
    assert done.returncode == 0, done.stdout
    assert out.read_bytes() == first and hidden(out.parent) == []
    assert [r.info.status for r in batch_runs(cron.world, out)] == ["FINISHED", "FINISHED"]


@pytest.mark.slow
def test_bad_input_exits_2_mails_one_line_and_writes_nothing(cron, monday):
    done = cron.run("score-rossmann", date=WEDNESDAY)
    assert done.returncode == 2
    log = cron.log_dir / "score-rossmann.log"
    assert done.stdout == f"tabrec score for {WEDNESDAY} failed (exit 2): see {log}\n"
    bad = cron.world["data"] / "rossmann" / "incoming" / WEDNESDAY / "part-0.csv"
    assert f"{bad} line {BAD_LINE} field 'StateHoliday'" in cron.log("score-rossmann")
    out = _out(cron, "rossmann", WEDNESDAY)
    assert not out.exists() and hidden(out.parent) == []
    assert [r.info.status for r in batch_runs(cron.world, out)] == ["FAILED"]


@pytest.mark.slow
def test_a_missing_log_folder_is_a_mailed_failure_not_a_silent_one(cron):
    env_log = cron.env["TABREC_LOG"]
    cron.env["TABREC_LOG"] = str(cron.world["root"] / "no-such-dir")
    try:
        done = cron.run("recommend", date=TUESDAY)
    finally:
        cron.env["TABREC_LOG"] = env_log
    assert done.returncode != 0 and "tabrec recommend for 2026-01-06 failed" in done.stdout
