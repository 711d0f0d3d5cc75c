"""Batch jobs (pipelines.batch): scoring, recommendations, atomic output, locking, drift and faults."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modeling.errors import DataError
from modeling.predictors import load_predictor
from pipelines.batch import (
    DriftError,
    OutputError,
    OutputLockedError,
    output_lock,
    recommend_file,
    score_file,
)
from pipelines.tracking import TrackingUnavailableError

ROSS = "models:/rossmann@champion"
RATINGS = "models:/ratings@champion"


@pytest.fixture
def store(use_model_store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)
    return use_model_store


def _test_csv(store: dict) -> Path:
    return Path(store["rossmann_data"]["test.csv"])


def _runs(output: Path) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name("batch")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`tabrec.output` = '{output.absolute()}'")


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _assert_failed_cleanly(out: Path) -> None:
    """No output, no temp files, and no run left RUNNING."""
    assert not out.exists()
    assert _hidden(out.parent) == []
    assert all(r.info.status != "RUNNING" for r in _runs(out))


# ---------------------------------------------------------------------------- scoring


def test_score_test_csv_is_a_kaggle_submission_and_a_tracked_run(store, tmp_path):
    out, sub = tmp_path / "pred.parquet", tmp_path / "submission.csv"
    res = score_file(ROSS, _test_csv(store), out, quiet=True, submission_csv=sub)

    test = pd.read_csv(_test_csv(store))
    got = pq.read_table(out).to_pandas()
    assert list(got.columns) == ["Id", "prediction"]
    assert got["Id"].tolist() == test["Id"].tolist()
    expected = load_predictor(ROSS).predict(test)  # the same rows through the in-memory path
    np.testing.assert_allclose(got["prediction"].to_numpy(), expected, rtol=1e-6)
    assert (got["prediction"][test["Open"] == 0] == 0).all() and (got["prediction"][test["Open"] == 1] > 0).all()

    lines = sub.read_text().splitlines()
    assert lines[0] == "Id,Sales"
    kaggle = pd.read_csv(sub)
    assert len(kaggle) == len(test) and kaggle["Id"].is_unique and set(kaggle["Id"]) == set(test["Id"])
    np.testing.assert_allclose(kaggle["Sales"].to_numpy(), got["prediction"].to_numpy(), rtol=1e-9)

    assert res["rows_in"] == res["rows_out"] == len(test) and res["chunk_mode"] == "whole"
    run = MlflowClient().get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model_name"] == "rossmann" and run.data.params["model_version"] == "1"
    assert run.data.params["input"] == str(_test_csv(store))
    assert run.data.metrics["rows_out"] == len(test) and run.data.metrics["rows_per_second"] > 0
    assert _visible(tmp_path) == ["pred.parquet", "pred.parquet.lock", "submission.csv"]


def test_small_chunks_match_one_pass(store, bundles, tmp_path):
    """Rows stream in chunks of `batch_rows`, cut anywhere (stores split across chunks): the event
    features read the bundle's calendar, so every chunking gives the one-pass predictions."""
    test = pd.read_csv(_test_csv(store))
    one = score_file(bundles["rossmann"], _test_csv(store), tmp_path / "one.parquet", quiet=True, track=False)
    many = score_file(bundles["rossmann"], _test_csv(store), tmp_path / "many.parquet", quiet=True,
                      track=False, batch_rows=100)
    assert one["chunks"] == 1 and many["chunk_mode"] == "stream" and many["chunks"] > 3
    a = pq.read_table(tmp_path / "one.parquet").to_pandas().set_index("Id")["prediction"]
    b = pq.read_table(tmp_path / "many.parquet").to_pandas().set_index("Id")["prediction"]
    assert len(b) == len(test) and b.index.is_unique
    # float32 matmuls block differently for other batch sizes: ~1e-7 in log sales, so 1e-5 here
    np.testing.assert_allclose(b.loc[a.index].to_numpy(), a.to_numpy(), rtol=1e-5)
    # cutting rows blindly (not by store) no longer changes the event features (it did before the
    # event calendar, when they were read from the batch's rows)
    pred = load_predictor(bundles["rossmann"])
    naive = np.concatenate([pred.predict(test.iloc[i : i + 100]) for i in range(0, len(test), 100)])
    np.testing.assert_allclose(naive, a.loc[test["Id"]].to_numpy(), rtol=1e-5)


