"""The Rossmann event calendar end to end: a record's prediction does not depend on the other
records of its request (HTTP and batch), `tabrec score --calendar`, the service's calendar setting
and its reload, `tabrec train rossmann --calendar`, and bad calendar files (exit 2 naming file,
column and line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modeling.errors import DataError
from modeling.predictors import TabularPredictor, load_predictor
from pipelines.batch import score_file
from service import Settings, create_app
from service.server import resolve_settings
from service.settings import parse_calendars_env

_PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
RAW = ["Store", "DayOfWeek", "Date", "Open", "Promo", "StateHoliday", "SchoolHoliday"]


def _cli():
    from pipelines.cli import app

    return app


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records", date_format="iso"))


def _wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def demo(model_store: dict, bundles: dict) -> dict:
    data = model_store["rossmann_data"]
    test = pd.read_csv(data["test.csv"], dtype={"StateHoliday": str})
    train = pd.read_csv(data["train.csv"], dtype={"StateHoliday": str})
    return {"bundle": bundles["rossmann"], "data": data, "test": test, "train": train,
            "predictor": load_predictor(bundles["rossmann"])}


def _requests(demo: dict) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One record (store 1, a day after training) alone, among 50 and among 1,000 records (test.csv
    rows plus training-period rows, shuffled; the record sits at a different position each time)."""
    test, train = demo["test"], demo["train"]
    target = test[(test["Store"] == 1)].iloc[[5]][RAW]
    others = pd.concat([test[RAW], train[RAW]], ignore_index=True)
    others = others[~((others["Store"] == 1) & (others["Date"] == target["Date"].item()))]
    pool = others.sample(frac=1, random_state=0)
    reqs = {"alone": target.reset_index(drop=True)}
    for n, pos in ((50, 17), (1000, 731)):
        rest = pool.iloc[: n - 1]
        reqs[str(n)] = pd.concat([rest.iloc[:pos], target, rest.iloc[pos:]], ignore_index=True)
    return target, reqs


def _position(req: pd.DataFrame, target: pd.DataFrame) -> int:
    hit = (req["Store"] == target["Store"].item()) & (req["Date"] == target["Date"].item())
    return int(np.flatnonzero(hit.to_numpy())[0])


@pytest.mark.parametrize("with_calendar", [False, True])
def test_same_record_alone_among_50_and_1000_same_prediction(demo: dict, tmp_path: Path, with_calendar: bool) -> None:
    """Store 1 on a day after training: the same prediction to 1e-6 alone, among 50 and among 1,000
    records, over HTTP (JSON records), in batch (`tabrec score`, one chunk and 7-row chunks) and in
    the predictor, with the bundle's calendar or with test.csv laid over it (service setting)."""
    target, reqs = _requests(demo)
    calendar = demo["data"]["test.csv"]
    settings = Settings(models={"rossmann": demo["bundle"]}, max_records=2000,
                        calendars={"rossmann": str(calendar)} if with_calendar else {})
    predictor = demo["predictor"].with_calendar_file(calendar) if with_calendar else demo["predictor"]
    got: dict[str, list[float]] = {}
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        for name, req in reqs.items():
            pos = _position(req, target)
            resp = client.post("/v1/models/rossmann/predict", json={"records": _records(req)})
            assert resp.status_code == 200, resp.text
            got.setdefault("http", []).append(resp.json()["predictions"][pos])
            got.setdefault("predictor", []).append(float(predictor.predict(req)[pos]))
            path = tmp_path / f"{name}.parquet"
            req.rename_axis("Id").reset_index().to_parquet(path, index=False)
            for rows in (100_000, 7):
                out = tmp_path / f"{name}-{rows}.out.parquet"
                res = score_file(demo["bundle"], path, out, quiet=True, track=False, batch_rows=rows,
                                 calendar=calendar if with_calendar else None)
                assert res["chunk_mode"] == ("whole" if rows > len(req) else "stream")
                scored = pq.read_table(out).to_pandas().set_index("Id")["prediction"]
                got.setdefault(f"batch{rows}", []).append(float(scored.loc[pos]))
    first = got["http"][0]
    assert first > 0
    for where, values in got.items():
        np.testing.assert_allclose(values, first, rtol=1e-6, err_msg=where)


