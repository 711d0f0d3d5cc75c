"""Shared by the scheduler tests (test_airflow_dag.py, test_cron.py): the data layout the schedules
read (pipelines/schedules/README.md), built from the synthetic generators, and the checks that a
day's outputs are complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from mlflow import MlflowClient

from pipelines.synth import write_ratings, write_rossmann

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = REPO / "pipelines" / "schedules"
MONDAY, TUESDAY, WEDNESDAY = "2026-01-05", "2026-01-06", "2026-01-07"
# Flags the schedules pass through their *_args settings: small, fast models; buckets of 2,000
# rows so that scoring spills and writes for long enough to be killed mid-run.
# a short step budget (not `--epochs 1`: a few dozen steps on ~900 rows leave the network untrained,
# worse than the weak champion it must beat)
TRAIN_ROSSMANN_ARGS = "--steps 300 --lr 3e-3 --valid-days 14"
TRAIN_RATINGS_ARGS = "--epochs 2"
SCORE_ARGS = "--batch-rows 2000"
BAD_LINE = 9  # the CSV line (header = 1) of the bad value in the bad day's input


def tabrec_bin() -> Path:
    """The project's `tabrec` console script, beside the interpreter running the tests."""
    path = Path(sys.executable).parent / "tabrec"
    assert path.exists(), f"no tabrec console script at {path}: install the project (make install)"
    return path


def make_world(root: Path) -> dict:
    """Inputs under root/data in the documented layout, an empty root/out and a sqlite MLflow URI.

    Monday and Tuesday get the same day's rows (so their scores must match); Wednesday's drop has
    one bad value."""
    data, out = root / "data", root / "out"
    syn = write_rossmann(root / "synth" / "rossmann", stores=8, days=120, seed=0)
    rat = write_ratings(root / "synth" / "ratings", users=100, items=150, ratings=3000, seed=0)
    ross = data / "rossmann"
    ross.mkdir(parents=True)
    for name in ("train.csv", "store.csv"):
        (ross / name).write_bytes(Path(syn[name]).read_bytes())
    day = future_rows(pd.read_csv(syn["test.csv"]), copies=40)
    for date in (MONDAY, TUESDAY):
        (ross / "incoming" / date).mkdir(parents=True)
        day.to_parquet(ross / "incoming" / date / "part-0.parquet", index=False)
    bad = pd.read_csv(syn["test.csv"], dtype=str)
    bad.loc[BAD_LINE - 2, "StateHoliday"] = "zz"
    (ross / "incoming" / WEDNESDAY).mkdir(parents=True)
    bad.to_csv(ross / "incoming" / WEDNESDAY / "part-0.csv", index=False)
    ratings = pd.read_csv(rat["u.data"], sep="\t", names=["user", "item", "rating", "timestamp"])
    (data / "ratings").mkdir()
    ratings.to_csv(data / "ratings" / "ratings.csv", index=False)
    out.mkdir()
    return {"root": root, "data": data, "out": out, "day_rows": day, "ratings": ratings,
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}


def future_rows(test: pd.DataFrame, copies: int) -> pd.DataFrame:
    """test.csv repeated with dates shifted forward: a longer, realistic day's drop."""
    days = pd.to_datetime(test["Date"])
    span = (days.max() - days.min()).days + 1
    parts = []
    for c in range(copies):
        part = test.copy()
        d = days + pd.Timedelta(days=span * c)
        part["Date"] = d.dt.strftime("%Y-%m-%d")
        part["DayOfWeek"] = d.dt.dayofweek + 1
        part["Id"] = test["Id"] + c * len(test)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def train_weak_champion(world: dict) -> None:
    """Register a weak Rossmann model as champion v1, for the schedule's training to beat.

    On this small synthetic set a barely trained network is about as good as a short real
    training, so the weak one is made weak by its data: sales tripled in its validation window (a
    level shift it cannot know about) give it a validation RMSPE near 0.67."""
    ross = world["data"] / "rossmann"
    train = pd.read_csv(ross / "train.csv", dtype={"StateHoliday": str})
    last = pd.to_datetime(train["Date"]) > pd.to_datetime(train["Date"]).max() - pd.Timedelta(days=14)
    train.loc[last, ["Sales", "Customers"]] *= 3
    weak = world["root"] / "synth" / "weak-train.csv"
    train.to_csv(weak, index=False)
    cmd = [str(tabrec_bin()), "train", "rossmann", "--train", str(weak), "--store", str(ross / "store.csv"),
           "--epochs", "1", "--lr", "1e-3", "--layers", "8,8", "--valid-days", "14", "--register", "rossmann",
           "--json", "--quiet"]
    done = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": world["tracking_uri"]},
                          cwd=world["root"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert champion(world, "rossmann") == "1"
    assert json.loads(done.stdout.strip().splitlines()[-1])["metrics"]["valid_rmspe"] > 0.5


def client(world: dict) -> MlflowClient:
    return MlflowClient(tracking_uri=world["tracking_uri"], registry_uri=world["tracking_uri"])


def champion(world: dict, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(world).get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def versions(world: dict, name: str) -> list[str]:
    return sorted((str(v.version) for v in client(world).search_model_versions(f"name = '{name}'")), key=int)


def batch_runs(world: dict, output: Path) -> list:
    """The MLflow batch runs that wrote `output`, oldest first."""
    c = client(world)
    exp = c.get_experiment_by_name("batch")
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], f"tags.`tabrec.output` = '{output}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def check_scores(path: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The day's scores are complete: one finite, non-negative prediction per input Id, 0 when closed."""
    scored = pq.read_table(path).to_pandas()
    assert list(scored.columns) == ["Id", "prediction"]
    assert len(scored) == len(rows) and scored["Id"].is_unique
    assert set(scored["Id"]) == set(rows["Id"])
    pred = scored.set_index("Id")["prediction"]
    assert np.isfinite(pred).all() and (pred >= 0).all()
    closed = rows.loc[rows["Open"] == 0, "Id"]
    assert len(closed) > 0 and (pred.loc[closed] == 0).all()
    assert (pred.drop(closed) > 0).all()
    return scored


def check_recommendations(path: Path, ratings: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Top-k for every known user: ranks 1..k with non-increasing scores and distinct, known items.

    (Which rated items are left out is the batch job's business, tested in test_score.py: the
    bundle excludes the items of the training split, so a user's validation items may appear.)"""
    recs = pq.read_table(path).to_pandas()
    users = set(ratings["user"].astype(str))
    assert set(recs["user"]) == users and len(recs) == k * len(users)
    assert not recs["cold_start"].any() and set(recs["item"]) <= set(ratings["item"].astype(str))
    ordered = recs.sort_values(["user", "rank"], kind="stable")
    for _, group in ordered.groupby("user"):
        assert list(group["rank"]) == list(range(1, k + 1)) and group["item"].is_unique
        assert (group["score"].diff().dropna() <= 0).all()
    return recs