def test_directory_of_parquet_parts_scores_like_the_single_file(store, bundles, tmp_path):
    test = pd.read_csv(_test_csv(store))
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, start in enumerate(range(0, len(test), 250)):
        test.iloc[start : start + 250].to_parquet(parts / f"part-{i}.parquet", index=False)
    (parts / "_SUCCESS").write_text("")
    out = tmp_path / "out" / "pred.parquet"  # output folder is created
    score_file(bundles["rossmann"], parts, out, quiet=True, track=False)
    single = tmp_path / "single.parquet"
    score_file(bundles["rossmann"], _test_csv(store), single, quiet=True, track=False)
    assert pq.read_table(out).equals(pq.read_table(single))


def test_without_id_the_keys_are_store_and_date(store, bundles, tmp_path):
    src = tmp_path / "noid.csv"
    pd.read_csv(_test_csv(store)).drop(columns=["Id"]).to_csv(src, index=False)
    score_file(bundles["rossmann"], src, tmp_path / "pred.parquet", quiet=True, track=False)
    got = pq.read_table(tmp_path / "pred.parquet")
    assert got.column_names == ["Store", "Date", "prediction"]
    with pytest.raises(DataError, match="Id"):
        score_file(bundles["rossmann"], src, tmp_path / "p2.parquet", quiet=True, track=False,
                   submission_csv=tmp_path / "sub.csv")


def test_score_ratings_pairs(store, bundles, tmp_path):
    pairs = pd.read_csv(store["ratings_data"]["u.data"], sep="\t", names=["user", "item", "rating", "ts"])
    pairs = pairs.head(700)
    pairs.loc[0, "user"] = 10**9  # unknown user: scored with the unknown embedding, not an error
    pairs.to_parquet(tmp_path / "pairs.parquet", index=False)
    res = score_file(bundles["ratings"], tmp_path / "pairs.parquet", tmp_path / "out.parquet", quiet=True,
                     track=False, batch_rows=256)
    got = pq.read_table(tmp_path / "out.parquet").to_pandas()
    assert list(got.columns) == ["user", "item", "prediction"] and res["chunks"] == 3
    assert got["user"].tolist() == pairs["user"].tolist()
    np.testing.assert_allclose(got["prediction"], load_predictor(bundles["ratings"]).predict(pairs), rtol=1e-5)
    assert res["drift"]["checked"] is False


def test_invalid_value_is_reported_with_file_and_line(store, bundles, tmp_path):
    test = pd.read_csv(_test_csv(store))
    test["StateHoliday"] = test["StateHoliday"].astype(str)
    test.loc[7, "StateHoliday"] = "zz"
    src = tmp_path / "bad.csv"
    test.to_csv(src, index=False)
    out = tmp_path / "o" / "pred.parquet"
    with pytest.raises(DataError, match=r"bad\.csv line 9 field 'StateHoliday'"):
        score_file(bundles["rossmann"], src, out, quiet=True)
    _assert_failed_cleanly(out)
    assert [r.info.status for r in _runs(out)] == ["FAILED"]


# ---------------------------------------------------------------------------- recommendations


def test_recommend_listed_users_matches_predictor(store, bundles, tmp_path):
    pred = load_predictor(bundles["ratings"])
    known = [str(u) for u in pred.users[:3]]
    users = tmp_path / "users.csv"
    pd.DataFrame({"user": [known[0], "no-such-user", known[1], known[0], known[2]]}).to_csv(users, index=False)
    res = recommend_file(bundles["ratings"], tmp_path / "rec.parquet", users=users, k=7, quiet=True,
                         batch_rows=14)  # 2 users per chunk
    got = pq.read_table(tmp_path / "rec.parquet").to_pandas()
    assert list(got.columns) == ["user", "rank", "item", "score", "cold_start"]
    assert res["users"] == 4 and res["cold_start_users"] == 1
    expected = pred.recommend([known[0], "no-such-user", known[1], known[2]], k=7)
    for answer in expected:
        rows = got[got["user"] == answer["user"]].sort_values("rank")
        assert rows["rank"].tolist() == list(range(1, len(answer["items"]) + 1))
        assert rows["item"].tolist() == [i["item"] for i in answer["items"]]
        np.testing.assert_allclose(rows["score"], [i["score"] for i in answer["items"]], rtol=1e-6)
        assert rows["cold_start"].eq(answer["cold_start"]).all()