def test_score_calendar_reads_the_files_future_events(demo: dict, tmp_path: Path) -> None:
    """`tabrec score --calendar test.csv` scores test.csv with its own events ahead (the days-until
    features change for rows whose next promo lies in the file), as the predictor does in memory."""
    test_csv = demo["data"]["test.csv"]
    plain, cal = tmp_path / "plain.parquet", tmp_path / "cal.parquet"
    runner = CliRunner()
    for out, extra in ((plain, []), (cal, ["--calendar", str(test_csv)])):
        res = runner.invoke(_cli(), ["score", "--model", demo["bundle"], "--input", str(test_csv), "--output",
                                     str(out), "--no-track", "--json", "--quiet", "--batch-rows", "100", *extra])
        assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["calendar"] == str(test_csv) and summary["chunk_mode"] == "stream"
    a = pq.read_table(plain).to_pandas()["prediction"].to_numpy()
    b = pq.read_table(cal).to_pandas()["prediction"].to_numpy()
    expected = demo["predictor"].with_calendar_file(test_csv).predict(demo["test"])
    np.testing.assert_allclose(b, expected, rtol=1e-5)
    open_rows = demo["test"]["Open"].eq(1).to_numpy()
    assert (np.abs(a - b)[open_rows] > 1e-3).mean() > 0.3  # the calendar matters
    # BeforePromo by hand: days to the store's next promo day in test.csv (365: none known)
    test = demo["test"].assign(Date=pd.to_datetime(demo["test"]["Date"]))
    expect = []
    for _, row in test.iterrows():
        later = test[(test["Store"] == row["Store"]) & (test["Promo"] == 1) & (test["Date"] >= row["Date"])]
        expect.append((later["Date"].min() - row["Date"]).days if len(later) else 365)
    feats = demo["predictor"].with_calendar_file(test_csv).engineer(demo["test"])
    np.testing.assert_array_equal(feats["BeforePromo"], expect)
    assert (np.asarray(expect) < 365).mean() > 0.5
    plain_feats = demo["predictor"].engineer(demo["test"])  # nothing known after training
    np.testing.assert_array_equal(plain_feats["BeforePromo"], np.where(test["Promo"] == 1, 0, 365))


