"""Stock clients nobody on the project wrote, against a real uvicorn server (in a thread of the
test process, both demo models loaded): NVIDIA's tritonclient.http with its defaults (binary
tensors, no Content-Type), MLflow's ScoringServerClient on a default model and on per-model base
URLs, and raw sockets for slow and vanishing clients."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pandas as pd
import pytest
import uvicorn

from modeling.predictors import load_predictor
from service import Settings, create_app

BODY_TIMEOUT = 1.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bundles: dict[str, str]) -> Iterator[dict]:
    """An open server (no keys) with rossmann as the default model for plain /invocations."""
    settings = Settings(models=bundles, default_model="rossmann", body_timeout=BODY_TIMEOUT)
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="uvicorn-test", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.1)
    try:
        yield {"base": base, "host": "127.0.0.1", "port": port, "app": app}
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def triton():
    """tritonclient.http; it may be missing only where TABREC_REQUIRE_TRITON is unset (CI sets it)."""
    try:
        import tritonclient.http as http
    except ImportError:
        if os.environ.get("TABREC_REQUIRE_TRITON"):
            raise
        pytest.skip("tritonclient[http] is not installed (pip install -e '.[dev]')")
    return http


@pytest.fixture(scope="module")
def rows(model_store: dict) -> pd.DataFrame:
    return pd.read_csv(model_store["rossmann_data"]["test.csv"], nrows=40)


def version_of(base: str, name: str) -> str:
    return httpx.get(f"{base}/v1/models/{name}").json()["version"]


# ---------------------------------------------------------------- tritonclient.http
def triton_inputs(http, df: pd.DataFrame, binary: bool, dtypes: dict[str, str]) -> list:
    inputs = []
    for name, dtype in dtypes.items():
        values = df[name].to_numpy()
        array = np.array([str(v) for v in values], dtype=object) if dtype == "BYTES" else values.astype(np.int64)
        t = http.InferInput(name, [len(df)], dtype)
        t.set_data_from_numpy(array, binary_data=binary)
        inputs.append(t)
    return inputs


def test_tritonclient_health_metadata_and_readiness(server, triton):
    client = triton.InferenceServerClient(f"{server['host']}:{server['port']}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "tabrec"
    version = version_of(server["base"], "rossmann")
    assert client.is_model_ready("rossmann") and client.is_model_ready("rossmann", version)
    assert not client.is_model_ready("rossmann", "999999") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("rossmann")
    assert meta["versions"] == [version] and {"Store", "Date"} <= {i["name"] for i in meta["inputs"]}
    assert client.get_model_metadata("rossmann", version)["name"] == "rossmann"
    client.close()


ROSSMANN_TYPES = {"Store": "INT64", "DayOfWeek": "INT64", "Date": "BYTES", "Open": "INT64", "Promo": "INT64",
                  "StateHoliday": "BYTES", "SchoolHoliday": "INT64"}


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, None), (True, False), (False, True), (False, False)])
def test_tritonclient_infer_with_its_defaults_binary_and_json(server, triton, rows, binary_in, binary_out):
    """binary_out None: tritonclient's default (no outputs named -> binary_data_output)."""
    client = triton.InferenceServerClient(f"{server['host']}:{server['port']}")
    expected = load_predictor(server["app"].state.settings.models["rossmann"]).predict(rows)
    outputs = None if binary_out is None else [triton.InferRequestedOutput("prediction", binary_data=binary_out)]
    result = client.infer("rossmann", triton_inputs(triton, rows, binary_in, ROSSMANN_TYPES), outputs=outputs,
                          request_id="t-1")
    np.testing.assert_allclose(result.as_numpy("prediction"), expected, rtol=1e-6)
    out = result.get_output("prediction")
    assert ("parameters" in out) == (binary_out is not False) and out["datatype"] == "FP64"
    assert result.get_response()["id"] == "t-1"
    version = version_of(server["base"], "rossmann")
    again = client.infer("rossmann", triton_inputs(triton, rows, binary_in, ROSSMANN_TYPES), model_version=version)
    np.testing.assert_allclose(again.as_numpy("prediction"), expected, rtol=1e-6)
    client.close()