def test_recommend_all_users_excludes_seen_items(store, bundles, tmp_path):
    pred = load_predictor(bundles["ratings"])
    res = recommend_file(bundles["ratings"], tmp_path / "all.parquet", k=10, quiet=True, track=False,
                         batch_rows=500)
    got = pq.read_table(tmp_path / "all.parquet").to_pandas()
    assert res["users"] == len(pred.users) and got["user"].nunique() == len(pred.users)
    assert not got["cold_start"].any() and got.groupby("user").size().max() == 10
    uidx = pred.user_index(got["user"])
    iidx = pred.item_index(got["item"])
    seen = {(int(u), int(i)) for u in range(1, len(pred.users) + 1)
            for i in pred.seen_indices[pred.seen_indptr[u] : pred.seen_indptr[u + 1]]}
    assert len(seen) > 1000
    assert not any((int(u), int(i)) in seen for u, i in zip(uidx, iidx, strict=True))
    # scores descend within each user
    assert (got.groupby("user")["score"].diff().dropna() <= 1e-6).all()


def test_recommend_rejects_a_tabular_model(store, bundles, tmp_path):
    with pytest.raises(DataError, match="ratings model"):
        recommend_file(bundles["rossmann"], tmp_path / "rec.parquet", quiet=True, track=False)
    assert not (tmp_path / "rec.parquet").exists()


# ---------------------------------------------------------------------------- drift


def test_future_batch_from_the_same_generator_does_not_alarm(store, bundles, tmp_path, caplog):
    """test.csv holds the 48 days after training: the event-window and calendar columns differ there
    by construction (Before* caps at the batch end), so they are left out and the AUC stays low."""
    out = tmp_path / "pred.parquet"
    with caplog.at_level("INFO", logger="tabrec.score"):
        res = score_file(bundles["rossmann"], _test_csv(store), out, quiet=True, fail_on_drift=True,
                         max_drift_auc=0.8)
    drift = res["drift"]
    assert drift["checked"] and drift["auc"] < 0.7 and not drift["exceeded"]
    assert {"BeforeSchoolHoliday", "BeforeStateHoliday", "BeforePromo", "AfterSchoolHoliday", "SchoolHoliday_fw",
            "Promo_fw", "StateHoliday_bw", "AfterPromo", "Promo_bw", "Year", "Week", "Day",
            "CompetitionMonthsOpen", "Promo2Weeks", "Promo2Active"} <= set(drift["excluded_columns"])
    assert {"Store", "Dayofweek", "Promo", "SchoolHoliday", "StateHoliday", "StoreType",
            "CompetitionDistance"} <= set(drift["compared_columns"])
    assert not set(drift["compared_columns"]) & set(drift["excluded_columns"])
    assert "comparing" in caplog.text and "separating batch from training" in caplog.text
    # the first six weeks alone, as Parquet
    six = tmp_path / "six_weeks.parquet"
    test = pd.read_csv(_test_csv(store))
    days = pd.to_datetime(test["Date"])
    test[days < days.min() + pd.Timedelta(days=42)].to_parquet(six, index=False)
    res = score_file(bundles["rossmann"], six, tmp_path / "six.out.parquet", quiet=True, fail_on_drift=True,
                     track=False)
    assert res["drift"]["checked"] and res["drift"]["auc"] < 0.7
    # rows from the training period look like the training sample
    res = score_file(bundles["rossmann"], store["rossmann_data"]["train.csv"], out, quiet=True,
                     fail_on_drift=True, max_drift_auc=0.8, batch_rows=1000)
    assert res["drift"]["checked"] and res["drift"]["auc"] < 0.7 and res["chunk_mode"] == "stream"
    run = MlflowClient().get_run(res["run_id"])
    assert run.data.metrics["drift_auc"] == pytest.approx(res["drift"]["auc"])