def _bad(demo: dict, tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    """A calendar file (test.csv layout) with one kind of problem, and what the error must name."""
    test = pd.read_csv(demo["data"]["test.csv"], dtype=str)
    if kind == "type":
        test.loc[4, "Promo"] = "yes"
        return _write(tmp_path, test), ["column 'Promo'", "line 6", "'yes'"]
    if kind == "duplicate":
        test = pd.concat([test, test.iloc[[3]]], ignore_index=True)
        return _write(tmp_path, test), ["Store, Date", "duplicate", "line 5", f"line {len(test) + 1}"]
    if kind == "unknown_store":
        test.loc[2, "Store"] = "999"
        return _write(tmp_path, test), ["column 'Store'", "unknown", "line 4", "Store=999"]
    # a training row with its promo flipped: contradicts what was observed
    row = demo["train"].iloc[[10]].drop(columns=["Sales", "Customers"]).astype(str)
    row["Promo"] = str(1 - int(row["Promo"].item()))
    test = pd.concat([test, row.assign(Id="99999")[test.columns]], ignore_index=True)
    return _write(tmp_path, test), ["column 'Promo'", "contradicts", f"line {len(test) + 1}"]


def _write(tmp_path: Path, df: pd.DataFrame) -> Path:
    path = tmp_path / "calendar.csv"
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("kind", ["type", "duplicate", "unknown_store", "contradiction"])
def test_bad_calendar_file_exit_2_names_file_column_line(demo: dict, tmp_path: Path, kind: str) -> None:
    path, expect = _bad(demo, tmp_path, kind)
    out = tmp_path / "out.parquet"
    res = CliRunner().invoke(_cli(), ["score", "--model", demo["bundle"], "--input", str(demo["data"]["test.csv"]),
                                      "--output", str(out), "--no-track", "--calendar", str(path), "--json"])
    assert res.exit_code == 2, res.output
    err = json.loads([line for line in res.output.splitlines() if line.startswith("{")][-1])["error"]
    assert str(path) in err and all(e in err for e in expect), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_serve_calendar_setting_reloads_the_file(demo: dict, tmp_path: Path) -> None:
    """The service lays the configured calendar over the bundle's; POST /v1/admin/reload re-reads
    a changed file; a broken file fails the reload and the previous calendar keeps serving."""
    test = demo["test"]
    path = tmp_path / "calendar.csv"
    test.to_csv(path, index=False)
    rows = test[test["Open"] == 1].head(40)
    body = {"records": _records(rows[RAW])}
    base = demo["predictor"]
    with TestClient(create_app(Settings(models={"rossmann": demo["bundle"]}, calendars={"rossmann": str(path)}))) as c:
        _wait_ready(c)
        first = np.asarray(c.post("/v1/models/rossmann/predict", json=body).json()["predictions"])
        np.testing.assert_allclose(first, base.with_calendar_file(path).predict(rows), rtol=1e-6)
        assert c.post("/v1/admin/reload").json()["models"][0]["status"] == "unchanged"
        moved = test.assign(Promo=1 - test["Promo"])  # a new promo plan for the same weeks
        moved.to_csv(path, index=False)
        os.utime(path, (time.time() + 5, time.time() + 5))
        report = c.post("/v1/admin/reload").json()
        assert report["ok"] and report["models"][0]["status"] == "loaded"
        second = np.asarray(c.post("/v1/models/rossmann/predict", json=body).json()["predictions"])
        np.testing.assert_allclose(second, base.with_calendar_file(path).predict(rows), rtol=1e-6)
        assert not np.allclose(first, second, rtol=1e-3)
        moved.assign(Store=moved["Store"] + 500).to_csv(path, index=False)  # unknown stores
        os.utime(path, (time.time() + 10, time.time() + 10))
        report = c.post("/v1/admin/reload").json()
        assert not report["ok"] and report["models"][0]["status"] == "failed"
        assert "unknown Store" in report["models"][0]["error"] and str(path) in report["models"][0]["error"]
        third = np.asarray(c.post("/v1/models/rossmann/predict", json=body).json()["predictions"])
        np.testing.assert_array_equal(third, second)  # still serving the last good calendar


def test_calendar_settings_env_and_cli(demo: dict, tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    demo["test"].to_csv(path, index=False)
    env = {"TABREC_MODELS": f"r={demo['bundle']}", "TABREC_CALENDARS": f"r={path}"}
    s = Settings.from_env(env)
    assert s.calendars == {"r": str(path)}
    assert Settings.from_env({**s.to_env()}).calendars == s.calendars  # worker processes rebuild it
    assert parse_calendars_env(json.dumps({"a": "/x.csv"})) == {"a": "/x.csv"}
    for bad in ("r", "=x", "r=a,r=b", "{not json"):
        with pytest.raises(DataError):
            parse_calendars_env(bad)
    with pytest.raises(DataError, match="not among the served models"):
        Settings.from_env({**env, "TABREC_CALENDARS": f"other={path}"})
    with pytest.raises(DataError, match="no such file"):
        resolve_settings(None, None, [f"r={demo['bundle']}"], None, [f"r={tmp_path / 'missing.csv'}"])
    assert resolve_settings(None, None, [f"r={demo['bundle']}"], None, [f"r={path}"]).calendars == {"r": str(path)}


def test_ratings_models_take_no_calendar(model_store: dict, bundles: dict, tmp_path: Path) -> None:
    res = CliRunner().invoke(_cli(), ["score", "--model", bundles["ratings"], "--input",
                                      str(model_store["ratings_data"]["u.data"]), "--output",
                                      str(tmp_path / "o.parquet"), "--no-track", "--calendar",
                                      str(model_store["rossmann_data"]["test.csv"])])
    assert res.exit_code == 2 and "reads no event calendar" in res.output


def _train(data: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}", "PATH": str(Path(sys.executable).parent),
           **_PYTHONPATH}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "rossmann", "--train", str(data["train.csv"]),
                           "--store", str(data["store.csv"]), "--json", "--quiet", "--epochs", "1", "--lr", "3e-3",
                           "--layers", "16,8", *extra], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)


