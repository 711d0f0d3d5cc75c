"""OpenAPI with the real inputs, rebuilt when the loaded versions change.

Each loaded model gets a record schema and concrete operations of its own for every route that
takes a body (`/v1/models/<name>/predict`, `/models/<name>/invocations`, `/v2/models/<name>/infer`
and its versioned twin), each with a request schema as exact as JSON Schema allows and an example
that the live endpoint accepts. The templated `{name}` body operations are then left out of the
document: a body is only valid for one model, which a `{name}` template cannot say, so a client
(or a fuzzer) pairing one model's name with another's body would be following the document into
a 422. Plain `/invocations` documents the body of the model it scores with by default (the only
one or TABREC_DEFAULT_MODEL); with several models and no default it is left out in favour of the
per-model paths. In open mode no operation declares security. Every 422 is documented in the
service's own error shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from modeling.schema import ISO_DATE
from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings
from service.tensors import ACCEPTED, NUMPY_DTYPE, V2_FOR_INPUT_TYPE

DESCRIPTION = """Predictions, recommendations and similar items from tabrec models.

Send `Authorization: Bearer <key>` or `X-API-Key: <key>` when API keys are configured.
The input columns of each loaded model are under **components/schemas** (`<name>.Record`)
and in the per-model operations below (`/v1/models/<name>/predict`, `/models/<name>/invocations`,
`/v2/models/<name>/infer`); the `{name}` templates of these routes accept the same bodies.
"""

INT64 = {"minimum": -(2**63), "maximum": 2**63 - 1}
JSON_SCHEMA_FOR_TYPE: dict[str, dict[str, Any]] = {
    # integers beyond int64 are a 422; integers may also come as decimal strings
    "int": {"anyOf": [{"type": "integer", "format": "int64", **INT64},
                      {"type": "string", "pattern": r"^-?[0-9]{1,18}$"}]},
    "float": {"anyOf": [{"type": "number"}, {"type": "string", "pattern": r"^-?[0-9]{1,15}(\.[0-9]{1,6})?$"}]},
    "bool": {"anyOf": [{"type": "boolean"}, {"enum": [0, 1, "true", "false"]}]},
    "str": {"anyOf": [{"type": "string"}, {"type": "number"}]},
    "id": {"anyOf": [{"type": "string"}, {"type": "number"}]},
    # documented for the years 1700-2199 (the server takes 1678-2261, what datetime64[ns] holds)
    "date": {"type": "string", "format": "date", "pattern": r"^(1[7-9]|2[01])\d{2}" + ISO_DATE.removeprefix(r"\d{4}") + "$",
             "description": "ISO 8601 date YYYY-MM-DD (optionally with a time THH:MM[:SS]; no time zone)"},
}
EXAMPLE_FOR_TYPE: dict[str, Any] = {"int": 1, "float": 0.0, "bool": False, "str": "a", "id": "1",
                                    "date": "2015-09-17"}
BODY_TEMPLATES = {
    ("/v1/models/{name}/predict", "post"), ("/models/{name}/invocations", "post"),
    ("/v2/models/{name}/infer", "post"), ("/v2/models/{name}/versions/{version}/infer", "post"),
}


def app_version() -> str:
    """The installed tabrec version (the docs' and the v2 server metadata's version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tabrec")
    except PackageNotFoundError:
        return "0"


def value_schema(f: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of one field's values (nullable when the field is optional)."""
    prop = copy.deepcopy(JSON_SCHEMA_FOR_TYPE.get(f["type"], {}))
    if f.get("allowed"):
        codes = list(f["allowed"])  # integral codes may also come as numbers ("0" or 0)
        prop = {"enum": codes + [int(c) for c in codes if c.lstrip("-").isdigit()]}
    if f.get("description"):
        prop["description"] = f["description"]
    if not f.get("required", True):
        prop = {"anyOf": [prop, {"type": "null"}]} if "anyOf" not in prop else {
            **prop, "anyOf": [*prop["anyOf"], {"type": "null"}]}
    return prop


def record_schema(m: LoadedModel) -> dict[str, Any]:
    fields = m.predictor.input_fields
    required = [f["name"] for f in fields if f.get("required", True)]
    return {"type": "object", "title": f"{m.name} record", "required": required,
            "properties": {f["name"]: value_schema(f) for f in fields},
            "description": f"Raw input record for model {m.name!r} ({m.kind}, version {m.version}); "
                           "other keys are ignored."}


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


def mlflow_body(m: LoadedModel, ref: str) -> dict[str, Any]:
    """The MLflow scoring body for one model: exactly one of the four formats. dataframe_split is
    documented with every column in schema order (the server also takes a subset in any order)."""
    fields = m.predictor.input_fields
    records = {"type": "array", "items": {"$ref": ref}}
    split = {"type": "object", "required": ["columns", "data"], "properties": {
        "columns": {"const": [f["name"] for f in fields]},
        "data": {"type": "array", "items": {"type": "array", "prefixItems": [value_schema(f) for f in fields],
                                            "minItems": len(fields), "maxItems": len(fields)}},
        "index": {"type": ["array", "null"]}}}
    formats = {"dataframe_split": split, "dataframe_records": records, "instances": records, "inputs": records}
    return {"type": "object", "properties": {**formats, "params": {"type": ["object", "null"]}},
            "additionalProperties": False, "oneOf": [{"required": [k]} for k in formats]}


def v2_body(m: LoadedModel) -> dict[str, Any]:
    """The v2 infer body for one model, one row per request as documented (shape [1]; any n works:
    the schema cannot say that `shape` must equal the length of `data`)."""
    fields = m.predictor.input_fields
    no_binary = {"type": ["object", "null"], "not": {"required": ["binary_data_size"]}}

    def tensor(f: dict[str, Any] | None) -> dict[str, Any]:
        # inputs the model does not take are ignored, whatever their datatype and data
        name = {"const": f["name"]} if f else {"type": "string", "not": {"enum": [g["name"] for g in fields]}}
        accepted = list(dict.fromkeys(ACCEPTED[f["type"]])) if f else list(NUMPY_DTYPE) + ["BYTES"]
        value = value_schema(f) if f else {"not": {"type": "array"}}
        return {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
            "name": name, "shape": {"const": [1]}, "datatype": {"enum": accepted},
            "data": {"type": "array", "items": value, "minItems": 1, "maxItems": 1},
            "parameters": no_binary}}

    return {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": ["string", "null"]},
        "parameters": {"type": ["object", "null"], "properties": {"binary_data_output": {"type": ["boolean", "null"]}}},
        # any order; each input at most once, the required ones exactly once; others ignored
        "inputs": {"type": "array", "items": {"anyOf": [*(tensor(f) for f in fields), tensor(None)]},
                   "allOf": [{"contains": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"const": f["name"]}}},
                              "minContains": 1 if f.get("required", True) else 0, "maxContains": 1}
                             for f in fields]},
        "outputs": {"type": ["array", "null"], "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"const": "prediction"}, "parameters": {"type": ["object", "null"], "properties": {
                "binary_data": {"type": ["boolean", "null"]}}}}}}}}