@pytest.mark.parametrize("shift", ["school_holiday_flipped", "new_store_ids"])
def test_drift_fails_before_writing_on_a_real_shift(store, bundles, tmp_path, shift):
    test = pd.read_csv(_test_csv(store))
    if shift == "school_holiday_flipped":  # a broken holiday feed (0/1 swapped)
        test["SchoolHoliday"] = 1 - test["SchoolHoliday"]
    else:  # every store renumbered: none is known to the model
        test["Store"] = test["Store"] + 1000
    src = tmp_path / "in" / "batch.parquet"
    src.parent.mkdir()
    test.to_parquet(src, index=False)
    out = tmp_path / "out" / "pred.parquet"
    with pytest.raises(DriftError, match="adversarial AUC") as err:
        score_file(bundles["rossmann"], src, out, quiet=True, fail_on_drift=True, max_drift_auc=0.8)
    assert ("SchoolHoliday" if shift == "school_holiday_flipped" else "Store") in str(err.value)
    _assert_failed_cleanly(out)
    assert [r.info.status for r in _runs(out)] == ["FAILED"]


def test_a_batch_of_some_stores_is_compared_with_those_stores_training_rows(store, bundles, tmp_path):
    test = pd.read_csv(_test_csv(store))
    src = tmp_path / "some_stores.parquet"
    test[test["Store"] <= 6].to_parquet(src, index=False)
    res = score_file(bundles["rossmann"], src, tmp_path / "p.parquet", quiet=True, track=False,
                     fail_on_drift=True)
    drift = res["drift"]
    assert drift["reference"]["narrowed_to"] == "Store" and drift["reference"]["groups"] == 6
    assert drift["reference"]["groups_in_training_sample"] == 12 and drift["auc"] < 0.7


