"""Batch scoring (`tabrec score`) reads dates as strictly as HTTP does: an ISO Date column, or
one CSV/Parquet types as timestamps, scores; a numeric Date column is a bad input (exit 2)
naming the file, the line and the field, never a day in 1970."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

REAL_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "rossmann" / "test.csv"


def score(bundle: str, src: Path, out: Path, store: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["tracking_uri"], "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "pipelines.cli", "score", "--model", bundle, "--input", str(src), "--output",
           str(out), "--no-track", "--quiet", "--drift-rows", "0"]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_a_numeric_date_column_is_exit_2_naming_file_line_and_field(bundles, model_store, tmp_path):
    rows = pd.read_csv(model_store["rossmann_data"]["test.csv"], nrows=5)
    numeric = rows.assign(Date=pd.to_datetime(rows["Date"]).dt.strftime("%Y%m%d").astype("int64"))
    src = tmp_path / "numeric_dates.csv"
    numeric.to_csv(src, index=False)
    out = score(bundles["rossmann"], src, tmp_path / "out.parquet", model_store, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert str(src) in out.stderr and "line 2" in out.stderr and "'Date'" in out.stderr
    assert "ISO 8601" in out.stderr and not (tmp_path / "out.parquet").exists()
    slashes = rows.assign(Date=pd.to_datetime(rows["Date"]).dt.strftime("%d/%m/%Y"))
    src2 = tmp_path / "slash_dates.csv"
    slashes.to_csv(src2, index=False)
    out = score(bundles["rossmann"], src2, tmp_path / "out2.parquet", model_store, tmp_path)
    assert out.returncode == 2 and "line 2" in out.stderr and "'Date'" in out.stderr, out.stderr[-2000:]


def test_iso_and_typed_date_columns_score_alike(bundles, model_store, tmp_path):
    rows = pd.read_csv(model_store["rossmann_data"]["test.csv"], nrows=50)
    rows.to_csv(tmp_path / "iso.csv", index=False)
    rows.assign(Date=pd.to_datetime(rows["Date"])).to_parquet(tmp_path / "typed.parquet", index=False)
    got = []
    for name in ("iso.csv", "typed.parquet"):
        out = score(bundles["rossmann"], tmp_path / name, tmp_path / f"{name}.out.parquet", model_store, tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        got.append(pq.read_table(tmp_path / f"{name}.out.parquet").to_pandas()["prediction"])
    pd.testing.assert_series_equal(got[0], got[1])


@pytest.mark.skipif(not REAL_TEST.exists(), reason="the shared Rossmann data is not on this machine")
def test_the_real_kaggle_test_csv_still_scores(bundles, model_store, tmp_path):
    """41k rows with NaN in the optional Open column, dates as ISO strings."""
    out = score(bundles["rossmann"], REAL_TEST, tmp_path / "real.parquet", model_store, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = pq.read_table(tmp_path / "real.parquet").to_pandas()
    assert len(got) == len(pd.read_csv(REAL_TEST, usecols=["Id"])) and got["prediction"].notna().all()
