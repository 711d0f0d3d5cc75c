"""Schema-driven fuzzing of the HTTP service: every operation of the app's own OpenAPI document
(with both demo models loaded, so the per-model record schemas are in it) gets generated requests
from schemathesis; no answer may be a 5xx, and every answer must match the documented status
codes, content types and response schemas."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import mlflow
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service import Settings, create_app

MODELS = {"rossmann": "models:/rossmann@champion", "ratings": "models:/ratings@champion"}
KEY, ADMIN = "fuzz-key", "fuzz-admin"
EXAMPLES = int(os.environ.get("SCHEMA_FUZZ_EXAMPLES", "25"))  # per operation; raise it for a longer hunt
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


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
    model-less app plus each model's concrete predict operation (reload excluded: each forced
    reload re-reads both models from the store, seconds each)."""
    spec = create_app(Settings(models={})).openapi()
    ops = [(m.upper(), p) for p, item in spec["paths"].items() for m in item if p != "/v1/admin/reload"]
    return ops + [("POST", f"/v1/models/{name}/predict") for name in MODELS]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


# schemathesis' own `from_fixture(...).parametrize()` relies on a pytest internal that pytest 9
# no longer has, so each operation is one ordinary parametrized test driving its strategy.
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_and_never_5xx(api_schema, method, path):
    operation = api_schema[path][method]
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                         operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def fuzz(case):
        response = case.call(headers={"X-API-Key": KEY})
        case.validate_response(response, checks=CHECKS)

    fuzz()