def test_drift_check_is_skipped_without_a_training_sample(store, bundles, tmp_path, caplog):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["rossmann"], bundle)
    tensors = load_file(str(bundle / "weights.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("extra.drift_")},
              str(bundle / "weights.safetensors"))
    doc = json.loads((bundle / "bundle.json").read_text())  # the spec lists its extra arrays
    doc["extras"] = [e for e in doc["extras"] if not e.startswith("drift_")]
    (bundle / "bundle.json").write_text(json.dumps(doc))
    with caplog.at_level("INFO", logger="tabrec.score"):
        res = score_file(str(bundle), _test_csv(store), tmp_path / "p.parquet", quiet=True, track=False,
                         fail_on_drift=True)
    assert res["drift"]["checked"] is False and "drift check skipped" in caplog.text
    assert (tmp_path / "p.parquet").exists()


# ---------------------------------------------------------------------------- bad input


def test_truncated_and_corrupt_parquet(store, bundles, tmp_path):
    good = tmp_path / "good.parquet"
    pd.read_csv(_test_csv(store)).to_parquet(good, index=False)
    data = good.read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1" + os.urandom(500))
    for name in ("truncated.parquet", "garbage.parquet"):
        out = tmp_path / "o" / f"{name}.out.parquet"
        with pytest.raises(DataError, match=name):
            score_file(bundles["rossmann"], tmp_path / name, out, quiet=True)
        _assert_failed_cleanly(out)


def test_directory_with_mixed_schemas_names_the_odd_file(store, bundles, tmp_path):
    test = pd.read_csv(_test_csv(store))
    d = tmp_path / "in"
    d.mkdir()
    test.iloc[:200].to_parquet(d / "a.parquet", index=False)
    test.iloc[200:].drop(columns=["Promo"]).to_parquet(d / "b.parquet", index=False)
    out = tmp_path / "o" / "pred.parquet"
    with pytest.raises(DataError, match=r"b\.parquet.*missing column\(s\) \['Promo'\]"):
        score_file(bundles["rossmann"], d, out, quiet=True, track=False)
    (d / "b.parquet").unlink()
    test.iloc[200:].astype({"Store": "float64"}).to_parquet(d / "b.parquet", index=False)
    with pytest.raises(DataError, match=r"b\.parquet.*'Store' is double"):
        score_file(bundles["rossmann"], d, out, quiet=True, track=False)
    assert not out.exists()


def test_missing_required_column(store, bundles, tmp_path):
    src = tmp_path / "nostore.csv"
    pd.read_csv(_test_csv(store)).drop(columns=["Store"]).to_csv(src, index=False)
    out = tmp_path / "o" / "pred.parquet"
    with pytest.raises(DataError, match=r"nostore\.csv: missing required column\(s\) \['Store'\]"):
        score_file(bundles["rossmann"], src, out, quiet=True)
    _assert_failed_cleanly(out)


def test_unreachable_tracking_server_fails_fast(store, bundles, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    out = tmp_path / "pred.parquet"
    t0 = time.perf_counter()
    with pytest.raises(TrackingUnavailableError, match="127.0.0.1:9.*unreachable"):
        score_file(bundles["rossmann"], _test_csv(store), out, quiet=True)
    assert time.perf_counter() - t0 < 10
    result = CliRunner().invoke(_cli(), ["score", "--model", bundles["rossmann"], "--input",
                                         str(_test_csv(store)), "--output", str(out)])
    assert result.exit_code == 2 and "unreachable" in result.output
    assert _visible(tmp_path) == []


def test_unwritable_output_path(store, bundles, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write output"):
        score_file(bundles["rossmann"], _test_csv(store), blocker / "pred.parquet", quiet=True)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(OutputError, match="ermission denied"):
                score_file(bundles["rossmann"], _test_csv(store), ro / "pred.parquet", quiet=True)
            assert list(ro.iterdir()) == []
        finally:
            ro.chmod(0o755)


def test_disk_full_mid_write_keeps_the_previous_output(store, bundles, tmp_path, monkeypatch):
    out = tmp_path / "pred.parquet"
    score_file(bundles["rossmann"], _test_csv(store), out, quiet=True, track=False)
    before = out.read_bytes()
    calls = {"n": 0}
    real = pq.ParquetWriter.write_table

    def full_disk(self, table, *a, **kw):
        if str(self.where).endswith(".tmp"):  # the output
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, table, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        score_file(bundles["rossmann"], _test_csv(store), out, quiet=True, batch_rows=100)
    assert calls["n"] == 2
    assert out.read_bytes() == before and _hidden(tmp_path) == []
    assert [r.info.status for r in _runs(out)] == ["FAILED"]


def test_overlapping_run_fails_fast_on_the_lock(store, bundles, tmp_path):
    out = tmp_path / "pred.parquet"
    with output_lock(out):
        with pytest.raises(OutputLockedError, match=f"locked by another run \\(pid {os.getpid()}"):
            score_file(bundles["rossmann"], _test_csv(store), out, quiet=True)
        result = CliRunner().invoke(_cli(), ["score", "--model", bundles["rossmann"], "--input",
                                             str(_test_csv(store)), "--output", str(out)])
        assert result.exit_code == 2 and "locked" in result.output
    assert not out.exists() and _runs(out) == []
    score_file(bundles["rossmann"], _test_csv(store), out, quiet=True, track=False)  # lock released
    assert out.exists()


def test_leftovers_of_a_crashed_run_are_removed(store, bundles, tmp_path):
    out = tmp_path / "pred.parquet"
    (tmp_path / ".pred.parquet.999-dead.tmp").write_bytes(b"PAR1partial")
    (tmp_path / ".pred.parquet.999-dead.spill").mkdir()
    (tmp_path / ".unrelated.tmp").write_text("keep")
    score_file(bundles["rossmann"], _test_csv(store), out, quiet=True, track=False)
    assert _hidden(tmp_path) == [".unrelated.tmp"]


def _cli():
    from pipelines.cli import app

    return app


# ---------------------------------------------------------------------------- crash and rerun


def _future_rows(test: pd.DataFrame, copies: int) -> pd.DataFrame:
    """test.csv repeated with dates shifted forward: a longer, realistic scoring input."""
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


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_clean_output(store, bundles, tmp_path):
    big = _future_rows(pd.read_csv(_test_csv(store)), copies=220)  # ~127k rows
    src = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pandas(big, preserve_index=False), src, row_group_size=20_000)
    out = tmp_path / "out" / "pred.parquet"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["tracking_uri"]}
    cmd = [sys.executable, "-m", "pipelines.cli", "score", "--model", ROSS, "--input", str(src),
           "--output", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.parent.exists() and any(p.name.endswith(".tmp") for p in out.parent.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    assert not out.exists() and _hidden(out.parent)  # killed mid-write: junk, but only hidden junk
    assert [r.info.status for r in _runs(out)] == ["RUNNING"]

    rerun = subprocess.run(cmd + ["--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    clean = tmp_path / "clean.parquet"
    score_file(ROSS, src, clean, quiet=True, track=False)
    assert pq.read_table(out).equals(pq.read_table(clean))
    assert len(pq.read_table(out)) == len(big)
    assert _hidden(out.parent) == [] and _visible(out.parent) == ["pred.parquet", "pred.parquet.lock"]
    assert sorted(r.info.status for r in _runs(out)) == ["FINISHED", "KILLED"]
