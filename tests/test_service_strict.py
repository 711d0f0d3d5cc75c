"""No silent guesses over HTTP: strict dates, ids and flags; NaN is not 'missing'; every
credential sent must be right; the OpenAPI document's examples pass on their own paths."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service import Settings, create_app

KEY, ADMIN = "strict-key", "strict-admin"
GOOD = {"Store": 1, "DayOfWeek": 4, "Date": "2015-09-17", "Open": 1, "Promo": 1, "StateHoliday": "0",
        "SchoolHoliday": 0}


@pytest.fixture(scope="module")
def app(bundles: dict[str, str]) -> Iterator:
    application = create_app(Settings(models=bundles, api_keys=(SecretStr(KEY),), admin_token=SecretStr(ADMIN)))
    with TestClient(application) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield application


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app, headers={"X-API-Key": KEY})


def errors(r) -> list[tuple]:
    assert r.status_code == 422, r.text
    return [(d["record"], d["field"], d["msg"]) for d in r.json()["detail"]]


@pytest.mark.parametrize(("value", "needle"), [
    (20150917, "20150917"), (0, "0"), (1442448000, "1442448000"), (True, "True"), (2015.5, "2015.5"),
    ("01/02/2015", "'01/02/2015'"), ("17/09/2015", "'17/09/2015'"), ("2015-9-17", "'2015-9-17'"),
    ("2015", "'2015'"), ("yesterday", "'yesterday'"), ("2015-09-17T00:00+02:00", "'2015-09-17T00:00+02:00'"),
])
def test_dates_are_iso_strings_never_numbers_or_slash_dates(client, value, needle):
    r = client.post("/v1/models/rossmann/predict", json={"records": [GOOD, GOOD | {"Date": value}]})
    assert errors(r) == [(1, "Date", f"value {needle} is not an ISO 8601 date (YYYY-MM-DD)")]
    inv = client.post("/invocations?model=rossmann", json={"dataframe_records": [GOOD | {"Date": value}]})
    assert errors(inv)[0][:2] == (0, "Date")


@pytest.mark.parametrize("value", ["2015-02-30", "2015-13-01", "8251-07-29", "1492-10-12"])
def test_iso_shaped_dates_that_are_not_calendar_dates_in_range(client, value):
    r = client.post("/v1/models/rossmann/predict", json={"records": [GOOD | {"Date": value}]})
    assert errors(r) == [(0, "Date", f"value '{value}' is not a calendar date in the years 1678-2261")]


def test_iso_dates_with_a_time_are_dates(client):
    plain = client.post("/v1/models/rossmann/predict", json={"records": [GOOD]}).json()["predictions"]
    for text in ("2015-09-17T00:00", "2015-09-17 00:00:00", "2015-09-17T00:00:00.000"):
        r = client.post("/v1/models/rossmann/predict", json={"records": [GOOD | {"Date": text}]})
        assert r.status_code == 200 and r.json()["predictions"] == plain


def test_booleans_are_not_numbers_ids_or_codes(client):
    for field in ("Store", "Promo", "Open", "SchoolHoliday", "StateHoliday"):
        r = client.post("/v1/models/rossmann/predict", json={"records": [GOOD | {field: True}]})
        [(record, got_field, msg)] = errors(r)
        assert (record, got_field) == (0, field) and "True" in msg
    for field in ("user", "item"):
        r = client.post("/v1/models/ratings/predict", json={"records": [{"user": 1, "item": 2} | {field: False}]})
        assert errors(r) == [(0, field, "value False is not a valid id")]
    assert client.post("/v1/models/ratings/predict", json={"records": [{"user": 1, "item": "2"}]}).status_code == 200


def test_nan_is_reported_as_nan_and_a_missing_key_as_required(client):
    body = json.dumps({"records": [GOOD, GOOD | {"Store": float("nan")}, GOOD | {"Open": None}]}, allow_nan=True)
    r = client.post("/v1/models/rossmann/predict", content=body, headers={"content-type": "application/json"})
    assert errors(r) == [(1, "Store", "value NaN is not valid JSON; send null for a missing value")]
    missing = {k: v for k, v in GOOD.items() if k != "Store"}
    r = client.post("/v1/models/rossmann/predict", json={"records": [GOOD, missing, GOOD | {"Store": None}]})
    assert errors(r) == [(1, "Store", "field required"), (2, "Store", "field required")]
    split = json.dumps({"dataframe_split": {"columns": ["user", "item"], "data": [[1, 2], [float("nan"), 3]]}},
                       allow_nan=True)
    r = client.post("/invocations?model=ratings", content=split, headers={"content-type": "application/json"})
    assert errors(r)[0][:2] == (1, "user")
    text = json.dumps({"records": [{"user": "NaN", "item": "2"}]})  # the string "NaN" is an id like any other
    assert client.post("/v1/models/ratings/predict", content=text).status_code == 200


def test_v2_rejects_a_date_sent_as_a_number_and_checks_shape_before_counting(client):
    meta = client.get("/v2/models/rossmann").json()
    dtypes = {i["name"]: i["datatype"] for i in meta["inputs"]}
    inputs = [{"name": k, "shape": [1], "datatype": dtypes[k], "data": [v]} for k, v in GOOD.items()]
    assert client.post("/v2/models/rossmann/infer", json={"inputs": inputs}).status_code == 200
    as_int = [t | {"datatype": "INT64", "data": [20150917]} if t["name"] == "Date" else t for t in inputs]
    r = client.post("/v2/models/rossmann/infer", json={"inputs": as_int})
    assert r.status_code == 422 and "Date" in r.json()["error"] and "BYTES" in r.json()["error"]
    number_as_bytes = [t | {"data": [20150917]} if t["name"] == "Date" else t for t in inputs]
    r = client.post("/v2/models/rossmann/infer", json={"inputs": number_as_bytes})
    assert r.status_code == 422 and "ISO 8601" in r.json()["error"]
    huge = [t | {"shape": [10**11]} if t["name"] == "Store" else t for t in inputs]
    r = client.post("/v2/models/rossmann/infer", json={"inputs": huge})
    assert r.status_code == 422 and "shape" in r.json()["error"]
    for bad in ({"datatype": "COMPLEX"}, {"shape": [-1]}, {"shape": []}, {"shape": [1, 1, 1]}):
        r = client.post("/v2/models/rossmann/infer", json={"inputs": [inputs[0] | bad, *inputs[1:]]})
        assert r.status_code == 422, bad


# ---------------------------------------------------------------- auth
def test_a_wrong_credential_anywhere_fails(app):
    anon = TestClient(app)
    body = {"records": [{"user": "1", "item": "2"}]}
    url = "/v1/models/ratings/predict"
    assert anon.post(url, json=body, headers={"X-API-Key": KEY, "Authorization": f"Bearer {KEY}"}).status_code == 200
    assert anon.post(url, json=body, headers={"X-API-Key": KEY, "Authorization": "Bearer wrong"}).status_code == 403
    assert anon.post(url, json=body, headers={"X-API-Key": "wrong", "Authorization": f"Bearer {KEY}"}).status_code == 403
    reload = "/v1/admin/reload"
    assert anon.post(reload, headers={"X-Admin-Token": ADMIN, "Authorization": "Bearer wrong"}).status_code == 403
    assert anon.post(reload, headers={"X-Admin-Token": "wrong", "Authorization": f"Bearer {ADMIN}"}).status_code == 403
    assert anon.post(reload, headers={"X-Admin-Token": ADMIN, "Authorization": f"Bearer {ADMIN}"}).status_code == 200
    responses = anon.get("/openapi.json").json()["paths"]["/v1/admin/reload"]["post"]["responses"]
    assert {"200", "401", "403"} <= set(responses)


# ---------------------------------------------------------------- OpenAPI
def test_every_documented_example_passes_on_its_own_path(client):
    spec = client.get("/openapi.json").json()
    tried = 0
    for path, item in spec["paths"].items():
        op = item.get("post")
        content = (op or {}).get("requestBody", {}).get("content", {}).get("application/json", {})
        examples = [content["example"]] if "example" in content else []
        examples += [e["value"] for e in content.get("examples", {}).values()]
        for example in examples:
            query = {"model": "rossmann"} if path == "/invocations" else None
            r = client.post(path, json=example, params=query)
            assert r.status_code == 200, (path, example, r.text)
            tried += 1
    for name in ("rossmann", "ratings"):
        assert f"/v1/models/{name}/predict" in spec["paths"] and f"/models/{name}/invocations" in spec["paths"]
        assert f"/v2/models/{name}/infer" in spec["paths"]
    assert tried >= 8
    # bodies belong to one model: no {name} template pairs rossmann's name with ratings' body
    assert "/v1/models/{name}/predict" not in spec["paths"] and "/v2/models/{name}/infer" not in spec["paths"]
    tensor = spec["components"]["schemas"]["V2Tensor"]["properties"]
    assert tensor["datatype"]["enum"] == ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                          "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
    assert tensor["shape"]["maxItems"] == 2 and tensor["shape"]["items"]["minimum"] == 0
    assert "/invocations" not in spec["paths"]  # two models, no default: the per-model MLflow paths instead


def test_invocations_documents_the_default_models_body(bundles):
    application = create_app(Settings(models=bundles, default_model="ratings"))
    with TestClient(application) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        spec = c.get("/openapi.json").json()
        content = spec["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]
        r = c.post("/invocations", json=content["example"])
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
        np.testing.assert_allclose(r.json()["predictions"], c.post("/invocations?model=ratings",
                                                                  json=content["example"]).json()["predictions"])


def test_v2_inputs_the_model_does_not_take_are_not_a_silent_empty_answer(client):
    """Only unknown input names, 4 rows declared: a 422 naming the missing inputs (found by the
    fuzzer: the frame of the known inputs had 0 rows and the answer was 200 with no outputs)."""
    inputs = [{"name": "Store", "shape": [4], "datatype": "BYTES", "data": [None] * 4}]
    r = client.post("/v2/models/ratings/infer", json={"inputs": inputs})
    assert r.status_code == 422, r.text
    fields = {e[1] for e in errors(r)}
    assert {"user", "item"} <= fields, r.json()
