"""OpenAPI with the real inputs: per loaded model, a record schema, a concrete predict
operation and request examples on the shared routes, rebuilt when the loaded versions change."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.registry import LoadedModel, ModelRegistry
from service.schemas import V2_FOR_INPUT_TYPE

DESCRIPTION = """Predictions, recommendations and similar items from tabrec models.

Send `Authorization: Bearer <key>` or `X-API-Key: <key>` when API keys are configured.
The input columns of each loaded model are under **components/schemas** (`<name>.Record`)
and in the per-model `POST /v1/models/<name>/predict` operations below.
"""

JSON_SCHEMA_FOR_TYPE: dict[str, dict[str, Any]] = {
    "int": {"type": "integer", "format": "int64"},  # larger integers are a 422
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "str": {"type": "string"},
    "id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "date": {"type": "string", "format": "date"},
}
EXAMPLE_FOR_TYPE: dict[str, Any] = {"int": 1, "float": 0.0, "bool": False, "str": "a", "id": "1",
                                    "date": "2015-09-17"}


def app_version() -> str:
    """The installed tabrec version (the docs' and the v2 server metadata's version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tabrec")
    except PackageNotFoundError:
        return "0"


def record_schema(m: LoadedModel) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for f in m.predictor.input_fields:
        prop = dict(JSON_SCHEMA_FOR_TYPE.get(f["type"], {}))
        if f.get("allowed"):
            prop = {"type": "string", "enum": list(f["allowed"])}
        if f.get("description"):
            prop["description"] = f["description"]
        props[f["name"]] = prop
    required = [f["name"] for f in m.predictor.input_fields if f.get("required", True)]
    return {"type": "object", "title": f"{m.name} record", "properties": props, "required": required,
            "description": f"Raw input record for model {m.name!r} ({m.kind}, version {m.version})."}


def example_record(m: LoadedModel) -> dict[str, Any]:
    """A plausible record: real ids from the vocabulary for ratings models, type defaults otherwise."""
    p = m.predictor
    out: dict[str, Any] = {}
    for f in p.input_fields:
        vocab = getattr(p, f"{f['name']}s", None) if m.kind == "ratings" else None
        if vocab is not None and len(vocab):
            out[f["name"]] = str(vocab[0])
        elif f.get("allowed"):
            out[f["name"]] = f["allowed"][0]
        else:
            out[f["name"]] = EXAMPLE_FOR_TYPE.get(f["type"], "1")
    return out


def add_model_docs(schema: dict[str, Any], models: Mapping[str, LoadedModel]) -> None:
    """Per loaded model: a record schema, a concrete predict path, and examples on the shared routes."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    paths = schema["paths"]
    template = paths["/v1/models/{name}/predict"]["post"]
    for name, m in models.items():
        ref = f"{name}.Record"
        components[ref] = record_schema(m)
        record = example_record(m)
        op = copy.deepcopy(template)
        op["operationId"] = f"predict_{name}"
        op["summary"] = f"Predict with {name} ({m.kind}, version {m.version})"
        op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "name"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "required": ["records"], "additionalProperties": False,
                       "properties": {"records": {"type": "array",
                                                  "items": {"$ref": f"#/components/schemas/{ref}"}}}},
            "example": {"records": [record]}}}}
        paths[f"/v1/models/{name}/predict"] = {"post": op}
        _add_example(paths, "/v1/models/{name}/predict", name, m, {"records": [record]})
        _add_example(paths, "/invocations", name, m,
                     {"dataframe_split": {"columns": list(record), "data": [list(record.values())]}})
        _add_example(paths, "/v2/models/{name}/infer", name, m, {"inputs": [
            {"name": k, "shape": [1], "datatype": V2_FOR_INPUT_TYPE.get(_ftype(m, k), "BYTES"), "data": [v]}
            for k, v in record.items()]})


def _ftype(m: LoadedModel, name: str) -> str:
    return next(f["type"] for f in m.predictor.input_fields if f["name"] == name)


def _add_example(paths: dict[str, Any], path: str, name: str, m: LoadedModel, value: Any) -> None:
    content = paths.get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
    if "application/json" in content:
        cols = ", ".join(f["name"] for f in m.predictor.input_fields)
        content["application/json"].setdefault("examples", {})[name] = {
            "summary": f"{name} ({m.kind}, version {m.version}): {cols}", "value": value}


def openapi_builder(app: FastAPI, registry: ModelRegistry) -> Callable[[], dict[str, Any]]:
    """app.openapi replacement, rebuilt whenever the set of loaded versions changes."""
    cache: dict[Any, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        models = registry.models
        key = tuple((n, m.identity) for n, m in models.items())
        if key not in cache:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            add_model_docs(schema, models)
            cache.clear()
            cache[key] = schema
        return cache[key]

    return openapi
