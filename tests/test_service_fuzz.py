"""Schema-driven fuzzing of the HTTP service: every operation of the app's own OpenAPI document
(with both demo models loaded, so the per-model operations and record schemas are in it) gets
generated requests from schemathesis, checked with all of its checks: no 5xx, documented status
codes, content types, headers and bodies, schema-valid requests accepted and schema-violating
ones rejected, authentication enforced. In-process per operation (fast), and with the
schemathesis CLI (`--checks all`) against real uvicorn servers, open and keyed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import mlflow
import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis import GenerationMode

from service import Settings, create_app

MODELS = {"rossmann": "models:/rossmann@champion", "ratings": "models:/ratings@champion"}
KEY, ADMIN = "fuzz-key", "fuzz-admin"
EXAMPLES = int(os.environ.get("SCHEMA_FUZZ_EXAMPLES", "25"))  # per operation; raise it for a longer hunt
BODY_TEMPLATES = {"/v1/models/{name}/predict", "/models/{name}/invocations", "/v2/models/{name}/infer",
                  "/v2/models/{name}/versions/{version}/infer"}


@pytest.fixture(scope="module")
def fuzz_app(model_store: dict) -> Iterator:
    """The service with both models loaded (lifespan running for the whole module)."""
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", model_store["tracking_uri"])
        mlflow.set_tracking_uri(model_store["tracking_uri"])
        app = create_app(Settings(models=MODELS, api_keys=(SecretStr(KEY),), admin_token=SecretStr(ADMIN),
                                  max_records=200, max_body_bytes=256 * 1024,
                                  tracking_uri=model_store["tracking_uri"]))
        with TestClient(app) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").json()
                time.sleep(0.1)
            yield app
    mlflow.set_tracking_uri(previous)


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every documented operation, known at collection time: the routes of a
    model-less app, with the {name} body templates (and plain /invocations, which needs a model
    choice with two models served and no default) replaced by each model's concrete operations
    ("<version>" is the serving version, filled in when the test runs). Reload is excluded: each
    forced reload re-reads both models from the store, seconds each."""
    spec = create_app(Settings(models={})).openapi()
    ops = [(m.upper(), p) for p, item in spec["paths"].items() for m in item
           if p != "/v1/admin/reload" and p not in BODY_TEMPLATES and p != "/invocations"]
    for name in MODELS:
        ops += [("POST", f"/v1/models/{name}/predict"), ("POST", f"/models/{name}/invocations"),
                ("POST", f"/v2/models/{name}/infer"), ("POST", f"/v2/models/{name}/versions/<version>/infer")]
    return ops


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


# schemathesis' own `from_fixture(...).parametrize()` relies on a pytest internal that pytest 9
# no longer has, so each operation is one ordinary parametrized test driving its strategy.
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_and_never_5xx(api_schema, fuzz_app, method, path):
    if "<version>" in path:
        name = path.split("/")[3]
        path = path.replace("<version>", str(fuzz_app.state.registry.get(name).version))
    operation = api_schema[path][method]
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                         operation.as_strategy(GenerationMode.NEGATIVE))
    headers = {"X-API-Key": KEY}

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def fuzz(case):
        response = case.call(headers=headers)
        case.validate_response(response, headers=headers)  # every schemathesis check

    fuzz()


def test_documented_operations_are_the_ones_fuzzed(api_schema, fuzz_app):
    spec = fuzz_app.openapi()
    documented = {(m.upper(), p) for p, item in spec["paths"].items() for m in item if p != "/v1/admin/reload"}
    versions = {name: str(fuzz_app.state.registry.get(name).version) for name in MODELS}
    fuzzed = {(m, p.replace("<version>", versions[p.split("/")[3]]) if "<version>" in p else p)
              for m, p in OPERATIONS}
    assert documented == fuzzed


# ---------------------------------------------------------------- the schemathesis CLI, real servers
def thread_server(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return base, server, thread
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live_servers(bundles: dict[str, str]) -> Iterator[dict[str, str]]:
    """Two real uvicorn servers with both models: one open, one keyed (API key and admin token)."""
    servers = {"open": Settings(models=bundles, log_level="WARNING"),
               "keyed": Settings(models=bundles, api_keys=(SecretStr(KEY),), admin_token=SecretStr(ADMIN),
                                 log_level="WARNING")}
    running = {mode: thread_server(create_app(cfg)) for mode, cfg in servers.items()}
    try:
        yield {mode: base for mode, (base, _, _) in running.items()}
    finally:
        for _, server, thread in running.values():
            server.should_exit = True
            thread.join(timeout=30)


def schemathesis_cli(base: str, keyed: bool, examples: int, phases: str, tmp_path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json", "--checks", "all",
            "--max-examples", str(examples), "--phases", phases, "--seed", "20261201", "--no-color",
            "--workers", "1", "--exclude-path", "/v1/admin/reload", "--report", "junit",
            "--report-dir", str(tmp_path)]
    if keyed:  # both headers the document names, so every operation is reached with valid credentials
        args += ["-H", f"X-API-Key: {KEY}", "-H", f"Authorization: Bearer {KEY}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=1800)


@pytest.mark.parametrize("mode", ["open", "keyed"])
def test_schemathesis_cli_all_checks_clean(live_servers, mode, tmp_path):
    """The document as a stock client reads it: `schemathesis run --checks all`, a short run."""
    out = schemathesis_cli(live_servers[mode], mode == "keyed", 5, "examples,fuzzing", tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "failures" not in out.stdout.splitlines()[-1], out.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["open", "keyed"])
def test_schemathesis_cli_all_checks_longer_hunt(live_servers, mode, tmp_path):
    examples = int(os.environ.get("SCHEMA_FUZZ_CLI_EXAMPLES", "60"))
    out = schemathesis_cli(live_servers[mode], mode == "keyed", examples, "examples,coverage,fuzzing,stateful",
                           tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