def test_train_with_calendar_keeps_it_in_the_bundle(demo: dict, tmp_path: Path) -> None:
    """`train rossmann --calendar test.csv`: the bundle's calendar reaches to the end of test.csv, so
    scoring test.csv without --calendar equals scoring it with the file laid over the plain bundle;
    a calendar contradicting train.csv is exit 2 naming the file, column and line, with no run."""
    data = demo["data"]
    path, expect = _bad(demo, tmp_path, "contradiction")
    res = _train(data, tmp_path, "--calendar", str(path))
    assert res.returncode == 2, res.stderr
    assert str(path) in res.stderr and all(e in res.stderr for e in expect), res.stderr
    res = _train(data, tmp_path, "--calendar", str(data["test.csv"]))
    assert res.returncode == 0, res.stderr
    from modeling.bundle import find_bundle

    uri = json.loads(res.stdout.strip().splitlines()[-1])["model_uri"]
    trained = load_predictor(str(find_bundle(tmp_path / "mlartifacts", uri)))  # the run's logged bundle
    assert isinstance(trained, TabularPredictor)
    info = trained.calendar_info()[0]
    assert info["future_rows"] == len(demo["test"]) and info["horizon"][1] == demo["test"]["Date"].max()
    np.testing.assert_allclose(trained.predict(demo["test"]),
                               trained.with_calendar_file(data["test.csv"]).predict(demo["test"]), rtol=1e-6)


def test_training_calendar_reader_names_file_column_line(tmp_path: Path) -> None:
    """`train rossmann --calendar`: the test.csv-layout reader (types, duplicate rows) and the
    check against train.csv (unknown stores, contradictions), each naming file, column and line."""
    from pipelines.ingest.rossmann import check_calendar, read_calendar, read_train
    from pipelines.synth import write_rossmann

    files = write_rossmann(tmp_path / "data", stores=3, days=90, seed=1)
    train = read_train(files["train.csv"])
    test = pd.read_csv(files["test.csv"], dtype=str)
    cal = read_calendar(files["test.csv"])
    assert len(cal) == len(test) and str(cal["Date"].dtype) == "datetime64[ns]"
    check_calendar(cal, train, files["test.csv"])  # the synthetic test.csv fits its train.csv
    minimal = tmp_path / "minimal.csv"  # only the calendar columns
    test[["Store", "Date", "Promo", "StateHoliday", "SchoolHoliday"]].to_csv(minimal, index=False)
    assert len(read_calendar(minimal)) == len(test)
    cases = {
        "type": (test.assign(SchoolHoliday=np.where(test.index == 2, "maybe", test["SchoolHoliday"])),
                 ["column 'SchoolHoliday'", "line 4"]),
        "duplicate": (pd.concat([test, test.iloc[[0]]], ignore_index=True), ["'Store', 'Date'", "line 2"]),
        "unknown": (test.assign(Store=np.where(test.index == 1, "77", test["Store"])),
                    ["column 'Store'", "unknown", "line 3", "Store=77"]),
    }
    for name, (frame, expect) in cases.items():
        path = tmp_path / f"{name}.csv"
        frame.to_csv(path, index=False)
        with pytest.raises(DataError) as info:
            check_calendar(read_calendar(path), train, path)
        assert str(path) in str(info.value) and all(e in str(info.value) for e in expect), (name, str(info.value))
