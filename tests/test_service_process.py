"""`tabrec serve` as a real subprocess on a loopback port, driven over HTTP with httpx."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from modeling.predictors import load_predictor

pytestmark = pytest.mark.slow

KEY, ADMIN = "process-key", "process-admin"
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABREC_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", **extra)
    return env


def log_tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def start_server(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start `tabrec serve` and wait (bounded) for /readyz; the caller must stop it."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port), *args],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"server not ready in {START_TIMEOUT}s:\n{log_tail(log)}")
        time.sleep(0.25)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tracking(model_store: dict) -> Iterator[dict]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(model_store["tracking_uri"])
    yield model_store
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def server(tracking: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("serve")
    log = work / "server.log"
    env = clean_env(tracking["tracking_uri"], TABREC_API_KEYS=KEY, TABREC_ADMIN_TOKEN=ADMIN)
    proc, base = start_server(["--model", "rossmann=models:/rossmann@champion",
                               "--model", "ratings=models:/ratings@champion"], env, work, log)
    try:
        yield {"base": base, "proc": proc, "log": log}
    finally:
        stop(proc)


def rows(store: dict, n: int) -> pd.DataFrame:
    return pd.read_csv(store["rossmann_data"]["test.csv"], nrows=n)


def test_serves_predictions_over_http(server, tracking):
    headers = {"X-API-Key": KEY}
    with httpx.Client(base_url=server["base"], headers=headers, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        names = {m["name"]: m for m in http.get("/v1/models").json()}
        assert set(names) == {"rossmann", "ratings"}
        df = rows(tracking, 50)
        r = http.post("/v1/models/rossmann/predict", json={"records": json.loads(df.to_json(orient="records"))},
                      headers={"X-Request-ID": "proc-req-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "proc-req-1"
        expected = load_predictor("models:/rossmann@champion").predict(df)
        np.testing.assert_allclose(r.json()["predictions"], expected, rtol=1e-6)
        rec = http.get("/v1/models/ratings/users/1/recommendations", params={"k": 3}).json()
        assert len(rec["items"]) == 3
        inv = http.post("/invocations", params={"model": "ratings"},
                        json={"dataframe_split": {"columns": ["user", "item"], "data": [["1", "2"]]}})
        assert inv.status_code == 200 and len(inv.json()["predictions"]) == 1
        assert httpx.post(f"{server['base']}/v1/models/ratings/predict", json={"records": []}).status_code == 401
        assert "tabrec_http_requests_total" in http.get("/metrics").text
    logged = [json.loads(line) for line in server["log"].read_text().splitlines() if line.startswith("{")]
    [entry] = [e for e in logged if e.get("request_id") == "proc-req-1"]
    assert entry["status"] == 200 and entry["model"] == "rossmann" and entry["path"] == "/v1/models/rossmann/predict"
    assert not any("no API keys" in e.get("msg", "") for e in logged)
    assert KEY not in server["log"].read_text()


def test_reload_under_load_has_no_failed_requests(server, tracking):
    client = MlflowClient()
    original = client.get_model_version_by_alias("rossmann", "champion")
    body = {"records": json.loads(rows(tracking, 5).to_json(orient="records"))}
    results: list[list[tuple[float, int, str | None]]] = [[] for _ in range(3)]
    failures: list[str] = []
    stop_at = time.monotonic() + 6.0

    def hammer(out: list[tuple[float, int, str | None]]) -> None:
        with httpx.Client(base_url=server["base"], headers={"X-API-Key": KEY}, timeout=30) as http:
            while time.monotonic() < stop_at:
                try:
                    r = http.post("/v1/models/rossmann/predict", json=body)
                    out.append((time.monotonic(), r.status_code, r.json().get("version")))
                except Exception as exc:  # a dropped connection is a failed request
                    failures.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(out,)) for out in results]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        new = mlflow.register_model(original.source, "rossmann")
        client.set_registered_model_alias("rossmann", "champion", new.version)
        reload = httpx.post(f"{server['base']}/v1/admin/reload", headers={"X-Admin-Token": ADMIN}, timeout=60)
        swapped_at = time.monotonic()
        assert reload.status_code == 200, reload.text
        entry = {m["name"]: m for m in reload.json()["models"]}["rossmann"]
        assert entry["status"] == "loaded" and entry["version"] == str(new.version)
        for t in threads:
            t.join(timeout=30)
    finally:
        stop_at = 0.0
        client.set_registered_model_alias("rossmann", "champion", original.version)
        httpx.post(f"{server['base']}/v1/admin/reload", headers={"X-Admin-Token": ADMIN}, timeout=60)
    assert not failures, failures[:3]
    flat = [r for out in results for r in out]
    assert len(flat) > 20 and {status for _, status, _ in flat} == {200}
    assert {v for _, _, v in flat} == {str(original.version), str(new.version)}
    for out in results:  # one atomic swap: once a client sees the new version it never sees the old one
        versions = [v for _, _, v in out]
        first_new = versions.index(str(new.version)) if str(new.version) in versions else len(versions)
        assert set(versions[first_new:]) <= {str(new.version)}
        assert all(v == str(new.version) for t, _, v in out if t > swapped_at + 0.5)


def test_open_mode_warns_and_several_workers_serve(tracking, tmp_path):
    log = tmp_path / "open.log"
    proc, base = start_server(["--model", "ratings=models:/ratings@champion", "--workers", "2"],
                              clean_env(tracking["tracking_uri"]), tmp_path, log)
    try:
        r = httpx.post(f"{base}/v1/models/ratings/predict", json={"records": [{"user": "1", "item": "2"}]})
        assert r.status_code == 200  # no keys configured: open
        assert httpx.post(f"{base}/invocations", json={"dataframe_records": [{"user": "1", "item": "2"}]},
                          timeout=10).status_code == 200
    finally:
        stop(proc)
    text = log.read_text()
    assert "no API keys configured" in text and "127.0.0.1" in text
    assert text.count("torch threads") == 2  # one line per worker process


def test_bad_model_spec_exits_2(tracking, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--model", "no-equals-sign"],
                         cwd=tmp_path, env=clean_env(tracking["tracking_uri"]), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "NAME=URI" in out.stderr


def test_uvicorn_runs_the_c_http_parser_and_event_loop():
    """`tabrec serve` leaves uvicorn's http and loop on "auto"; the pinned httptools and uvloop
    make auto pick the C implementations (pure-Python h11 and asyncio without them)."""
    import asyncio

    import uvloop
    from uvicorn.loops.auto import auto_loop_factory
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert AutoHTTPProtocol is HttpToolsProtocol
    loop = auto_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop) and isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()