def test_tritonclient_ratings_variable_width_ids_and_errors(server, triton, model_store):
    client = triton.InferenceServerClient(f"{server['host']}:{server['port']}")
    pairs = pd.DataFrame({"user": ["1", "22", "no-such-user", "7"], "item": ["3", "100", "5", "unknown-item"]})
    expected = load_predictor(server["app"].state.settings.models["ratings"]).predict(pairs)
    got = client.infer("ratings", triton_inputs(triton, pairs, True, {"user": "BYTES", "item": "BYTES"}))
    np.testing.assert_allclose(got.as_numpy("prediction"), expected, rtol=1e-6)
    ints = pd.DataFrame({"user": [1, 22], "item": [3, 100]})  # ids as INT64 tensors
    by_int = client.infer("ratings", triton_inputs(triton, ints, True, {"user": "INT64", "item": "INT64"}))
    np.testing.assert_allclose(by_int.as_numpy("prediction"), expected[:2], rtol=1e-6)
    rows = pd.read_csv(model_store["rossmann_data"]["test.csv"], nrows=3)
    rows["Date"] = pd.to_datetime(rows["Date"]).dt.strftime("%Y%m%d").astype(np.int64)
    with pytest.raises(triton.InferenceServerException) as info:  # a date sent as INT64 is refused
        client.infer("rossmann", triton_inputs(triton, rows, True, {**ROSSMANN_TYPES, "Date": "INT64"}))
    assert info.value.status() == "422" and "Date" in info.value.message() and "BYTES" in info.value.message()
    client.close()


# ---------------------------------------------------------------- MLflow's own client
def test_mlflow_scoring_client_default_model_and_per_model_base_urls(server, rows):
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    df = rows.drop(columns=["Id"])
    expected = load_predictor(server["app"].state.settings.models["rossmann"]).predict(df)
    plain = ScoringServerClient(server["host"], server["port"])  # no way to name a model: the default
    plain.wait_server_ready(timeout=10)
    np.testing.assert_allclose(plain.invoke(df).get_predictions().to_numpy().reshape(-1), expected, rtol=1e-6)
    ratings = ScoringServerClient(server["host"], f"{server['port']}/models/ratings")  # a per-model base URL
    ratings.wait_server_ready(timeout=10)
    pairs = pd.DataFrame({"user": ["1", "2"], "item": ["3", "4"]})
    want = load_predictor(server["app"].state.settings.models["ratings"]).predict(pairs)
    np.testing.assert_allclose(ratings.invoke(pairs).get_predictions().to_numpy().reshape(-1), want, rtol=1e-6)
    assert httpx.get(f"{server['base']}/models/nope/ping").status_code == 404


# ---------------------------------------------------------------- slow and vanishing clients
def raw_request(port: int, head: bytes, body: bytes, wait: float) -> bytes:
    """Send a request whose body stops short, then read whatever comes back within `wait` s."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head + body)
        chunks, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def post_head(path: str, length: int, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def request_count(base: str, route: str, status: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    pattern = rf'tabrec_http_requests_total\{{method="POST",model="[^"]*",route="{re.escape(route)}",status="{status}"\}} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


def test_a_stalled_body_gets_408_and_a_vanished_client_is_499_not_500(server):
    start = time.monotonic()
    answer = raw_request(server["port"], post_head("/v1/models/ratings/predict", 100), b'{"', wait=BODY_TIMEOUT + 5)
    took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"TABREC_BODY_TIMEOUT" in answer and took < BODY_TIMEOUT + 3  # and the connection was closed
    route = "/v1/models/{name}/predict"
    before_500, before_499 = request_count(server["base"], route, "500"), request_count(server["base"], route, "499")
    with socket.create_connection(("127.0.0.1", server["port"])) as sock:
        sock.sendall(post_head("/v1/models/ratings/predict", 100) + b'{"re')
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while request_count(server["base"], route, "499") == before_499 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request_count(server["base"], route, "499") == before_499 + 1
    assert request_count(server["base"], route, "500") == before_500
    assert 'route="unmatched",status="500"' not in httpx.get(f"{server['base']}/metrics").text
    assert request_count(server["base"], route, "408") >= 1


# ---------------------------------------------------------------- media types
def test_json_without_content_type_is_json_and_other_types_are_415(server):
    body = json.dumps({"records": [{"user": "1", "item": "2"}]}).encode()
    bare = raw_request(server["port"], f"POST /v1/models/ratings/predict HTTP/1.1\r\nHost: x\r\n"
                                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode(), body, 5)
    assert bare.startswith(b"HTTP/1.1 200"), bare[:300]
    for ctype in ("text/plain", "text/csv", "application/x-www-form-urlencoded", "application/octet-stream"):
        r = httpx.post(f"{server['base']}/v1/models/ratings/predict", content=body, headers={"content-type": ctype})
        assert r.status_code == 415 and "application/json" in r.json()["detail"], (ctype, r.text)
    ok = httpx.post(f"{server['base']}/invocations", content=json.dumps(
        {"dataframe_records": [{"user": "1", "item": "2"}]}).encode(),
        headers={"content-type": "application/json; charset=utf-8", "X-Model-Name": "ratings"})
    assert ok.status_code == 200