def v2_example(m: LoadedModel, record: dict[str, Any]) -> dict[str, Any]:
    types = {f["name"]: f["type"] for f in m.predictor.input_fields}
    return {"inputs": [{"name": k, "shape": [1], "datatype": V2_FOR_INPUT_TYPE.get(types[k], "BYTES"), "data": [v]}
                       for k, v in record.items()]}


def concrete(template: dict[str, Any], name: str, m: LoadedModel, op_id: str, summary: str,
             schema: dict[str, Any], example: Any, version: str | None = None) -> dict[str, Any]:
    """A per-model copy of a templated operation: no {name} (or {version}) parameter, exact body."""
    op = copy.deepcopy(template)
    op["operationId"] = f"{op_id}_{_ident(name)}" + (f"_v{_ident(version)}" if version else "")
    op["summary"] = f"{summary} with {name} ({m.kind}, version {m.version})"
    op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") not in ("name", "version")]
    if not op["parameters"]:
        op.pop("parameters")
    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema, "example": example}}}
    return op


def _ident(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def add_model_docs(schema: dict[str, Any], models: Mapping[str, LoadedModel], settings: Settings) -> None:
    """Per loaded model: a record schema and concrete body operations; /invocations for its default."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    paths = schema["paths"]
    templates = {k: paths.get(k[0], {}).get(k[1]) for k in BODY_TEMPLATES}
    for name, m in models.items():
        ref = f"#/components/schemas/{name}.Record"
        components[f"{name}.Record"] = record_schema(m)
        record = example_record(m)
        split = {"dataframe_split": {"columns": list(record), "data": [list(record.values())]}}
        predict = {"type": "object", "required": ["records"], "additionalProperties": False,
                   "properties": {"records": {"type": "array", "items": {"$ref": ref}}}}
        ops = [("/v1/models/{name}/predict", f"/v1/models/{name}/predict", "predict", "Predict", predict,
                {"records": [record]}, None),
               ("/models/{name}/invocations", f"/models/{name}/invocations", "invocations", "MLflow scoring",
                mlflow_body(m, ref), split, None),
               ("/v2/models/{name}/infer", f"/v2/models/{name}/infer", "v2_infer", "Open Inference Protocol v2",
                v2_body(m), v2_example(m, record), None)]
        if m.version:
            ops.append(("/v2/models/{name}/versions/{version}/infer", f"/v2/models/{name}/versions/{m.version}/infer",
                        "v2_infer", "Open Inference Protocol v2", v2_body(m), v2_example(m, record), str(m.version)))
        for template_path, path, op_id, summary, body, example, version in ops:
            template = templates.get((template_path, "post"))
            if template is not None:
                paths[path] = {"post": concrete(template, name, m, op_id, summary, body, example, version)}
        if name == settings.invocations_model and "/invocations" in paths:
            op = paths["/invocations"]["post"]
            content = op["requestBody"]["content"]["application/json"]
            content["schema"], content["example"] = mlflow_body(m, ref), split
            # ?model= and X-Model-Name work, but a document that offered them would pair another
            # model's name with this model's body; they are described in prose instead
            op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") not in ("model", "x-model-name")]
            op["description"] = (f"Scores with {name!r}, the default model. `?model=NAME` or the X-Model-Name "
                                 "header score with another served model, whose body is documented under "
                                 "/models/NAME/invocations.")
            if not op["parameters"]:
                op.pop("parameters")
    if models:
        for template_path, method in BODY_TEMPLATES:
            paths.get(template_path, {}).pop(method, None)
            if template_path in paths and not paths[template_path]:
                del paths[template_path]
        if settings.invocations_model not in models:  # no default: only per-model paths are documented
            paths.pop("/invocations", None)


def one_error_shape(schema: dict[str, Any]) -> None:
    """Every 422 in this service has the {"detail": [{record, field, msg}]} shape (service.errors),
    including those FastAPI documents on its own for query and path parameters."""
    fastapi_422 = "#/components/schemas/HTTPValidationError"
    ours = {"$ref": "#/components/schemas/ErrorResponse"}
    for item in schema["paths"].values():
        for op in item.values():
            content = op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {})
            if content.get("schema", {}).get("$ref") == fastapi_422:
                content["schema"] = ours
    components = schema.get("components", {}).get("schemas", {})
    if "ErrorResponse" not in components:
        from service.schemas import ErrorResponse

        components.update(ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
                          .pop("$defs", {}))
        components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def drop_security(schema: dict[str, Any], settings: Settings) -> None:
    """Open mode (no API keys): no operation asks for credentials, so the document says none;
    reload stays guarded only by an admin token, when one is set."""
    if settings.api_keys:
        return
    for path, item in schema["paths"].items():
        for op in item.values():
            if path != "/v1/admin/reload" or settings.admin_token is None:
                op.pop("security", None)


def openapi_builder(app: FastAPI, registry: ModelRegistry, settings: Settings) -> Callable[[], dict[str, Any]]:
    """app.openapi replacement, rebuilt whenever the set of loaded versions changes."""
    cache: dict[Any, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        models = registry.models
        key = tuple((n, m.identity) for n, m in models.items())
        if key not in cache:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            add_model_docs(schema, models, settings)
            drop_security(schema, settings)
            one_error_shape(schema)
            cache.clear()
            cache[key] = schema
        return cache[key]

    return openapi
